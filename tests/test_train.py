"""Reranker training: data and dev splits, mining, teachers, trainer (loss goes down, resume is exact),
checkpoints in the Hugging Face layout that tamis and sentence-transformers load with the same scores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import tamis
from conftest import TOPICS
from tamis.models import bert
from tamis.models.loading import bundled_default_dir
from tamis.train import ListConfig, MiningConfig, TrainConfig, train_reranker
from tamis.train.cross_encoder import (
    ListBatcher,
    ListStep,
    init_cross_encoder,
    rerank_metrics,
    save_cross_encoder,
)
from tamis.train.data import TrainList, from_pairs, load_training_data, make_groups, split_dev
from tamis.train.mining import first_stage_runs, mine_lists
from tamis.train.teachers import (
    BM25Scorer,
    EnsembleScorer,
    RerankerScorer,
    build_scorer,
    score_cached,
    standardize,
)
from tamis.train.trainer import Trainer

SHARED = Path(__file__).resolve().parents[2] / "shared"
needs_data = pytest.mark.skipif(not (SHARED / "data" / "scifact").is_dir(), reason="../shared/data not present")


def _copy_minilm_tokenizer(d: Path) -> None:
    src = bundled_default_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copy(src / name, d / name)


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT encoder with random weights and MiniLM's tokenizer."""
    d = tmp_path_factory.mktemp("tiny-encoder")
    _copy_minilm_tokenizer(d)
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


def test_pairs_become_queries_documents_and_labels(pairs_dir):
    data = from_pairs(pairs_dir)
    assert len(data.queries) == 18 and len(data.corpus) == 18
    qid = next(q for q, t in data.queries.items() if t == "why do cats purr")
    assert [data.corpus[d] for d in data.positives(qid)] == [TOPICS["cats"][0]]
    assert [data.corpus[d] for d in data.labelled_negatives(qid)] == [TOPICS["tea"][0]]
    assert load_training_data(pairs_dir).queries == data.queries


def test_dev_split_is_deterministic_disjoint_and_refuses_test(pairs_dir, tmp_path):
    data = from_pairs(pairs_dir)
    train, dev = split_dev(data, 4, seed=1)
    assert len(dev) == 4 and not set(train) & set(dev) and len(train) + len(dev) == 18
    assert split_dev(data, 4, seed=1) == (train, dev)
    assert split_dev(data, 4, seed=2)[1] != dev
    (tmp_path / "qrels").mkdir()
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n")
    with pytest.raises(Exception, match="test split"):
        load_training_data(f"{tmp_path}:test")


def test_mining_skips_positives_and_top_ranks(pairs_dir):
    data = from_pairs(pairs_dir)
    qids = data.trainable_queries()
    runs = first_stage_runs(data, qids, methods=("bm25",), depth=20, show_progress=False)
    full = mine_lists(data, qids, runs, n_negatives=20, skip_top=0)
    skipped = mine_lists(data, qids, runs, n_negatives=20, skip_top=2)
    for a, b in zip(full, skipped):
        assert not set(a.positives) & set(a.negatives)
        labelled = data.labelled_negatives(a.qid)
        assert a.negatives[: len(labelled)] == labelled and a.labelled == len(labelled)
        mined_a, mined_b = a.negatives[a.labelled:], b.negatives[b.labelled:]
        assert mined_b == [d for d in mined_a if d not in mined_a[:2]]  # the two top-ranked are skipped
    groups = make_groups(full, 3, epoch=0, seed=0)
    assert all(len(docs) == 4 and docs[0] in data.positives(q) for q, docs in groups)
    cat_q = next(q for q, t in data.queries.items() if t == "why do cats purr")
    assert dict(groups)[cat_q][1] == data.labelled_negatives(cat_q)[0]  # judged negatives come first


