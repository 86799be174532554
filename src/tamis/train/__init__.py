"""Training: rerankers (fine-tuning and distillation) and embedding models, built on the inference modules.

- :mod:`tamis.train.data` — BEIR qrels and pair sets -> queries, documents, labels; dev splits; lists;
- :mod:`tamis.train.mining` — hard negatives from BM25 and dense first stages;
- :mod:`tamis.train.teachers` — teacher scoring (any reranker, dense, BM25, SPLADE, ensembles), cached;
- :mod:`tamis.train.losses` — BCE, InfoNCE, ListNet, LambdaLoss, MSE, MarginMSE, KL;
- :mod:`tamis.train.trainer` — the one training loop (AdamW, schedule, accumulation, bf16, eval,
  checkpoint/resume, logs and curves);
- :mod:`tamis.train.cross_encoder` / :mod:`tamis.train.rerankers` — cross-encoder training end to end;
- :mod:`tamis.train.embedder` — embedding models: contrastive (InfoNCE, GradCache), Matryoshka, task
  LoRA adapters on any encoder (peft layout; v3's stacked layout), merged export.

Nothing here is imported by ``import tamis``; the command line is ``tamis train``.
"""

from tamis.train.embedder import AdapterConfig, EmbeddingConfig, export_merged, train_embedder
from tamis.train.rerankers import ListConfig, MiningConfig, prepare_data, teacher_scores, train_reranker
from tamis.train.trainer import StepOutput, TrainConfig, Trainer, TrainResult

__all__ = [
    "AdapterConfig",
    "EmbeddingConfig",
    "ListConfig",
    "MiningConfig",
    "StepOutput",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "export_merged",
    "prepare_data",
    "teacher_scores",
    "train_embedder",
    "train_reranker",
]
