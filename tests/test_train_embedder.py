"""Embedding training: batches without duplicate texts, GradCache = full-batch gradients, Matryoshka,
task adapters (mixed per row, peft interop both ways, merged export = sentence-transformers vectors),
jina-embeddings-v3 adapters trained into the stacked layout, the CLI. Tiny models only."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tamis
from conftest import QUESTIONS
from conftest import TOPICS as DOCS
from tamis.models import bert
from tamis.models.loading import bundled_default_dir
from tamis.train import (
    AdapterConfig,
    EmbeddingConfig,
    MiningConfig,
    TrainConfig,
    export_merged,
    train_embedder,
)
from tamis.train.data import RerankData, TrainList, drop_documents, load_training_data, split_dev_unseen
from tamis.train.embedder import ContrastiveStep, PairBatcher, retrieval_metrics
from tamis.train.losses import in_batch_infonce, matryoshka

SHARED = Path(__file__).resolve().parents[2] / "shared"
V3_TINY = SHARED / "fixtures" / "jina-embeddings-v3-tiny"
needs_v3 = pytest.mark.skipif(not V3_TINY.is_dir(), reason="../shared/fixtures not present")


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pairs")
    with gzip.open(d / "pairs.jsonl.gz", "wt", encoding="utf-8") as f:
        for topic, docs in DOCS.items():
            for q, doc in zip(QUESTIONS[topic], docs):
                f.write(json.dumps({"query": q, "document": doc, "label": 1}) + "\n")
    return d


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT encoder (random weights, MiniLM's tokenizer, no sentence-transformers files)."""
    d = tmp_path_factory.mktemp("encoder")
    src = bundled_default_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, d / name)
    config = {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": 30522, "hidden_size": 32,
              "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "hidden_act": "gelu",
              "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0}
    (d / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = bert.BertModel(bert.BertConfig.from_dict(config))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    return d


def _toy_data() -> RerankData:
    corpus = {f"d{i}": t for i, t in enumerate(t for docs in DOCS.values() for t in docs)}
    corpus["dup"] = DOCS["cats"][0]  # same text as d0 under another id
    queries = {f"q{i}": t for i, t in enumerate(t for qs in QUESTIONS.values() for t in qs)}
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(len(queries))}
    qrels["q1"]["d0"] = 1  # q1 has two relevant documents
    return RerankData("toy", corpus, queries, qrels)


def _randomize_adapters(model, scale=0.3, seed=0):
    from tamis.models import lora

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * scale)


# ------------------------------------------------------------------------------------ data and batches


def test_batches_hold_each_text_once_and_mask_other_known_positives():
    data = _toy_data()
    lists = [TrainList(q, data.positives(q), ["dup", "d5", "d6"]) for q in ("q0", "q1", "q2", "q3")]
    batches = PairBatcher(data, lists, batch_size=4, hard_negatives=2, seed=0)(epoch=0)
    assert len(batches) == 1
    b = batches[0]
    texts = [data.corpus[d] for d in b.docs]
    assert len(texts) == len(set(texts))  # d0 and "dup" share a text: one column
    for qid, t in zip(b.qids, b.targets):
        assert b.docs[t] in data.positives(qid) or data.corpus[b.docs[t]] in {data.corpus[p] for p in data.positives(qid)}
    assert PairBatcher(data, lists, 4, 2, seed=0)(0) == batches  # deterministic per epoch
    emb = tamis.Embedder()
    step = ContrastiveStep(emb, data, EmbeddingConfig(), None, None)
    _, _, targets, mask = step._inputs(b)
    i = b.qids.index("q1")
    d0 = b.docs.index("d0") if "d0" in b.docs else b.docs.index("dup")
    assert int(targets[i]) == d0 or not mask[i, d0]  # q1's other positive is never its negative
    assert mask[b.qids.index("q0")].sum() == len(b.docs)