def test_teacher_scores_from_a_file(pairs_dir, tmp_path):
    """Scores computed elsewhere are read as a teacher (the cache's JSONL format; later lines override);
    a pair the file lacks and a malformed line are one-line errors."""
    data = from_pairs(pairs_dir)
    q = data.trainable_queries()[0]
    docs = list(data.corpus)[:3]
    f = tmp_path / "teacher.jsonl"
    f.write_text(json.dumps({"qid": q, "scores": {docs[0]: 1.5, docs[1]: -2.0}}) + "\n\n"
                 + json.dumps({"qid": q, "scores": {docs[1]: 0.25}}) + "\n")
    scorer = build_scorer(f"scores={f}")
    assert scorer.name.startswith("scores:teacher-")
    f.write_text(f.read_text() + json.dumps({"qid": q, "scores": {docs[2]: 3.0}}) + "\n")
    assert build_scorer(f"scores={f}").name != scorer.name  # an edited file is another teacher (cache key)
    np.testing.assert_array_equal(scorer.score(data, [(q, docs[:2])])[0], np.array([1.5, 0.25], dtype=np.float32))
    with pytest.raises(ValueError, match=f"no score for query '{q}' and document '{docs[2]}'"):
        scorer.score(data, [(q, docs)])
    f.write_text('{"qid": "q1", "scores": [1, 2]}\n')
    with pytest.raises(ValueError, match="line 1: expected"):
        build_scorer(f"scores={f}")
    with pytest.raises(ValueError, match="not found"):
        build_scorer(f"scores={tmp_path / 'missing.jsonl'}")


def test_teacher_scores_cached_and_ensemble_learns_weights(pairs_dir, tmp_path):
    data = from_pairs(pairs_dir)
    lists = [(q, list(data.corpus)[:6]) for q in data.trainable_queries()]

    class Counting(BM25Scorer):
        calls = 0

        def score(self, data, lists):
            Counting.calls += 1
            return super().score(data, lists)

    scorer = Counting(show_progress=False)
    first = score_cached(scorer, data, lists, tmp_path)
    again = score_cached(scorer, data, lists, tmp_path)
    assert Counting.calls == 1 and all(np.array_equal(a, b) for a, b in zip(first, again))
    np.testing.assert_allclose(standardize(np.array([1.0, 2.0, 3.0])), [-1.2247449, 0.0, 1.2247449], rtol=1e-6)

    class Noise:
        name = "noise"

        def score(self, data, lists):
            rng = np.random.default_rng(0)
            return [rng.normal(size=len(d)).astype(np.float32) for _, d in lists]

    full_lists = [(q, data.positives(q) + [d for d in data.corpus if d not in data.positives(q)][:5])
                  for q in data.trainable_queries()]
    ens = EnsembleScorer([BM25Scorer(show_progress=False), Noise()])
    comps = ens.components(data, full_lists)
    labels = [np.array([1.0] + [0.0] * 5) for _ in full_lists]
    ens.fit(comps, labels)
    assert ens.weights[0] > abs(ens.weights[1]) and ens.scale > 0  # the informative scorer dominates


def _all_other_docs(data) -> list[TrainList]:
    return [TrainList(q, data.positives(q), [d for d in data.corpus if d not in data.positives(q)])
            for q in data.trainable_queries()]


def test_two_training_steps_lower_the_loss_and_write_a_loadable_checkpoint(pairs_dir, tiny_encoder, tmp_path):
    data = from_pairs(pairs_dir)
    lists = _all_other_docs(data)
    ce = init_cross_encoder(tiny_encoder, seed=0)
    assert ce.model.cfg.num_labels == 1 and "fresh 1-logit head" in ce.init
    batcher = ListBatcher(data, lists, ce.tokenizer, n_negatives=3, lists_per_batch=9, max_length=64)
    step = ListStep(ce, data, "infonce", max_length=64)

    def mean_loss() -> float:
        with torch.no_grad():
            return float(np.mean([step(b).loss.item() for b in batcher(0)]))

    before = mean_loss()
    cfg = TrainConfig(lr=3e-3, max_steps=2, warmup=0, schedule="constant", log_every=1, show_progress=False)
    out = tmp_path / "run"
    Trainer(ce.model, cfg, out, batcher, step, lambda d: save_cross_encoder(ce, d, max_length=64)).train()
    after = mean_loss()
    assert after < before
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2] and (out / "curve.png").stat().st_size > 1000
    rr = tamis.Reranker(out / "model", dtype="float32")
    docs = list(data.corpus.values())[:5]
    want = ce.reranker(64).logits("why do cats purr", docs)[0]
    np.testing.assert_allclose(rr.rerank("why do cats purr", docs, raw_scores=True).scores,
                               sorted(want, reverse=True), atol=1e-5)
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and config["num_hidden_layers"] == 2


