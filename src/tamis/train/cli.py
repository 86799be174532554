"""``tamis train reranker | distill``: the command line of :mod:`tamis.train`.

Only argparse lives at module level; the training code is imported when a command runs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

TRAIN_DESCRIPTION = """\
Train models on your own data (the layout of ../shared/data: BEIR corpus/queries/qrels directories,
or pair sets with pairs.jsonl.gz).

  reranker  fine-tune a cross-encoder from any BERT-family encoder (fresh 1-logit head) or continue a
            cross-encoder, on labels (InfoNCE, BCE, LambdaLoss, ListNet) and/or a teacher's scores
  distill   distil a teacher (a reranker or an ensemble of scorers) into a smaller cross-encoder,
            e.g. the teacher's lower layers: --layers 0,1

Negatives are mined with BM25 and the default embedding model (the top --skip-top ranks skipped as
likely unlabelled positives); a slice of the training queries (--dev) is held out and reranked for
model selection (never a test split). Outputs under --out: model/ (Hugging Face layout, loads in
tamis.Reranker and sentence-transformers CrossEncoder), train_log.jsonl, curve.png, summary.json,
checkpoint/ (for --resume), data/ and teacher/ caches.
"""


def _layers(text: str) -> list[int]:
    try:
        layers = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"layers must be comma-separated integers, got {text!r}") from None
    if not layers:
        raise argparse.ArgumentTypeError("give at least one layer index")
    return layers


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _dev(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("--dev must be >= 0")
    return value if value < 1 else int(value)


def _common(p: argparse.ArgumentParser, distill: bool) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", action="append", required=True, metavar="DIR[:SPLIT]",
                   help="training set (repeatable): a pair set directory, or a BEIR directory (split 'train' "
                        "unless given; test splits are refused)")
    g.add_argument("--dev", type=_dev, default=0.05, metavar="N|FRACTION",
                   help="training queries held out for dev evaluation, per set (default 0.05; at most "
                        "--max-dev-per-source per sub-set)")
    g.add_argument("--max-dev-per-source", type=int, default=100)
    g.add_argument("--dev-depth", type=int, default=30, help="first-stage candidates reranked per dev query")
    g.add_argument("--eval-data", action="append", default=[], metavar="DIR[:SPLIT]",
                   help="after training, evaluate the model reranking this set's first stage (the set's "
                        "run.bm25.tsv if present, else BM25) top --eval-depth; reported, never used to select")
    g.add_argument("--eval-depth", type=int, default=100)
    m = p.add_argument_group("hard-negative mining")
    m.add_argument("--mine", default="bm25,dense", help="first stages to mine with: bm25, dense or both")
    m.add_argument("--mine-model", default=None, help="embedding model of the dense first stage (default: bundled)")
    m.add_argument("--skip-top", type=int, default=3, help="top ranks skipped as likely unlabelled positives")
    m.add_argument("--mine-depth", type=int, default=50, help="ranks considered per first stage")
    m.add_argument("--mine-negatives", type=int, default=15, help="negatives kept per query")
    m.add_argument("--mine-strategy", choices=["top", "random"], default="top")
    t = p.add_argument_group("model and loss")
    if distill:
        t.add_argument("--teacher", required=True,
                       help="teacher: a reranker directory/name, or a scorer spec (bm25, dense[=MODEL], "
                            "splade=DIR, ensemble:A,B,...)")
        t.add_argument("--layers", type=_layers, default=None,
                       help="student = these layers of the teacher (a cross-encoder), e.g. 0,1")
        t.add_argument("--student", default=None,
                       help="student from another checkpoint instead (encoder + fresh head, or cross-encoder)")
        t.add_argument("--loss", default="kl", help="loss spec, e.g. kl, margin-mse, kl+0.5*infonce (default kl)")
    else:
        t.add_argument("--model", default=None, help="encoder or cross-encoder to start from (default: bundled MiniLM)")
        t.add_argument("--layers", type=_layers, default=None, help="keep only these encoder layers")
        t.add_argument("--teacher", default=None, help="optional teacher for distillation terms in --loss")
        t.add_argument("--loss", default="infonce",
                       help="loss spec: infonce, bce, lambda, listnet, mse, margin-mse, kl, or a weighted sum "
                            "such as infonce+0.5*kl (default infonce)")
    t.add_argument("--teacher-weights", type=_floats, default=None,
                   help="ensemble weights (default: learned on the training lists' labels)")
    t.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of infonce/listnet/kl")
    t.add_argument("--pos-weight", type=float, default=None, help="bce: weight of positives (default none)")
    t.add_argument("--negatives", type=int, default=7, help="negatives per list in a step (default 7)")
    t.add_argument("--lists-per-batch", type=int, default=4)
    t.add_argument("--max-length", type=int, default=256, help="tokens per (query, document) pair")
    t.add_argument("--freeze-embeddings", choices=["word", "all"], default=None)
    o = p.add_argument_group("optimisation")
    o.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-5; distill 5e-5)")
    o.add_argument("--epochs", type=int, default=1)
    o.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    o.add_argument("--warmup", type=float, default=0.1, help="warmup: fraction of steps, or steps if >= 1")
    o.add_argument("--schedule", choices=["linear", "cosine", "constant"], default="linear")
    o.add_argument("--weight-decay", type=float, default=0.01)
    o.add_argument("--grad-accum", type=int, default=1)
    o.add_argument("--bf16", action="store_true", help="bfloat16 autocast in forward passes")
    o.add_argument("--eval-every", type=int, default=0, help="steps between dev evaluations (default: per epoch)")
    o.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (default: with evals)")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    o.add_argument("--resume", action="store_true", help="continue from --out/checkpoint")
    x = p.add_argument_group("output")
    x.add_argument("--out", required=True, help="output directory")
    x.add_argument("--name", default=None, help="model name in the card (default: the --out directory name)")
    x.add_argument("--save-dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    x.add_argument("--cache-dir", default=None, help="embedding cache (default $TAMIS_CACHE or ~/.cache/tamis)")
    x.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("train", help="train rerankers (fine-tune, distil)", description=TRAIN_DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="train_command", required=True, metavar="{reranker,distill}")
    r = sub.add_parser("reranker", help="fine-tune a cross-encoder reranker",
                       description="Fine-tune a cross-encoder from an encoder (fresh head) or a cross-encoder.")
    _common(r, distill=False)
    r.set_defaults(func=train_command, distill=False)
    d = sub.add_parser("distill", help="distil a teacher into a smaller cross-encoder",
                       description="Distil a teacher (reranker or scorer ensemble) into a student cross-encoder: "
                                   "the teacher's own layers (--layers) or another checkpoint (--student).")
    _common(d, distill=True)
    d.set_defaults(func=train_command, distill=True)


def _check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"tamis train: --device {device} but this torch has no CUDA device "
                         f"(torch {torch.__version__}); use --device cpu")


def train_command(args: argparse.Namespace) -> int:
    _check_device(args.device)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"tamis train: --out {out} exists and is not a directory")
    if args.distill:
        if args.layers is not None and args.student is not None:
            raise SystemExit("tamis train distill: give --layers (student from the teacher) or --student, not both")
        if args.student is None and args.layers is None:
            raise SystemExit("tamis train distill: give --layers (e.g. 0,1) or --student MODEL")
        model = args.student if args.student is not None else args.teacher
    else:
        model = args.model
    from tamis.train.rerankers import ListConfig, MiningConfig, train_reranker
    from tamis.train.trainer import TrainConfig

    methods = tuple(m.strip() for m in args.mine.split(",") if m.strip())
    lr = args.lr if args.lr is not None else (5e-5 if args.distill else 2e-5)
    config = TrainConfig(lr=lr, weight_decay=args.weight_decay, warmup=args.warmup, schedule=args.schedule,
                         epochs=args.epochs, max_steps=args.max_steps, grad_accum=args.grad_accum, bf16=args.bf16,
                         eval_every=args.eval_every, save_every=args.save_every, seed=args.seed, device=args.device,
                         select_metric="nDCG@10" if args.dev else None, show_progress=not args.quiet)
    lists = ListConfig(n_negatives=args.negatives, lists_per_batch=args.lists_per_batch, max_length=args.max_length,
                       loss=args.loss, temperature=args.temperature, pos_weight=args.pos_weight)
    mining = MiningConfig(methods=methods, n_negatives=args.mine_negatives, skip_top=args.skip_top,
                          depth=args.mine_depth, strategy=args.mine_strategy, dev=args.dev,
                          max_dev_per_source=args.max_dev_per_source, dev_depth=args.dev_depth,
                          embedder=args.mine_model)
    command = "tamis " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["train"] else None
    summary = train_reranker(args.data, out, model=model, layers=args.layers, teacher=args.teacher,
                             teacher_weights=args.teacher_weights, lists=lists, mining=mining, config=config,
                             freeze=args.freeze_embeddings, resume=args.resume, cache_dir=args.cache_dir,
                             save_dtype=args.save_dtype, name=args.name, command=command,
                             show_progress=not args.quiet)
    if args.eval_data:
        summary["eval"] = evaluate_model(summary["model_dir"], args.eval_data, args.eval_depth, args.device,
                                         show_progress=not args.quiet)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps({k: summary[k] for k in ("model_dir", "steps", "train_seconds", "best_dev", "last_dev")
                      if k in summary}, indent=1))
    for row in summary.get("eval", []):
        print(f"eval {row['data']}: nDCG@10 {row['nDCG@10']:.4f} (first stage {row['first_stage_nDCG@10']:.4f})")
    return 0


def evaluate_model(model_dir: str, specs: list[str], depth: int, device: str, show_progress: bool = True
                   ) -> list[dict[str, Any]]:
    """Rerank each evaluation set's first stage (its run.bm25.tsv, else BM25) with the trained model."""
    from tamis.evaluate import evaluate

    rows = []
    for spec in specs:
        path, split = spec, "test"
        if ":" in spec and not Path(spec).exists():
            path, _, split = spec.rpartition(":")
        stage = "run:run.bm25.tsv" if (Path(path) / "run.bm25.tsv").is_file() else "bm25"
        report = evaluate(path, split=split, first_stage=stage, reranker=model_dir, depth=depth, device=device,
                          show_progress=show_progress)
        rows.append({"data": spec, "first_stage": stage, "first_stage_nDCG@10": report.stages[0].metrics["nDCG@10"],
                     **{k: report.final.metrics[k] for k in ("nDCG@10", "MRR@10") if k in report.final.metrics.mean}})
    return rows