def test_unseen_dev_split_keeps_dev_documents_out_of_training():
    data = _toy_data()
    train, dev, dev_docs = split_dev_unseen(data, 4, seed=3)
    assert dev and not set(train) & set(dev)
    for q in train:
        assert not set(data.positives(q)) & dev_docs
    lists = drop_documents([TrainList(q, data.positives(q), list(data.corpus)) for q in train], dev_docs)
    assert all(not set(t.negatives) & dev_docs for t in lists)
    if "q1" in dev or "q0" in dev:  # q0 and q1 share d0: both in dev or neither
        assert {"q0", "q1"} <= set(dev)


def test_unseen_dev_split_keeps_to_the_asked_size_when_documents_are_shared():
    # 60 questions over 30 documents, two per document (like llamaindex-10k-lyft): the dev slice grows by whole
    # documents, so it lands on the asked size instead of snowballing over shared positives
    corpus = {f"d{i}": f"document {i}" for i in range(30)}
    queries = {f"q{i}": f"question {i}" for i in range(60)}
    qrels = {f"q{i}": {f"d{i // 2}": 1} for i in range(60)}
    qrels["q0"]["d1"] = 1  # d0 and d1 are chained through q0
    data = RerankData("shared", corpus, queries, qrels)
    for dev in (10, 0.25):
        train, dev_q, dev_docs = split_dev_unseen(data, dev, seed=1)
        want = 10 if dev == 10 else 15
        assert want <= len(dev_q) <= want + 3 and len(train) + len(dev_q) == 60
        assert dev_docs == {d for q in dev_q for d in data.positives(q)}
        assert all(not set(data.positives(q)) & dev_docs for q in train)
    assert split_dev_unseen(data, 10, seed=1) == split_dev_unseen(data, 10, seed=1)  # seeded


def test_a_set_named_test_is_refused_unless_allowed(tmp_path):
    (tmp_path / "qrels").mkdir()
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    with gzip.open(tmp_path / "corpus.jsonl.gz", "wt") as f:
        f.write(json.dumps({"_id": "d1", "title": "", "text": "a document"}) + "\n")
    with gzip.open(tmp_path / "queries.jsonl.gz", "wt") as f:
        f.write(json.dumps({"_id": "q1", "text": "a query"}) + "\n")
    with pytest.raises(Exception, match="--allow-test-split"):
        load_training_data(f"{tmp_path}:test")
    assert load_training_data(f"{tmp_path}:test", allow_test=True).positives("q1") == ["d1"]


def _pair_set(directory: Path, topics: list[str]) -> Path:
    directory.mkdir()
    with gzip.open(directory / "pairs.jsonl.gz", "wt", encoding="utf-8") as f:
        for topic in topics:
            for q, doc in zip(QUESTIONS[topic], DOCS[topic]):
                f.write(json.dumps({"query": q, "document": doc, "label": 1}) + "\n")
    return directory


def test_replay_sets_join_training_but_never_the_dev_slice(tmp_path):
    from tamis.train.embedder import dev_corpus, prepare_pairs

    target = _pair_set(tmp_path / "target", ["cats", "rust", "paris", "tea"])
    general = _pair_set(tmp_path / "general", ["mars", "piano"])
    mining = MiningConfig(methods=("bm25",), n_negatives=2, skip_top=0, depth=5, dev=3)
    plain = prepare_pairs([str(target)], tmp_path / "w0", mining, 1, show_progress=False)
    mixed = prepare_pairs([str(target)], tmp_path / "w1", mining, 1, show_progress=False, replay=[str(general)],
                          replay_queries=4)
    assert mixed.replay == ["general"] and mixed.sizes["general"]["replay_queries"] == 4
    replayed = [t for t in mixed.train if t.qid.startswith("general/")]
    assert len(replayed) == 4 and len(mixed.train) == len(plain.train) + 4
    assert all(d.startswith("general/") for t in replayed for d in t.positives + t.negatives)  # mined in its own set
    assert sorted(mixed.dev_qids) == sorted(f"target/{q}" for q in plain.dev_qids)  # dev: the target set only
    assert set(dev_corpus(mixed, None)) == {f"target/{d}" for d in plain.data.corpus}
    default = prepare_pairs([str(target)], tmp_path / "w2", mining, 1, show_progress=False, replay=[str(general)])
    assert default.sizes["general"]["replay_queries"] == min(len(plain.train), 6)  # as many as the target trains on
    with pytest.raises(ValueError, match="also a training set"):
        prepare_pairs([str(target)], tmp_path / "w3", mining, 1, show_progress=False, replay=[str(target)])


