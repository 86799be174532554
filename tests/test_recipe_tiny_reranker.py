"""recipes/tiny_reranker.py: the gate that decides whether a student becomes the default reranker, and the
model card it ships with (built from the run's own files, whatever the student's shape)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_reranker.py"


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("tiny_reranker_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _row(name: str, ndcg: float, hit3: float | None = None, mrr: float | None = None) -> dict:
    row = {"set": name, "first_stage": "bm25", "depth": 100, "nDCG@10": ndcg, "first:nDCG@10": 0.4}
    if hit3 is not None:
        row.update({"Hit@3": hit3, "MRR@10": mrr, "first:Hit@3": 0.5, "first:MRR@10": 0.4})
    return row


def _evals(student_dl21: float, student_lyft_mrr: float) -> dict:
    return {
        "embedding": [_row("trec-dl21", 0.5785), _row("scifact", 0.6635), _row("lyft", 0.66, 0.66, 0.58)],
        "teacher": [_row("trec-dl21", 0.6231), _row("scifact", 0.7126), _row("lyft", 0.74, 0.74, 0.65)],
        "student": [_row("trec-dl21", student_dl21), _row("scifact", 0.70), _row("lyft", 0.70, 0.70, student_lyft_mrr)],
    }


def test_ship_gate_needs_every_set_beaten_and_90_percent_of_the_teacher(recipe):
    assert recipe.ship_gate(_evals(0.60, 0.62)) == []
    short = recipe.ship_gate(_evals(0.489, 0.57))
    assert any(s.startswith("trec-dl21 nDCG@10 0.4890 <= embedding 0.5785") for s in short)
    assert any(s.startswith("lyft MRR@10 0.5700 <= embedding") for s in short)
    assert any("90 % of the teacher's 0.6231" in s for s in short)
    # above the embedding reranker but under 90 % of a stronger teacher still refuses
    strong_teacher = _evals(0.60, 0.62)
    strong_teacher["teacher"][0]["nDCG@10"] = 0.70
    assert recipe.ship_gate(strong_teacher) == ["trec-dl21 nDCG@10 0.6000 < 90 % of the teacher's 0.7000"]


def test_ship_card_describes_the_student_from_its_config(recipe, tmp_path):
    (tmp_path / "student" / "model").mkdir(parents=True)
    (tmp_path / "teacher").mkdir()
    (tmp_path / "student" / "model" / "config.json").write_text(json.dumps(
        {"num_hidden_layers": 3, "hidden_size": 384, "num_attention_heads": 12}))
    (tmp_path / "student" / "summary.json").write_text(json.dumps({
        "init": "encoder all-MiniLM-L6-v2 + fresh 1-logit head (seed 0), layers [0, 1, 2]", "cpu": "AMD EPYC",
        "parameters": {"parameters": 17_390_209}, "best_dev": 0.9082, "best_step": 900,
        "recipe": {"loss": "kl+0.2*infonce", "lr": 1e-4}}))
    (tmp_path / "teacher" / "summary.json").write_text(json.dumps({
        "members": ["dense:all-MiniLM-L6-v2", "splade:splade-tiny"], "weights": [0.4, 0.6], "scale": 2.6,
        "train lists": 6469, "dev nDCG@10": {"ensemble": 0.9126}}))
    evals = _evals(0.60, 0.62)  # the student's rows beside it, the teacher's and the embedding's in WORK
    (tmp_path / "student" / "eval.json").write_text(json.dumps({"student": evals.pop("student")}))
    (tmp_path / "eval.json").write_text(json.dumps(evals))
    (tmp_path / "student" / "bench.json").write_text(json.dumps({"ratios": {"rerank:student vs teacher": 31.5}}))
    card = recipe.ship_card(tmp_path)
    assert "a 3-layer, 384-wide cross-encoder initialised from all-MiniLM-L6-v2's encoder" in card
    assert "encoder all-MiniLM-L6-v2 + fresh 1-logit head (seed 0), layers [0, 1, 2]" in card
    assert "31.50x" in card and "96.3 %" in card  # speed ratio; student / teacher on DL21 (0.60 / 0.6231)
    assert "all-MiniLM-L6-v2 (teacher, negative mining, initial weights)" in card
    assert "SPLADE-tiny (teacher)" in card
    # another starting encoder is named as such, its licence left to its own card
    summary = json.loads((tmp_path / "student" / "summary.json").read_text())
    summary["init"] = "encoder splade-tiny + fresh 1-logit head (seed 0)"
    (tmp_path / "student" / "summary.json").write_text(json.dumps(summary))
    assert "initialised from SPLADE-tiny's encoder" in recipe.ship_card(tmp_path)
    summary["init"] = "encoder bge-small-en-v1.5 + fresh 1-logit head (seed 0), layers [0, 1]"
    (tmp_path / "student" / "summary.json").write_text(json.dumps(summary))
    card = recipe.ship_card(tmp_path)
    assert "initialised from bge-small-en-v1.5's encoder" in card and "SPLADE-tiny (teacher)" in card
    assert "bge-small-en-v1.5 (initial weights)" in card and "see its model card" in card


def test_each_student_keeps_its_own_evaluation_beside_the_shared_ones(recipe, tmp_path):
    evals = _evals(0.60, 0.62)
    (tmp_path / "eval.json").write_text(json.dumps({**evals, "student": [_row("trec-dl21", 0.1)]}))  # an old layout
    a, b = tmp_path / "student-a", tmp_path / "student-b"
    a.mkdir()
    (a / "eval.json").write_text(json.dumps({"student": evals["student"]}))
    assert recipe.load_evals(tmp_path, a) == evals
    assert "student" not in recipe.load_evals(tmp_path, b)  # not evaluated yet: no other student's rows


def test_passage_order_is_a_seeded_sample_sorted_within_windows(recipe):
    ids = [f"d{i}" for i in range(50)]
    texts = ["x" * ((i * 37) % 101) for i in range(50)]
    order = recipe.passage_order(ids, texts, seed=0, window=10)
    assert sorted(order) == list(range(50)) and order == recipe.passage_order(ids, texts, 0, 10)
    assert order != recipe.passage_order(ids, texts, 1, 10)
    for s in range(0, 50, 10):  # short passages first within each window: batches pad little
        lengths = [len(texts[i]) for i in order[s:s + 10]]
        assert lengths == sorted(lengths)
    # the first window is the first 10 of the seeded order, whatever the window size
    assert set(order[:10]) == set(recipe.passage_order(ids, texts, 0, 1)[:10])


def test_query_records_carry_over_sessions_through_the_snapshot(recipe, tmp_path):
    rows = [{"doc": f"d{i}", "query": f"q {i}", "prefix": i % 4} for i in (3, 1, 2)]
    run = tmp_path / "queries.jsonl"
    run.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"doc": "d9", "qu')  # the last line cut short
    snap = tmp_path / "snap.jsonl.gz"
    assert recipe.snapshot_records(run, snap) == 3
    first = snap.read_bytes()
    assert recipe.snapshot_records(run, snap) == 3 and snap.read_bytes() == first  # byte-stable
    fresh = tmp_path / "fresh" / "queries.jsonl"
    fresh.parent.mkdir()
    assert recipe.seed_records(fresh, snap) == 3 and recipe.seed_records(fresh, snap) == 0
    from tamis.train.querygen import read_records

    assert sorted(read_records(fresh)) == ["d1", "d2", "d3"]
    assert recipe.seed_records(run, snap) == 0 and recipe.seed_records(tmp_path / "x.jsonl", tmp_path / "none") == 0


def _gz(path: Path, rows: list[dict]) -> None:
    import gzip

    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


@pytest.mark.slow
def test_web_stage_filters_generated_queries_and_scores_every_web_list(recipe, tmp_path):
    """The 'web' stage on a miniature of ../shared/data: generated queries kept only where the fitted teacher
    ranks their source passage first, the real queries as label-free lists over pool + wiki + ARES passages,
    and the teacher's scores of both sets' lists under the ids the student's merged data gives them."""
    transformers = pytest.importorskip("transformers")
    import shutil

    import torch

    from conftest import QUESTIONS, TOPICS
    from tamis.evaluate.first_stage import EmbeddingCache
    from tamis.models.loading import resolve_model_dir
    from tamis.train import MiningConfig, prepare_data

    data = tmp_path / "data"
    passages = [(f"p-{t}{i}", x) for t, texts in TOPICS.items() for i, x in enumerate(texts)]
    _gz(data / "msmarco-v2-pool" / "corpus.jsonl.gz", [{"_id": d, "title": "", "text": x} for d, x in passages])
    _gz(data / "web-queries" / "queries.jsonl.gz",
        [{"_id": f"w{i}", "text": q, "source": "bing"} for i, q in enumerate(q for qs in QUESTIONS.values() for q in qs)])
    _gz(data / "wiki-vital" / "en" / "corpus.jsonl.gz", [{"_id": "en0", "title": "Tea", "text": "Tea is a drink."}])
    _gz(data / "ares-pairs" / "pairs.jsonl.gz", [{"query": "mars moons", "document": "Phobos orbits Mars.",
                                                   "label": 1, "source": "nq"}])
    work = tmp_path / "work"
    # generated queries: one per passage, written as the 'queries' stage writes them (one blank)
    qs = {d: (QUESTIONS[d[2:-1]][int(d[-1])] if d != "p-piano2" else "") for d, _ in passages}
    (work / "synthetic").mkdir(parents=True)
    (work / "synthetic" / "queries.jsonl").write_text(
        "".join(json.dumps({"doc": d, "query": q, "prefix": 0}) + "\n" for d, q in qs.items()))
    # a fitted teacher: MiniLM twice (as the mpnet member too) and a tiny random SPLADE with a small weight
    splade = tmp_path / "splade"
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.BertForMaskedLM(cfg).save_pretrained(splade, safe_serialization=True)
    shutil.copy(resolve_model_dir(None) / "tokenizer.json", splade / "tokenizer.json")
    (work / "teacher").mkdir()
    (work / "teacher" / "summary.json").write_text(json.dumps(
        {"members": ["dense:all-MiniLM-L6-v2", "dense:mpnet", "splade"], "weights": [0.45, 0.45, 0.1],
         "scale": 3.0}))
    models = recipe.TeacherModels(resolve_model_dir(None), splade)
    cache = EmbeddingCache(tmp_path / "cache")
    mining = MiningConfig(methods=("bm25", "dense"), n_negatives=15, skip_top=3, depth=50, dev=0.05,
                          max_dev_per_source=100, dev_depth=30)  # the recipe's
    recipe.build_web_sets(data, work, work / "web", 12, cache, models, mining, "cpu", "float32", 0, False)

    summary = json.loads((work / "web" / "summary.json").read_text())
    syn = summary["synthetic"]
    assert syn["records"] == 18 and syn["generated"] == 17 and 0 < syn["kept"] <= 17
    kept_qrels = (work / "web" / "synthetic" / "qrels" / "train.tsv").read_text().splitlines()[1:]
    assert len(kept_qrels) == syn["kept"] and all(q == f"s-{d}" for q, d, _ in (r.split("\t") for r in kept_qrels))
    assert summary["queries"] == {"queries": 12, "of": 18, "corpus": 20, "corpus parts": {
        "msmarco-v2-pool": 18, "wiki-vital/en": 1, "ares-pairs passages": 1}}
    # the scores cover exactly the lists the student will mine, named as its merged data names them
    for name, spec, prefix in (("synthetic", work / "web" / "synthetic", "synthetic-train/"),
                               ("queries", f"{work / 'web' / 'queries'}:unlabelled", "queries-unlabelled/")):
        prepared = prepare_data([str(spec)], work / "teacher" / "data", mining, 0, cache, False)
        rows = [json.loads(x) for x in (work / "web" / f"scores-{name}.jsonl").read_text().splitlines()]
        assert len(rows) == len(prepared.train) > 0
        for row, t in zip(rows, prepared.train):
            assert row["qid"] == prefix + t.qid
            assert set(row["scores"]) == {prefix + d for d in [*t.positives, *t.negatives]}
    # a rerun finds everything built and changes nothing
    before = (work / "web" / "scores-queries.jsonl").read_bytes()
    recipe.build_web_sets(data, work, work / "web", 12, cache, models, mining, "cpu", "float32", 0, False)
    assert (work / "web" / "scores-queries.jsonl").read_bytes() == before


