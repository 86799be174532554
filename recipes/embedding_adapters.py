"""Recipe: task adapters and Matryoshka training of the default model (all-MiniLM-L6-v2), end to end.

    python recipes/embedding_adapters.py [--work runs/embedding-adapters] [--device cpu] [--stages ...]

Stages (each cached under --work; a rerun continues where it stopped; numbers go to --work/results.json):
  lyft        a LoRA retrieval adapter ("lyft") trained on llamaindex-10k-lyft questions (a set that is only
              training data: its one qrels file is named test.tsv). A dev slice of 15 % of the questions is
              held out *with their chunks*: no training query has them as positive or negative, so the dev
              slice measures questions and documents the adapter never saw; it also picks the checkpoint.
              General-domain ARES pairs (Apache-2.0) are replayed beside the lyft questions, as many queries
              as lyft trains on (`--lyft-replay none`: lyft alone), so that the adapter keeps its quality out
              of domain: trained on lyft alone it cost SciFact test -0.0276 nDCG@10 (1,000-document sample).
  scifact     a LoRA adapter ("scifact") trained on SciFact *train* queries only (5 % held out for dev).
  matryoshka  all weights of the default model trained on SciFact train with the Matryoshka loss over
              384/256/128/64/32 dimensions (5 % held out for dev).
  evaluate    base vs lyft adapter on the lyft dev slice (whole corpus, and its held-out chunks alone);
              base vs each adapter on SciFact test; base (plain truncation) vs Matryoshka model on SciFact
              test at 32/64/128/256/384 dimensions (+ matryoshka.png). Test queries are used here only.
  mixed       one batch mixing rows of no adapter / lyft / scifact vs single-task batches (max |diff|), and
              the merged lyft export loaded by sentence-transformers vs the adapter (max |diff|).
  overhead    per-request latency with and without an adapter (median of interleaved repeats, one process).

Budget. The defaults fit about 35 minutes on 2 CPU cores (estimated from the speeds in
../shared/docs/training.md §3: ~0.33 s per 256-token text forward+backward, ~0.1 s per text to embed), so they
are smaller than the issue's full setting; each cut is a flag:
  - default stages: lyft, evaluate, mixed, overhead, matryoshka, evaluate (most important first). The scifact
    adapter stage is left out (`--stages all` runs it: ~25 more minutes with its evaluation);
  - lyft adapter: 2 epochs (72 steps of 32 questions, half of them replayed ARES queries); Matryoshka: 1 epoch
    (24 steps); no GradCache (`--mini-batch 0`: MiniLM at 32 queries fits in memory; GradCache only adds a
    forward pass on a CPU);
  - SciFact sets mine negatives with BM25 only (`--scifact-mining bm25`; dense mining embeds 5,183 abstracts,
    ~9 minutes) and pick checkpoints on 500 dev documents;
  - SciFact test is scored over its 300 queries against their relevant abstracts plus a seeded sample of the
    others, 1,000 documents in all (`--scifact-docs 1000`; 0: the whole 5,183-document corpus, where the base
    model scores nDCG@10 0.6451; each full pass costs ~9 minutes). Base and trained models are scored on the
    same documents, so the changes are comparable, but absolute numbers are not the full-corpus ones.
Full setting: `--stages all --lyft-epochs 3 --matryoshka-epochs 2 --scifact-docs 0 --scifact-mining bm25,dense`
(~2.5 hours on 2 cores).

--smoke: 3 optimizer steps per training and small evaluation slices, to check the pipeline in minutes;
its numbers are marked "smoke" and mean nothing.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
STAGES = ("lyft", "scifact", "matryoshka", "evaluate", "mixed", "overhead")
BUDGET_STAGES = "lyft,evaluate,mixed,overhead,matryoshka,evaluate"  # the default: most important first
DIMS = (384, 256, 128, 64, 32)
LYFT_DEV = 0.15


def log(msg: str) -> None:
    print(f"[recipe {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Results:
    def __init__(self, path: Path, smoke: bool):
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        if self.data.get("smoke", smoke) != smoke:
            self.data = {}  # never mix smoke numbers with real ones
        self.data["smoke"] = smoke

    def put(self, key: str, value: Any) -> None:
        from tamis.train.card import cpu_model

        self.data[key] = value
        self.data["cpu"] = cpu_model()
        self.path.write_text(json.dumps(self.data, indent=1, default=str))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "runs" / "embedding-adapters"))
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--device", default="cpu")
    p.add_argument("--stages", default=BUDGET_STAGES,
                   help=f"comma list of {', '.join(STAGES)}, or all (default {BUDGET_STAGES})")
    p.add_argument("--lyft-epochs", type=int, default=2)
    p.add_argument("--scifact-epochs", type=int, default=2)
    p.add_argument("--matryoshka-epochs", type=int, default=1)
    p.add_argument("--lyft-lr", type=float, default=3e-4)
    p.add_argument("--lyft-replay", default="ares-pairs",
                   help="general-domain set (under --data) replayed in the lyft batches; none: lyft alone")
    p.add_argument("--lyft-replay-queries", type=int, default=None,
                   help="replayed queries (default: as many as lyft trains on)")
    p.add_argument("--scifact-lr", type=float, default=3e-4)
    p.add_argument("--matryoshka-lr", type=float, default=2e-5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--mini-batch", type=int, default=0, help="GradCache chunk (texts with gradients at once; 0: off)")
    p.add_argument("--scifact-mining", default="bm25", help="first stages mining SciFact negatives (bm25,dense)")
    p.add_argument("--dev-docs", type=int, default=500, help="SciFact dev documents for checkpoint selection")
    p.add_argument("--scifact-docs", type=int, default=1000,
                   help="SciFact test documents scored (relevant ones + a seeded sample; 0: the whole corpus)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-steps", type=int, default=None, help="cap every training (smoke runs)")
    p.add_argument("--smoke", action="store_true", help="3 steps per training, small evaluation slices")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    stages = STAGES if args.stages == "all" else tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        p.error(f"unknown stages {unknown}; use {', '.join(STAGES)}")
    if args.smoke and args.max_steps is None:
        args.max_steps = 3
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    res = Results(work / "results.json", args.smoke)
    data = Path(args.data)
    show = not args.quiet
    from tamis.evaluate.first_stage import quiet_truncation

    for stage in stages:
        t0 = time.perf_counter()
        log(f"{stage}: start")
        with quiet_truncation():  # long documents are cut at the model's 256 tokens, as in every evaluation
            STAGE_FNS[stage](args, work, data, res, show)
        log(f"{stage}: done in {time.perf_counter() - t0:.0f} s")
    log(f"results: {work / 'results.json'}")
    return 0


# ------------------------------------------------------------------------------------ training


def _train(args: argparse.Namespace, work: Path, sets: list[str], name: str, epochs: int, lr: float,
           adapter: Any, dev: float, show: bool, methods: tuple[str, ...] = ("bm25", "dense"),
           **kw: Any) -> dict[str, Any]:
    from tamis.train import EmbeddingConfig, MiningConfig, TrainConfig, train_embedder

    cfg = TrainConfig(lr=lr, epochs=epochs, max_steps=args.max_steps, warmup=0.1, weight_decay=0.0 if adapter else 0.01,
                      seed=args.seed, device=args.device, select_metric="nDCG@10", log_every=5, show_progress=show)
    small = args.smoke  # smoke: tiny batches, so that 3 steps take seconds
    embedding = EmbeddingConfig(batch_size=4 if small else args.batch_size,
                                mini_batch=4 if small else (args.mini_batch or None),
                                hard_negatives=1,
                                matryoshka_dims=kw.pop("dims", None), max_length=256)
    if args.smoke:  # no corpus embedding pass for mining
        methods = ("bm25",)
    mining = MiningConfig(methods=methods, n_negatives=10, skip_top=3, depth=50, dev=dev)
    if small:
        kw["max_dev_docs"] = 60
    return train_embedder(sets, work / name, model=None, embedding=embedding, mining=mining, config=cfg,
                          adapter=adapter, resume=True, cache_dir=work / "cache", name=f"all-MiniLM-L6-v2-{name}",
                          command=f"python recipes/embedding_adapters.py --stages {name}", show_progress=show, **kw)


def stage_lyft(args, work, data, res, show) -> None:
    from tamis.train import AdapterConfig

    replay = [] if args.lyft_replay in ("", "none") else [str(data / args.lyft_replay)]
    s = _train(args, work, [f"{data / 'llamaindex-10k-lyft'}:test"], "lyft", args.lyft_epochs, args.lyft_lr,
               AdapterConfig("lyft", r=args.rank, alpha=2.0 * args.rank), LYFT_DEV, show, allow_test=True,
               unseen_dev_docs=True, merge_into=work / "lyft" / "merged", replay=replay,
               replay_queries=args.lyft_replay_queries)
    res.put("train_lyft", {k: s[k] for k in ("steps", "train_seconds", "best_dev", "best_step", "recipe", "sizes")})


def _methods(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(m.strip() for m in args.scifact_mining.split(",") if m.strip())


def stage_scifact(args, work, data, res, show) -> None:
    from tamis.train import AdapterConfig

    s = _train(args, work, [f"{data / 'scifact'}:train"], "scifact", args.scifact_epochs, args.scifact_lr,
               AdapterConfig("scifact", r=args.rank, alpha=2.0 * args.rank), 0.05, show,
               methods=_methods(args), max_dev_docs=args.dev_docs)
    res.put("train_scifact", {k: s[k] for k in ("steps", "train_seconds", "best_dev", "best_step", "recipe", "sizes")})


def stage_matryoshka(args, work, data, res, show) -> None:
    s = _train(args, work, [f"{data / 'scifact'}:train"], "matryoshka", args.matryoshka_epochs, args.matryoshka_lr, None, 0.05,
               show, dims=DIMS, methods=_methods(args), max_dev_docs=args.dev_docs)
    res.put("train_matryoshka", {k: s[k] for k in ("steps", "train_seconds", "best_dev", "best_step", "recipe",
                                                   "sizes")})


# ------------------------------------------------------------------------------------ evaluation


def _scifact_test(data: Path, smoke: bool, n_docs: int) -> tuple[dict[str, str], dict[str, str], dict]:
    from tamis.evaluate.datasets import load_dataset

    ds = load_dataset(data / "scifact", split="test")
    corpus = dict(zip(ds.corpus.ids, ds.corpus.documents(with_title=True)))
    queries, qrels = dict(ds.queries), ds.qrels
    if n_docs and not smoke and n_docs < len(corpus):  # the relevant documents + a seeded sample of the others
        must = {d for q in queries for d in qrels.get(q, {}) if d in corpus}
        rest = sorted(d for d in corpus if d not in must)
        keep = must | set(random.Random(0).sample(rest, max(0, n_docs - len(must))))
        corpus = {d: t for d, t in corpus.items() if d in keep}
    if smoke:  # 20 queries over their documents + 60 others
        qids = sorted(queries)[:20]
        queries = {q: queries[q] for q in qids}
        keep = {d for q in qids for d in qrels[q]} | set(random.Random(0).sample(sorted(corpus), 60))
        corpus = {d: t for d, t in corpus.items() if d in keep}
    return corpus, queries, qrels


def _lyft_dev(data: Path, seed: int, smoke: bool) -> tuple[dict[str, str], dict[str, str], dict, set[str]]:
    from tamis.train.data import load_training_data, split_dev_unseen

    d = load_training_data(f"{data / 'llamaindex-10k-lyft'}:test", allow_test=True)
    _, dev_q, dev_docs = split_dev_unseen(d, LYFT_DEV, seed)  # the slice training held out
    corpus = d.corpus
    if smoke:  # 20 dev questions over their chunks + 40 others
        dev_q = dev_q[:20]
        dev_docs = {x for q in dev_q for x in d.positives(q)}
        keep = dev_docs | set(random.Random(0).sample(sorted(corpus), 40))
        corpus = {x: t for x, t in corpus.items() if x in keep}
    return corpus, {q: d.queries[q] for q in dev_q}, {q: d.qrels[q] for q in dev_q}, dev_docs


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before[k], 4) for k in after if k in before}


def stage_evaluate(args, work, data, res, show) -> None:
    import tamis
    from tamis.train.embedder import retrieval_metrics

    out: dict[str, Any] = res.data.get("evaluate", {})
    base = tamis.Embedder()
    sf_corpus, sf_queries, sf_qrels = _scifact_test(data, args.smoke, args.scifact_docs)
    sf_desc = {"queries": len([q for q in sf_queries if q in sf_qrels]), "documents": len(sf_corpus),
               "sample": "whole corpus" if len(sf_corpus) == 5183 else "relevant documents + a seeded sample (seed 0)"}
    if out.get("scifact_test_corpus") != sf_desc:  # never compare numbers taken on different documents
        out = {k: v for k, v in out.items() if not k.startswith("scifact_test/")}
        out["scifact_test_corpus"] = sf_desc
    ly_corpus, ly_queries, ly_qrels, ly_held = _lyft_dev(data, args.seed, args.smoke)
    ly_held_corpus = {d: ly_corpus[d] for d in ly_held}

    def scifact(emb, task=None, dims=None):
        return retrieval_metrics(emb, sf_corpus, sf_queries, sf_qrels, task, task, dims, show_progress=show)

    def lyft(emb, task=None):
        return {"whole corpus": retrieval_metrics(emb, ly_corpus, ly_queries, ly_qrels, task, task),
                "held-out chunks only": retrieval_metrics(emb, ly_held_corpus, ly_queries, ly_qrels, task, task)}

    def step(key, fn):
        if key not in out:
            log(f"evaluate: {key}")
            out[key] = fn()
            res.put("evaluate", out)
        return out[key]

    base_sf = step("scifact_test/base", lambda: scifact(base, dims=DIMS))
    base_ly = step("lyft_dev/base", lambda: lyft(base))
    if (work / "lyft" / "adapter").is_dir():
        emb = tamis.Embedder(adapters={"lyft": work / "lyft" / "adapter"})
        ly = step("lyft_dev/lyft-adapter", lambda: lyft(emb, "lyft"))
        ood = step("scifact_test/lyft-adapter", lambda: scifact(emb, "lyft"))
        out["lyft_lift"] = {k: _delta(ly[k], base_ly[k]) for k in ly}
        out["lyft_adapter_scifact_change"] = round(ood["nDCG@10"] - base_sf["nDCG@10"], 4)
    if (work / "scifact" / "adapter").is_dir():
        emb = tamis.Embedder(adapters={"scifact": work / "scifact" / "adapter"})
        sf = step("scifact_test/scifact-adapter", lambda: scifact(emb, "scifact"))
        out["scifact_adapter_lift"] = _delta(sf, base_sf)
    if (work / "matryoshka" / "model").is_dir():
        mat = step("scifact_test/matryoshka", lambda: scifact(tamis.Embedder(work / "matryoshka" / "model"), dims=DIMS))
        curve = {"dims": list(DIMS), "base": [_at(base_sf, d) for d in DIMS], "matryoshka": [_at(mat, d) for d in DIMS]}
        out["matryoshka_curve_nDCG@10"] = curve
        plot(curve, work / "matryoshka.png", args.smoke)
    res.put("evaluate", out)
    for k in ("lyft_lift", "lyft_adapter_scifact_change", "scifact_adapter_lift", "matryoshka_curve_nDCG@10"):
        if k in out:
            log(f"{k}: {json.dumps(out[k])}")


def _at(metrics: dict[str, float], dim: int) -> float:
    return metrics["nDCG@10"] if dim == 384 else metrics[f"nDCG@10/d{dim}"]


def plot(curve: dict[str, Any], path: Path, smoke: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(curve["dims"], curve["base"], "o-", label="all-MiniLM-L6-v2, truncated")
    ax.plot(curve["dims"], curve["matryoshka"], "s-", label="Matryoshka-trained (SciFact train)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(curve["dims"])
    ax.set_xticklabels([str(d) for d in curve["dims"]])
    ax.set_xlabel("dimensions kept")
    ax.set_ylabel("SciFact test nDCG@10")
    ax.set_title("Matryoshka training" + (" (SMOKE: meaningless)" if smoke else ""))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------ mixed batches, export


def _texts(data: Path, n: int) -> list[str]:
    from tamis.evaluate.datasets import load_dataset

    sf = load_dataset(data / "scifact", split="test")
    ly = load_dataset(data / "llamaindex-10k-lyft", split="test")
    docs = sf.corpus.documents(with_title=True)
    return [t for trio in zip(list(sf.queries.values()), list(ly.queries.values()), docs) for t in trio][:n]


def _adapters(work: Path) -> dict[str, Path]:
    """The trained adapters (lyft is required; scifact when its stage ran)."""
    found = {t: work / t / "adapter" for t in ("lyft", "scifact") if (work / t / "adapter").is_dir()}
    if "lyft" not in found:
        raise SystemExit(f"no lyft adapter under {work}: run the lyft stage first")
    return found


def stage_mixed(args, work, data, res, show) -> None:
    import numpy as np

    import tamis

    adapters = _adapters(work)
    emb = tamis.Embedder(adapters=adapters)
    texts = _texts(data, 24 if args.smoke else 96)
    cycle = [None, *adapters]
    tasks = [cycle[(i // 3 + i) % len(cycle)] for i in range(len(texts))]  # every text kind meets every task
    single = {t: emb.embed([x for x, u in zip(texts, tasks) if u == t], task=t) for t in cycle}
    enc = emb.tokenize(texts)
    mixed = emb.finalize(emb.forward(enc, tasks))  # one padded batch, one adapter per row (the server's path)
    pos = dict.fromkeys(cycle, 0)
    worst = 0.0
    for i, t in enumerate(tasks):
        worst = max(worst, float(np.abs(mixed[i] - single[t][pos[t]]).max()))
        pos[t] += 1
    effect = float(np.abs(emb.embed(texts, task="lyft") - emb.embed(texts)).max())
    out = {"texts": len(texts), "tasks": cycle, "max_abs_diff_mixed_vs_single": worst, "pass_1e-5": worst <= 1e-5,
           "max_abs_diff_lyft_adapter_vs_none (the adapters do change vectors)": effect}
    merged = work / "lyft" / "merged"
    if merged.is_dir():
        from sentence_transformers import SentenceTransformer

        want = emb.embed(texts, task="lyft")
        theirs = SentenceTransformer(str(merged), device="cpu").encode(texts, batch_size=32)
        out["merged_export_max_abs_diff_sentence_transformers_vs_adapter"] = float(np.abs(theirs - want).max())
        out["merged_export_max_abs_diff_tamis_vs_adapter"] = float(np.abs(tamis.Embedder(merged).embed(texts) - want).max())
    res.put("mixed", out)
    log(f"mixed: {json.dumps(out)}")


def stage_overhead(args, work, data, res, show) -> None:
    import torch

    import tamis

    plain = tamis.Embedder()
    adapters = _adapters(work)
    emb = tamis.Embedder(adapters=adapters)
    mix = [None, *adapters]
    texts = _texts(data, 24 if args.smoke else 96)
    queries = [t for t in texts if len(t) < 300][: 6 if args.smoke else 24]
    docs = texts[: 8 if args.smoke else 32]
    repeats = 3 if args.smoke else 7

    def one_by_one(e, task):
        return lambda: [e.embed([q], task=task) for q in queries]

    def batch(e, task):
        return lambda: e.embed(docs, task=task)

    def mixed_batch():
        enc = emb.tokenize(docs)
        return emb.finalize(emb.forward(enc, [mix[i % len(mix)] for i in range(len(docs))]))

    kb = f"{len(docs)} docs per request"
    cases = {
        "queries 1 per request / no adapters loaded": one_by_one(plain, None),
        "queries 1 per request / adapters loaded, none used": one_by_one(emb, None),
        "queries 1 per request / lyft adapter": one_by_one(emb, "lyft"),
        f"{kb} / no adapters loaded": batch(plain, None),
        f"{kb} / adapters loaded, none used": batch(emb, None),
        f"{kb} / lyft adapter": batch(emb, "lyft"),
        f"{kb} / mixed {'+'.join(str(t) for t in mix)}": mixed_batch,
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    with torch.inference_mode():
        for fn in cases.values():
            fn()  # warm-up
        for _ in range(repeats):  # interleaved: machine noise hits every case alike
            for k, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    out: dict[str, Any] = {"repeats": repeats, "threads": torch.get_num_threads(), "median_seconds": med}
    for kind, n in (("queries 1 per request", len(queries)), (kb, 1)):
        ref = med[f"{kind} / no adapters loaded"]
        out[f"{kind}: ms per request, no adapters"] = round(1000 * ref / n, 2)
        for k in med:
            if k.startswith(kind) and "no adapters loaded" not in k:
                out[f"ratio vs no adapters: {k}"] = round(med[k] / ref, 3)
    res.put("overhead", out)
    log(f"overhead: {json.dumps({k: v for k, v in out.items() if k != 'median_seconds'})}")


STAGE_FNS = {"lyft": stage_lyft, "scifact": stage_scifact, "matryoshka": stage_matryoshka,
             "evaluate": stage_evaluate, "mixed": stage_mixed, "overhead": stage_overhead}


if __name__ == "__main__":
    sys.exit(main())