# ------------------------------------------------------------------------------------ losses and GradCache


def test_matryoshka_is_infonce_on_renormalised_prefixes():
    g = torch.Generator().manual_seed(0)
    q, d = torch.randn(4, 16, generator=g), torch.randn(6, 16, generator=g)
    t = torch.tensor([0, 1, 2, 3])
    total, parts = matryoshka(q, d, t, [16, 8], weights=[1.0, 0.5])
    full, half = in_batch_infonce(q, d, t), in_batch_infonce(q[:, :8], d[:, :8], t)
    torch.testing.assert_close(total, full + 0.5 * half)
    assert parts == {"loss_d16": pytest.approx(float(full)), "loss_d8": pytest.approx(float(half))}
    scaled = in_batch_infonce(q[:, :8] * 3, d[:, :8] * 0.1, t)  # re-normalised: length does not matter
    torch.testing.assert_close(scaled, half)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[0, 5] = False
    assert float(in_batch_infonce(q, d, t, mask=mask)) != float(full)
    with pytest.raises(ValueError, match="outside"):
        matryoshka(q, d, t, [32])


@pytest.mark.parametrize("dims", [None, (32, 8)])
def test_gradcache_gives_the_full_batch_gradient(encoder, dims):
    data = _toy_data()
    lists = [TrainList(q, data.positives(q), ["d10", "d11", "d12", "d13"]) for q in list(data.queries)[:6]]
    batch = PairBatcher(data, lists, batch_size=6, hard_negatives=2, seed=1)(0)[0]

    def grads(mini_batch):
        emb = tamis.Embedder(encoder, dtype="float32")
        emb.add_adapter("t", r=4, alpha=8)
        _randomize_adapters(emb.model, 0.05)
        step = ContrastiveStep(emb, data, EmbeddingConfig(mini_batch=mini_batch, matryoshka_dims=dims), "t", "t")
        emb.model.train()
        out = step(batch)
        (out.loss / 2).backward()  # the trainer scales by 1 / grad_accum: the cache must follow
        return float(out.loss.detach()), {n: p.grad.clone() for n, p in emb.model.named_parameters() if p.grad is not None}

    loss_full, g_full = grads(None)
    loss_cached, g_cached = grads(3)
    assert loss_cached == pytest.approx(loss_full, abs=1e-5)
    assert set(g_full) == set(g_cached) and len(g_full) > 10
    for n in g_full:
        torch.testing.assert_close(g_cached[n], g_full[n], atol=2e-6, rtol=1e-4)


# ------------------------------------------------------------------------------------ adapters