def test_resume_continues_exactly(pairs_dir, tiny_encoder, tmp_path):
    data = from_pairs(pairs_dir)
    lists = _all_other_docs(data)

    def run(out: Path, fail_at: int | None, resume: bool) -> dict[str, torch.Tensor]:
        ce = init_cross_encoder(tiny_encoder, seed=0)
        batcher = ListBatcher(data, lists, ce.tokenizer, n_negatives=3, lists_per_batch=4, max_length=64)
        inner = ListStep(ce, data, "infonce", max_length=64)
        calls = {"n": 0}

        def step(batch):
            calls["n"] += 1
            if fail_at is not None and calls["n"] == fail_at:
                raise KeyboardInterrupt
            return inner(batch)

        cfg = TrainConfig(lr=1e-3, epochs=2, warmup=1, save_every=2, log_every=1, show_progress=False)
        Trainer(ce.model, cfg, out, batcher, step, lambda d: save_cross_encoder(ce, d)).train(resume=resume)
        return {k: v.clone() for k, v in ce.model.state_dict().items()}

    ce = init_cross_encoder(tiny_encoder, seed=0)
    n_batches = len(ListBatcher(data, lists, ce.tokenizer, 3, 4, 64)(0))
    assert n_batches >= 3
    straight = run(tmp_path / "a", None, False)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", fail_at=n_batches + 2, resume=False)  # dies in epoch 2, after a checkpoint
    state = json.loads((tmp_path / "b" / "checkpoint" / "trainer_state.json").read_text())
    assert 0 < state["step"] <= n_batches + 1 and state["step"] % 2 == 0
    resumed = run(tmp_path / "b", None, True)
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=1e-6)
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == list(range(1, 2 * n_batches + 1))  # each step logged once, none lost or repeated


def test_resume_refuses_a_checkpoint_made_with_other_settings(pairs_dir, tiny_encoder, tmp_path):
    """A checkpoint continued under another learning rate or another model description would silently mix
    two runs; a longer run (max_steps) or another evaluation cadence is a legitimate resume."""
    data = from_pairs(pairs_dir)
    lists = _all_other_docs(data)

    def trainer(cfg: TrainConfig, init: str) -> Trainer:
        ce = init_cross_encoder(tiny_encoder, seed=0)
        batcher = ListBatcher(data, lists, ce.tokenizer, n_negatives=3, lists_per_batch=4, max_length=64)
        step = ListStep(ce, data, "infonce", max_length=64)
        return Trainer(ce.model, cfg, tmp_path, batcher, step, lambda d: save_cross_encoder(ce, d),
                       describe={"title": "t: infonce", "init": init})

    base = dict(warmup=1, save_every=1, log_every=1, show_progress=False)
    trainer(TrainConfig(lr=1e-3, max_steps=2, **base), "encoder A").train()
    with pytest.raises(ValueError, match=r"cannot resume .*lr 0.001 -> 0.0003"):
        trainer(TrainConfig(lr=3e-4, max_steps=2, **base), "encoder A").train(resume=True)
    with pytest.raises(ValueError, match="init 'encoder A' -> 'encoder B'"):
        trainer(TrainConfig(lr=1e-3, max_steps=2, **base), "encoder B").train(resume=True)
    assert trainer(TrainConfig(lr=1e-3, max_steps=3, eval_every=5, **base), "encoder A").train(resume=True).steps == 3


def test_student_from_the_bundled_encoder_is_named_for_it():
    ce = init_cross_encoder("all-MiniLM-L6-v2", layers=[0, 1, 2])
    assert ce.model.cfg.num_hidden_layers == 3
    assert ce.init == "encoder all-MiniLM-L6-v2 + fresh 1-logit head (seed 0), layers [0, 1, 2]"


