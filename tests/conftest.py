"""Shared test data: a toy pair set (six topics, three questions each) for the training tests."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

# compile="auto" compiles every BERT-family model on CPUs with native bf16 (most CI machines), paying
# seconds of warm-up per model: the suite loads hundreds. Auto is off here (and in the servers the tests
# start); tests/test_speed.py covers the choice, the fallback and the compiled forward's parity with eager.
os.environ.setdefault("TAMIS_COMPILE", "0")
# No test may reach the Hugging Face Hub: Hub ids resolve from the cache only (tests/test_hub.py turns this off
# for a stand-in Hub on 127.0.0.1, tests/hub_server.py). Set before huggingface_hub is imported (it reads it once).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

TOPICS = {
    "cats": ["Cats purr when they are content.", "A cat sleeps most of the day.", "Kittens are young cats."],
    "rust": ["Rust is a systems programming language.", "Cargo builds Rust projects.", "The borrow checker in Rust."],
    "paris": ["Paris is the capital of France.", "The Eiffel Tower stands in Paris.", "Paris hosts the Louvre."],
    "tea": ["Green tea contains catechins.", "Black tea is fermented.", "Tea is brewed from leaves."],
    "mars": ["Mars is the red planet.", "Rovers explore the surface of Mars.", "Mars has two small moons."],
    "piano": ["The piano has 88 keys.", "Chopin composed for the piano.", "A piano is tuned by a technician."],
}
QUESTIONS = {
    "cats": ["why do cats purr", "how long do cats sleep", "what is a kitten"],
    "rust": ["what is rust programming", "how to build rust code", "what does the borrow checker do"],
    "paris": ["capital of france", "where is the eiffel tower", "where is the louvre"],
    "tea": ["what is in green tea", "how is black tea made", "what is tea made from"],
    "mars": ["which planet is red", "what explores mars", "how many moons does mars have"],
    "piano": ["how many keys on a piano", "who wrote piano music", "who tunes pianos"],
}


def save_random_splade(d: Path, tokenizer_config: dict | None = None):
    """A tiny random BERT masked-LM (2 x 32, the uncased BERT vocabulary) saved by transformers into ``d`` with
    the bundled MiniLM's tokenizer, its head's bias shifted so that some terms come out positive and most are cut
    by SPLADE's relu; ``tokenizer_config`` becomes tokenizer_config.json. Returns the transformers model."""
    import shutil

    import torch

    from tamis.models.loading import resolve_model_dir

    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    ref = transformers.BertForMaskedLM(cfg).eval()
    with torch.no_grad():
        ref.cls.predictions.bias.normal_(mean=-0.5, std=1.0)
    ref.save_pretrained(d, safe_serialization=True)
    shutil.copy(resolve_model_dir(None) / "tokenizer.json", d / "tokenizer.json")
    if tokenizer_config is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return ref


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pairs")
    rows = []
    for topic, docs in TOPICS.items():
        for q, doc in zip(QUESTIONS[topic], docs):
            rows.append({"source": "toy", "query": q, "document": doc, "label": 1})
    rows.append({"source": "toy", "query": "why do cats purr", "document": TOPICS["tea"][0], "label": 0})
    with gzip.open(d / "pairs.jsonl.gz", "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return d