def test_mixed_task_batches_equal_single_task_batches(encoder, tmp_path):
    emb = tamis.Embedder(encoder, dtype="float32")
    emb.add_adapter("a", r=4, alpha=8)
    emb.add_adapter("b", target_modules=["query", "value"], r=2, alpha=2, seed=1)
    _randomize_adapters(emb.model)
    emb.save_adapter("a", tmp_path / "a")
    emb.save_adapter("b", tmp_path / "b")
    (tmp_path / "model").mkdir()
    for f in encoder.iterdir():
        shutil.copy(f, tmp_path / "model" / f.name)
    (tmp_path / "model" / "adapters.json").write_text(json.dumps({"b": str(tmp_path / "b")}))
    served = tamis.Embedder(tmp_path / "model", adapters={"a": tmp_path / "a"}, dtype="float32")  # listed + given
    assert set(served.tasks) == {"a", "b"} and "tasks=" in repr(served)
    texts = ["why do cats purr", "Paris is the capital of France.", "a longer text about the borrow checker in rust"]
    single = {t: served.embed(texts, task=t) for t in ("a", "b", None)}
    assert np.abs(single["a"] - single[None]).max() > 1e-3 and np.abs(single["b"] - single["a"]).max() > 1e-3
    np.testing.assert_allclose(single[None], tamis.Embedder(encoder, dtype="float32").embed(texts), atol=1e-6)  # no adapter: base
    rows = [(0, "a"), (1, None), (2, "b"), (0, "b"), (1, "a"), (2, None)]
    enc = served.tokenize([texts[i] for i, _ in rows])
    mixed = served.finalize(served.forward(enc, [t for _, t in rows]))
    for r, (i, t) in enumerate(rows):
        np.testing.assert_allclose(mixed[r], single[t][i], atol=1e-5)
    with pytest.raises(tamis.errors.UnknownTaskError):
        served.embed(texts, task="c")