def test_student_by_layer_selection_and_sentence_transformers_interop(pairs_dir, tiny_encoder, tmp_path):
    teacher = init_cross_encoder(tiny_encoder, seed=0)
    save_cross_encoder(teacher, tmp_path / "teacher", max_length=128)
    student = init_cross_encoder(tmp_path / "teacher", layers=[1])
    assert student.model.cfg.num_hidden_layers == 1
    torch.testing.assert_close(student.model.bert.encoder.layer[0].attention.self.query.weight,
                               teacher.model.bert.encoder.layer[1].attention.self.query.weight)
    save_cross_encoder(student, tmp_path / "student", max_length=128, dtype=torch.float16)
    st = pytest.importorskip("sentence_transformers")
    data = from_pairs(pairs_dir)
    docs = list(data.corpus.values())
    ours = tamis.Reranker(tmp_path / "student", dtype="float32").score("why do cats purr", docs)
    theirs = st.CrossEncoder(str(tmp_path / "student"), device="cpu").predict([("why do cats purr", d) for d in docs])
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_student_from_an_mpnet_encoder_saves_the_official_layout(pairs_dir, tmp_path):
    """A student initialised from an MPNet encoder (all-mpnet-base-v2's architecture) is written as
    MPNetForSequenceClassification under its "mpnet." names: transformers loads every tensor, and tamis and
    sentence-transformers score the saved student alike."""
    transformers = pytest.importorskip("transformers")
    st = pytest.importorskip("sentence_transformers")
    enc = tmp_path / "mpnet"
    cfg = transformers.MPNetConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=514,
                                   relative_attention_num_buckets=32)
    torch.manual_seed(0)
    transformers.MPNetModel(cfg).save_pretrained(enc, safe_serialization=True)
    _copy_minilm_tokenizer(enc)  # WordPiece like MPNet's; tamis and ST read the same file
    student = init_cross_encoder(enc, layers=[1], seed=0)
    save_cross_encoder(student, tmp_path / "student", max_length=128)
    _, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "student", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    docs = list(from_pairs(pairs_dir).corpus.values())
    ours = tamis.Reranker(tmp_path / "student", dtype="float32").score("why do cats purr", docs)
    theirs = st.CrossEncoder(str(tmp_path / "student"), device="cpu").predict([("why do cats purr", d) for d in docs])
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_train_reranker_end_to_end_with_teacher_and_dev(pairs_dir, tiny_encoder, tmp_path):
    summary = train_reranker(
        [str(pairs_dir)], tmp_path / "run", model=str(tiny_encoder), teacher="ensemble:bm25,bm25",
        lists=ListConfig(n_negatives=3, lists_per_batch=4, max_length=64, loss="infonce+kl"),
        mining=MiningConfig(methods=("bm25",), n_negatives=8, skip_top=0, dev=4, dev_depth=10),
        config=TrainConfig(lr=1e-3, max_steps=3, eval_every=3, select_metric="nDCG@10", show_progress=False),
        cache_dir=tmp_path / "cache", show_progress=False)
    assert summary["steps"] == 3 and summary["best_dev"] is not None
    assert set(summary["last_dev"]) >= {"nDCG@10", "MRR@10", "Hit@10"}
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert "Apache" in card and "infonce+kl" in card
    assert isinstance(tamis.Reranker(tmp_path / "run" / "model"), tamis.rerank.CrossEncoderReranker)