def test_teacher_is_rebuilt_from_the_members_it_was_fitted_with(recipe, tmp_path):
    """--teacher-dense picks the dense members; a later stage rebuilds the fitted teacher from the member names in
    WORK/teacher/summary.json (in the fitted order) and refuses, naming the flag, when a member's model is not given."""
    from conftest import save_random_splade
    from tamis.evaluate.first_stage import EmbeddingCache
    from tamis.models.loading import resolve_model_dir

    splade, mini = tmp_path / "splade-tiny", resolve_model_dir(None)
    splade.mkdir()
    save_random_splade(splade)
    cache = EmbeddingCache(tmp_path / "cache")
    e5_only = recipe.TeacherModels(None, splade, mini)  # MiniLM stands in for e5-small
    names = [s.name for _, s in recipe.teacher_members(cache, e5_only, "cpu", "float32", False)]
    assert names == ["dense:all-MiniLM-L6-v2", "splade:splade-tiny", "dense:multilingual-e5-small@256"]
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "summary.json").write_text(json.dumps({"members": names, "weights": [0.2, 0.4, 0.4], "scale": 2.5}))
    fitted = recipe.teacher_scorer(teacher, cache, recipe.TeacherModels(mini, splade, mini), "cpu", "float32", False)
    assert [s.name for s in fitted.scorers] == names and fitted.weights == [0.2, 0.4, 0.4]  # no mpnet member added
    with pytest.raises(SystemExit, match="--teacher-dense with e5"):
        recipe.teacher_scorer(teacher, cache, recipe.TeacherModels(mini, splade, None), "cpu", "float32", False)