def test_adapters_interoperate_with_peft_both_ways(encoder, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    texts = ["why do cats purr", "Paris is the capital of France.", "Tea is brewed from leaves."]

    def hf_vectors(model, emb):
        batch = emb.tokenizer.pad(emb.tokenize(texts), "cpu")
        with torch.no_grad():
            h = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      token_type_ids=batch.token_type_ids).last_hidden_state
        m = batch.attention_mask[..., None].float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()

    # tamis -> peft
    emb = tamis.Embedder(encoder, dtype="float32")
    emb.add_adapter("t", r=4, alpha=8)
    _randomize_adapters(emb.model)
    emb.save_adapter("t", tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert "dense" not in config["target_modules"] and "intermediate.dense" in config["target_modules"]
    with safe_open(str(tmp_path / "ours" / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight" in f.keys()
    hf = transformers.AutoModel.from_pretrained(str(encoder)).eval()
    with pytest.warns(UserWarning):  # peft ignores tamis' extra config key, and says so
        theirs = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ours")).eval()
    np.testing.assert_allclose(hf_vectors(theirs, emb), emb.embed(texts, task="t"), atol=1e-5)

    # peft -> tamis
    hf = transformers.AutoModel.from_pretrained(str(encoder)).eval()
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["query", "value", "output.dense"], lora_dropout=0.0)
    pm = peft.get_peft_model(hf, cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(str(tmp_path / "theirs"))
    want = hf_vectors(pm.eval(), emb)
    got = tamis.Embedder(encoder, adapters={"p": tmp_path / "theirs"}, dtype="float32").embed(texts, task="p")
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(got - emb.embed(texts)).max() > 1e-3


# ------------------------------------------------------------------------------------ end to end


def test_train_adapter_then_merged_export_matches_sentence_transformers(encoder, pairs_dir, tmp_path):
    summary = train_embedder(
        [str(pairs_dir)], tmp_path / "run", model=str(encoder),
        embedding=EmbeddingConfig(batch_size=5, mini_batch=4, hard_negatives=1),
        mining=MiningConfig(methods=("bm25",), n_negatives=4, skip_top=0, dev=4),
        config=TrainConfig(lr=5e-3, max_steps=3, eval_every=3, log_every=1, select_metric="nDCG@10",
                           show_progress=False),
        adapter=AdapterConfig("toy", r=4, alpha=8), merge_into=tmp_path / "merged", cache_dir=tmp_path / "cache",
        show_progress=False)
    assert summary["steps"] == 3 and summary["best_dev"] is not None
    assert set(summary["last_dev"]) == {"nDCG@10", "MRR@10", "Hit@10"}
    assert summary["parameters"]["trainable"] < summary["parameters"]["parameters"] / 20
    adapter = tmp_path / "run" / "adapter"
    assert {p.name for p in adapter.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]
    texts = ["why do cats purr", "Mars is the red planet.", "who tunes pianos"]
    served = tamis.Embedder(encoder, adapters={"toy": adapter}, dtype="float32")
    want = served.embed(texts, task="toy")
    assert np.abs(want - served.embed(texts)).max() > 1e-4  # the adapter was trained
    merged = tamis.Embedder(tmp_path / "merged", dtype="float32")
    np.testing.assert_allclose(merged.embed(texts), want, atol=1e-5)
    st = pytest.importorskip("sentence_transformers")
    theirs = st.SentenceTransformer(str(tmp_path / "merged"), device="cpu").encode(texts)
    np.testing.assert_allclose(theirs, want, atol=1e-5)
    again = export_merged(encoder, adapter, tmp_path / "merged2", task="toy")  # the standalone path
    np.testing.assert_allclose(tamis.Embedder(again, dtype="float32").embed(texts), want, atol=1e-5)


def test_full_matryoshka_training_lowers_the_loss_and_saves_a_sentence_transformer(encoder, pairs_dir, tmp_path):
    data = load_training_data(pairs_dir)
    lists = [TrainList(q, data.positives(q), []) for q in data.trainable_queries()]
    emb = tamis.Embedder(encoder, dtype="float32")
    cfg = EmbeddingConfig(batch_size=18, matryoshka_dims=(32, 16, 8), hard_negatives=0)
    step = ContrastiveStep(emb, data, cfg, None, None)
    batch = PairBatcher(data, lists, 18)(0)[0]
    with torch.no_grad():
        before = step(batch)
    summary = train_embedder(
        [str(pairs_dir)], tmp_path / "run", model=str(encoder), embedding=cfg,
        mining=MiningConfig(methods=(), dev=0),
        config=TrainConfig(lr=2e-3, max_steps=4, warmup=0, log_every=1, show_progress=False), show_progress=False)
    assert summary["best_dev"] is None and summary["steps"] == 4
    trained = tamis.Embedder(tmp_path / "run" / "model", dtype="float32")
    step = ContrastiveStep(trained, data, cfg, None, None)
    with torch.no_grad():
        after = step(batch)
    assert float(after.loss) < float(before.loss) and set(after.metrics) == {"loss_d32", "loss_d16", "loss_d8"}
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["matryoshka_dimensions"] == [8, 16, 32]
    st = pytest.importorskip("sentence_transformers")
    texts = ["why do cats purr", "The piano has 88 keys."]
    theirs = st.SentenceTransformer(str(tmp_path / "run" / "model"), device="cpu", truncate_dim=16).encode(texts)
    ours = trained.embed(texts, dimensions=16, normalized=False)
    np.testing.assert_allclose(theirs / np.linalg.norm(theirs, axis=1, keepdims=True),
                               ours / np.linalg.norm(ours, axis=1, keepdims=True), atol=1e-5)
    m = retrieval_metrics(trained, data.corpus, data.queries, data.qrels, None, None, dims=[16, 8])
    assert set(m) == {f"{n}{s}" for n in ("nDCG@10", "MRR@10", "Hit@10") for s in ("", "/d16", "/d8")}


@needs_v3
def test_v3_task_adapters_train_into_the_stacked_layout(pairs_dir, tmp_path):
    texts = ["why do cats purr", "Paris is the capital of France."]
    base = tamis.Embedder(V3_TINY, dtype="float32")
    before = {t: base.embed(texts, task=t) for t in [None, *base.tasks]}
    summary = train_embedder(
        [str(pairs_dir)], tmp_path / "run", model=str(V3_TINY),
        embedding=EmbeddingConfig(batch_size=6, mini_batch=4, hard_negatives=0),
        mining=MiningConfig(methods=(), dev=0), adapter=AdapterConfig("retrieval.query", "retrieval.passage"),
        config=TrainConfig(lr=5e-2, max_steps=2, warmup=0, weight_decay=0.1, show_progress=False),
        show_progress=False)
    assert summary["query_task"] == "retrieval.query" and summary["passage_task"] == "retrieval.passage"
    out = tmp_path / "run" / "model"
    with safe_open(str(out / "model.safetensors"), "pt") as f, safe_open(str(V3_TINY / "model.safetensors"), "pt") as g:
        assert set(f.keys()) == set(g.keys())  # the official layout, stacked adapters as parametrizations
        key = "roberta.encoder.layers.0.mixer.Wqkv.parametrizations.weight.0.lora_B"
        new, old = f.get_tensor(key), g.get_tensor(key)
        assert torch.equal(new[2:], old[2:]) and not torch.equal(new[:2], old[:2])  # only the two tasks moved
        base_key = "roberta.encoder.layers.0.mixer.Wqkv.parametrizations.weight.original"
        assert torch.equal(f.get_tensor(base_key), g.get_tensor(base_key))
    reloaded = tamis.Embedder(out, dtype="float32")
    assert reloaded.tasks == base.tasks
    for t, vecs in before.items():
        now = reloaded.embed(texts, task=t)
        if t in ("retrieval.query", "retrieval.passage"):
            assert np.abs(now - vecs).max() > 1e-4
        else:
            np.testing.assert_allclose(now, vecs, atol=1e-6)
    with pytest.raises(tamis.errors.InvalidInputError, match="stacked"):
        tamis.Embedder(V3_TINY, adapters={"x": tmp_path})


# ------------------------------------------------------------------------------------ command line


def test_train_adapter_and_embedder_cli(encoder, pairs_dir, tmp_path, capsys):
    from tamis.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "embedder" in out and "adapter" in out
    for cmd in ("embedder", "adapter"):
        with pytest.raises(SystemExit):
            main(["train", cmd, "--help"])
        out = capsys.readouterr().out
        assert all(o in out for o in ("--matryoshka-dims", "--device", "--resume", "--mini-batch", "--scale"))
    with pytest.raises(SystemExit):
        main(["train", "adapter", "--data", str(pairs_dir), "--out", str(tmp_path / "x"), "--matryoshka-dims", "a"])
    args = ["--data", str(pairs_dir), "--model", str(encoder), "--mine", "bm25", "--skip-top", "0", "--dev", "4",
            "--batch-size", "6", "--max-steps", "2", "--eval-every", "2", "--lr", "1e-3", "-q",
            "--cache-dir", str(tmp_path / "cache")]
    assert main(["train", "adapter", "--task", "toy", "--rank", "4", "--out", str(tmp_path / "a"),
                 "--merge-into", str(tmp_path / "merged"), *args]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["steps"] == 2 and Path(printed["output"]).name == "adapter"
    texts = ["what is a kitten"]
    np.testing.assert_allclose(tamis.Embedder(tmp_path / "merged", dtype="float32").embed(texts),
                               tamis.Embedder(encoder, adapters={"toy": tmp_path / "a" / "adapter"}, dtype="float32").embed(texts, task="toy"),
                               atol=1e-5)
    assert main(["train", "embedder", "--out", str(tmp_path / "e"), "--matryoshka-dims", "32,16",
                 "--mini-batch", "4", *args]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit, match="also a training set"):  # one line, no traceback
        main(["train", "embedder", "--out", str(tmp_path / "r"), "--replay", str(pairs_dir), *args])
    assert main(["train", "embedder", "--out", str(tmp_path / "e"), "--matryoshka-dims", "32,16",
                 "--mini-batch", "4", "--resume", *args]) == 0  # already done: resumes at the end
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    assert tamis.Embedder(tmp_path / "e" / "model").embed(texts, dimensions=16).shape == (1, 16)