def test_distill_cli_from_a_scores_file_into_layers_of_another_checkpoint(pairs_dir, tiny_encoder, tmp_path):
    """`tamis train distill --teacher scores=FILE --student MODEL --layers ...`: a teacher scored elsewhere
    distilled into a layer cut of another checkpoint."""
    from tamis.cli import main

    data = from_pairs(pairs_dir)
    bm25 = BM25Scorer(show_progress=False).score(data, [(q, list(data.corpus)) for q in data.queries])
    scores = tmp_path / "teacher.jsonl"
    scores.write_text("".join(json.dumps({"qid": q, "scores": dict(zip(data.corpus, map(float, s)))}) + "\n"
                              for q, s in zip(data.queries, bm25)))
    out = tmp_path / "run"
    assert main(["train", "distill", "--data", str(pairs_dir), "--out", str(out), "--teacher", f"scores={scores}",
                 "--student", str(tiny_encoder), "--layers", "1", "--loss", "kl", "--mine", "bm25", "--skip-top", "0",
                 "--mine-negatives", "8", "--negatives", "3", "--max-length", "64", "--max-steps", "2",
                 "--dev", "4", "--dev-depth", "10", "--cache-dir", str(tmp_path / "cache"), "-q"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["teacher"].startswith("scores:teacher-")
    assert json.loads((out / "model" / "config.json").read_text())["num_hidden_layers"] == 1


def test_layer_states_match_the_forward_and_hidden_mse_by_hand(pairs_dir, tiny_encoder):
    from tamis.rerank.cross_encoder import relevance_logits
    from tamis.train.cross_encoder import default_layer_map
    from tamis.train.losses import cls_distance, hidden_mse

    ce = init_cross_encoder(tiny_encoder, seed=0)
    docs = list(from_pairs(pairs_dir).corpus.values())[:4]
    padded = ce.tokenizer.pad(ce.tokenizer.encode_pairs(["why do cats purr"] * 4, docs, 64, truncate=True), "cpu")
    logits, states = relevance_logits(ce.model, padded, return_states=True)
    torch.testing.assert_close(logits, relevance_logits(ce.model, padded))  # the same modules as forward
    assert len(states) == 3 and states[-1].shape == (4, padded.input_ids.shape[1], 32)
    torch.testing.assert_close(states[-1], ce.model.encoder_model(padded.input_ids, padded.attention_mask,
                                                                  padded.token_type_ids))
    assert default_layer_map([0, 5], 2, 6) == [0, 1, 6] and default_layer_map(None, 2, 6) == [0, 3, 6]
    a = [torch.zeros(1, 3, 2), torch.ones(1, 3, 2)]
    b = [torch.zeros(1, 3, 2), torch.full((1, 3, 2), 5.0), torch.full((1, 3, 2), 3.0)]
    mask = torch.tensor([[1, 1, 0]])
    b[2][0, 2] = 100.0  # a padding position: ignored
    assert hidden_mse(a, b, [0, 2], mask).item() == pytest.approx((0 + 4) / 2)
    # cls: only the first token of the mapped layers (not the embeddings), after L2 normalisation
    s = [torch.zeros(1, 3, 2), torch.tensor([[[3.0, 0.0], [9.0, 9.0], [9.0, 9.0]]])]
    t = [torch.zeros(1, 3, 2), torch.tensor([[[0.0, 2.0], [0.0, 0.0], [0.0, 0.0]]]),
         torch.tensor([[[5.0, 0.0], [1.0, 1.0], [1.0, 1.0]]])]
    assert cls_distance(s, t, [0, 1]).item() == pytest.approx(2.0)  # orthogonal unit vectors
    assert cls_distance(s, t, [0, 2]).item() == pytest.approx(0.0)  # same direction, other length


def test_hidden_state_distillation_trains_a_layer_selected_student(pairs_dir, tiny_encoder, tmp_path):
    teacher = init_cross_encoder(tiny_encoder, seed=0)
    with torch.no_grad():  # a head that tells documents apart, so the teacher's lists are not flat
        torch.nn.init.normal_(teacher.model.classifier.weight, std=3.0)
    save_cross_encoder(teacher, tmp_path / "teacher", max_length=64)
    data = from_pairs(pairs_dir)
    lists = _all_other_docs(data)
    student = init_cross_encoder(tmp_path / "teacher", layers=[1])
    live = init_cross_encoder(tmp_path / "teacher")
    batcher = ListBatcher(data, lists, student.tokenizer, n_negatives=3, lists_per_batch=9, max_length=64)
    step = ListStep(student, data, "kl+hidden+cls", 64, teacher_model=live, layer_map=[0, 2])
    batch = batcher(0)[0]
    with torch.no_grad():
        first = step(batch)
    assert first.metrics["loss_hidden"] > 0 and first.metrics["loss_kl"] > 0 and first.metrics["loss_cls"] > 0
    opt = torch.optim.AdamW(student.model.parameters(), lr=3e-3)
    for _ in range(5):
        opt.zero_grad()
        step(batch).loss.backward()
        opt.step()
    with torch.no_grad():
        last = step(batch)
    assert all(last.metrics[k] < first.metrics[k] for k in ("loss_hidden", "loss_kl", "loss_cls"))
    assert not any(p.requires_grad for p in live.model.parameters())  # the teacher stays frozen
    for term in ("hidden", "cls"):
        with pytest.raises(ValueError, match="teacher model"):
            ListStep(student, data, term, 64)
    summary = train_reranker(  # end to end: the live teacher replaces the cached scores
        [str(pairs_dir)], tmp_path / "run", model=str(tmp_path / "teacher"), layers=[1],
        teacher=str(tmp_path / "teacher"),
        lists=ListConfig(n_negatives=3, lists_per_batch=4, max_length=64, loss="kl+0.5*hidden"),
        mining=MiningConfig(methods=("bm25",), n_negatives=8, skip_top=0, dev=4, dev_depth=10),
        config=TrainConfig(lr=1e-3, max_steps=2, eval_every=2, select_metric="nDCG@10", show_progress=False),
        cache_dir=tmp_path / "cache", show_progress=False)
    assert summary["steps"] == 2 and "live" in summary["teacher"]
    assert summary["recipe"]["hidden-state map"].endswith("[0, 2]")
    assert not (tmp_path / "run" / "teacher").exists()  # nothing pre-scored
    with pytest.raises(ValueError, match="cross-encoder directory"):
        train_reranker([str(pairs_dir)], tmp_path / "bad", model=str(tmp_path / "teacher"), layers=[1],
                       teacher="ensemble:bm25", lists=ListConfig(loss="hidden"),
                       mining=MiningConfig(methods=("bm25",), dev=0), cache_dir=tmp_path / "cache",
                       show_progress=False)


@needs_data
def test_rerank_metrics_on_real_dev_slice():
    data = load_training_data(SHARED / "data" / "scifact")
    _, dev = split_dev(data, 5, seed=0)
    runs = first_stage_runs(data, dev, methods=("bm25",), depth=10, show_progress=False)
    bm25 = RerankerScorer(tamis.Reranker(), show_progress=False)
    m = rerank_metrics(bm25.reranker, data, runs["bm25"])
    assert 0.0 <= m["nDCG@10"] <= 1.0 and set(m) == {"nDCG@10", "MRR@10", "Hit@10"}


def test_train_cli_help_and_bad_arguments(capsys):
    from tamis.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "reranker" in out and "distill" in out
    with pytest.raises(SystemExit):
        main(["train", "distill", "--help"])
    out = capsys.readouterr().out
    assert all(opt in out for opt in ("--teacher", "--layers", "--device", "--resume", "--eval-data"))
    with pytest.raises(SystemExit) as exc:
        main(["train", "distill", "--data", "x", "--out", "y", "--teacher", "t"])
    assert "give --layers" in str(exc.value.code)
    with pytest.raises(SystemExit) as exc:
        main(["train", "distill", "--data", "x", "--out", "y", "--teacher", "scores=t.jsonl", "--layers", "0,1"])
    assert "is a scorer, not a cross-encoder" in str(exc.value.code)
    with pytest.raises(SystemExit):
        main(["train", "reranker", "--data", "x", "--out", "y", "--layers", "a,b"])


@needs_data
def test_scorer_suite_scores_the_same_candidates_as_the_reranker_suite(tmp_path):
    """A teacher scored as a cached list scorer (each text encoded once) and the same model run as a reranker
    give the same metrics on the same candidates; an ensemble of one member is that member, and the dense
    scorer can encode only the listed documents under a name of its own (its cache file)."""
    from tamis.evaluate.suite import rerank_suite, scorer_suite
    from tamis.train.teachers import DenseScorer, EnsembleScorer

    emb = tamis.Embedder(dtype="float32")
    dense = DenseScorer(emb, show_progress=False, whole_corpus=False, name="dense:minilm-lists")
    want = rerank_suite(tamis.Reranker("embedding", dtype="float32"), SHARED / "data", sets=("noveleval",),
                        dtype="float32", cache_dir=tmp_path, show_progress=False)[0]
    got = scorer_suite(dense, SHARED / "data", tmp_path, sets=("noveleval",), dtype="float32", show_progress=False)[0]
    assert (tmp_path / "noveleval-test--dense_minilm-lists.jsonl").is_file()
    for k in ("nDCG@10", "MRR@10", "first:nDCG@10"):
        assert got[k] == pytest.approx(want[k], abs=1e-4), k
    one = scorer_suite(EnsembleScorer([dense], [1.0], 1.0), SHARED / "data", tmp_path, sets=("noveleval",),
                       dtype="float32", show_progress=False)[0]
    assert one["nDCG@10"] == pytest.approx(want["nDCG@10"], abs=1e-4) and one["reranker"].startswith("ensemble(")


@pytest.fixture
def pairs_with_unlabelled(pairs_dir, tmp_path) -> Path:
    """The toy pairs plus two queries judged only not relevant (as ARES's "not relevant" pairs)."""
    import gzip

    d = tmp_path / "pairs-unlabelled"
    d.mkdir()
    with gzip.open(pairs_dir / "pairs.jsonl.gz", "rt") as f:
        rows = [json.loads(x) for x in f]
    rows += [{"source": "toy", "query": "what is the rust belt", "document": TOPICS["rust"][0], "label": 0},
             {"source": "toy", "query": "do cats like tea", "document": TOPICS["tea"][1], "label": 0}]
    with gzip.open(d / "pairs.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return d


def test_unlabelled_set_gives_label_free_lists_only(tmp_path):
    """``DIR:unlabelled``: a corpus and real queries without judgments (web search queries beside a pooled
    corpus) are all label-free queries, and prepare_data mines their candidate lists."""
    import gzip

    from tamis.train.rerankers import prepare_data

    d = tmp_path / "web"
    d.mkdir()
    docs = [(f"{t}{i}", text) for t, texts in TOPICS.items() for i, text in enumerate(texts)]
    with gzip.open(d / "corpus.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"_id": i, "title": "", "text": x}) + "\n" for i, x in docs)
    with gzip.open(d / "queries.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"_id": q, "text": x}) + "\n"
                     for q, x in (("w1", "rust belt towns"), ("w2", "tea for cats"), ("w3", "  ")))
    data = load_training_data(f"{d}:unlabelled")
    assert data.name == "web-unlabelled" and len(data.corpus) == len(docs)
    assert data.unlabelled_queries() == ["w1", "w2"] and data.trainable_queries() == []  # the blank query is dropped
    assert split_dev(data, 0.5) == ([], [])
    cfg = MiningConfig(methods=("bm25",), n_negatives=2, skip_top=0, depth=10, label_free=True)
    prepared = prepare_data([f"{d}:unlabelled"], tmp_path / "prep", cfg, show_progress=False)
    assert [t.qid for t in prepared.train] == ["w1", "w2"] and prepared.dev_run == {}
    assert all(not t.positives and t.labelled == 0 and len(t.negatives) == 3 for t in prepared.train)
    # such a set exists for its label-free lists: they are mined without asking too
    off = MiningConfig(methods=("bm25",), n_negatives=2, skip_top=0, depth=10)
    assert prepare_data([f"{d}:unlabelled"], tmp_path / "prep-off", off, show_progress=False).train == prepared.train
    with pytest.raises(Exception, match="does not exist"):
        load_training_data(f"{tmp_path / 'nope'}:unlabelled")


def test_label_free_lists_of_queries_without_a_positive(pairs_with_unlabelled, tmp_path):
    """Judged queries without a relevant document become candidate-only lists (labelled non-relevant first,
    then mined; k + 1 per group), only when asked; a BEIR split's unjudged (test) queries never do."""
    from tamis.train.rerankers import check_label_free_loss

    data = from_pairs(pairs_with_unlabelled)
    free = data.unlabelled_queries()
    assert sorted(data.queries[q] for q in free) == ["do cats like tea", "what is the rust belt"]
    assert not set(free) & set(data.trainable_queries())
    runs = first_stage_runs(data, free, methods=("bm25",), depth=20, show_progress=False)
    assert mine_lists(data, free, runs, n_negatives=2, skip_top=0) == []
    lists = mine_lists(data, free, runs, n_negatives=2, skip_top=0, label_free=True)
    assert len(lists) == 2 and all(not t.positives and t.labelled == 1 for t in lists)
    for t in lists:  # the judged non-relevant document, then what BM25 finds (at most k + 1 = 3 of them)
        assert t.negatives[0] == data.labelled_negatives(t.qid)[0] and 1 < len(t.negatives) <= 4
    full = [t for t in lists if len(t.negatives) >= 3]
    groups = make_groups(lists, 2, epoch=0, seed=0)
    assert len(groups) == len(full) >= 1
    for (q, docs), t in zip(groups, full):
        assert len(docs) == 3 and docs[0] == data.labelled_negatives(q)[0] and set(docs) <= set(t.negatives)

    scifact = SHARED / "data" / "scifact"
    if scifact.is_dir():  # its queries file also holds the 300 test queries: none may be "unlabelled"
        sf = load_training_data(str(scifact))
        assert sf.unlabelled_queries() == []

    check_label_free_loss("kl+0.2*infonce", True)
    check_label_free_loss("listnet", True)
    for loss, teacher in (("infonce", True), ("kl", False), ("kl+bce", True), ("margin-mse+lambda", True)):
        with pytest.raises(ValueError, match="label-free"):
            check_label_free_loss(loss, teacher)


def test_train_reranker_with_label_free_lists(pairs_with_unlabelled, tiny_encoder, tmp_path):
    summary = train_reranker(
        [str(pairs_with_unlabelled)], tmp_path / "run", model=str(tiny_encoder), teacher="ensemble:bm25,bm25",
        lists=ListConfig(n_negatives=3, lists_per_batch=4, max_length=64, loss="kl+0.2*infonce"),
        mining=MiningConfig(methods=("bm25",), n_negatives=8, skip_top=0, dev=4, dev_depth=10, label_free=True),
        config=TrainConfig(lr=1e-3, max_steps=2, show_progress=False), cache_dir=tmp_path / "cache",
        show_progress=False)
    sizes = summary["sizes"][next(iter(summary["sizes"]))]
    assert sizes["label_free_lists"] == 2 and summary["steps"] == 2
    assert "label-free" in summary["recipe"]["negatives"]
    with pytest.raises(ValueError, match="label-free"):
        train_reranker([str(pairs_with_unlabelled)], tmp_path / "bad", model=str(tiny_encoder),
                       lists=ListConfig(loss="infonce"), mining=MiningConfig(methods=("bm25",), label_free=True),
                       show_progress=False)


def test_train_mines_with_the_fast_dtype_and_names_the_quick_option(pairs_dir, tmp_path, monkeypatch, capsys):
    """`tamis train` mines with the fast dtype tamis eval uses (so eval's cached embeddings serve it) and says
    what mining costs and that --mine bm25 is quicker; a recipe's MiningConfig keeps float32 and its caches."""
    import tamis.embed
    from tamis.cli import parse_args
    from tamis.train.rerankers import prepare_data

    for command in (["reranker"], ["distill", "--teacher", "t"], ["embedder"], ["adapter", "--task", "t"]):
        assert parse_args(["train", *command, "--data", "x", "--out", "o"]).mine_dtype == "auto"
    seen = []

    class Spy(tamis.embed.Embedder):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs.get("dtype"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tamis.embed, "Embedder", Spy)
    cfg = MiningConfig(methods=("bm25", "dense"), n_negatives=2, skip_top=0, depth=10, dev=1, dtype="auto")
    prepare_data([str(pairs_dir)], tmp_path / "auto", cfg, show_progress=True)
    err = capsys.readouterr().err
    assert seen == ["auto"] and "--mine bm25 is the quick option" in err and "documents and" in err
    prepare_data([str(pairs_dir)], tmp_path / "f32", MiningConfig(methods=("bm25", "dense"), n_negatives=2,
                                                                  skip_top=0, depth=10, dev=1), show_progress=False)
    assert seen == ["auto", "float32"]
    meta = json.loads(next((tmp_path / "f32").glob("mining-*.json")).read_text())
    assert "dtype" not in meta  # float32, the old default: lists mined before stay valid
