"""One training loop for every recipe: AdamW, warmup + decay, gradient accumulation, optional bf16
autocast, periodic dev evaluation, checkpoint and resume, progress bar, JSONL log and a PNG curve.

A recipe gives the :class:`Trainer` three callables and the model:

- ``epoch_batches(epoch) -> list`` — the batches of an epoch, in order; must be deterministic for a
  given epoch (seed the shuffling with it) so that a resumed run sees exactly the batches it missed;
- ``step(batch) -> StepOutput`` — forward pass and loss of one batch (the trainer does backward,
  accumulation, clipping, the optimizer and the schedule);
- ``evaluate() -> dict[str, float]`` (optional) — dev metrics, e.g. nDCG@10 of reranking held-out
  training queries with the project's metrics;
- ``save_model(directory)`` — write the model in its official layout (what inference loads).

Files under ``out_dir``: ``train_log.jsonl`` (one line per logged step and per evaluation),
``curve.png`` (loss and dev metric against steps), ``checkpoint/`` (model, optimizer, trainer state,
RNG states: safetensors + JSON, never pickle) and ``model/`` (the selected model: the best dev
score when ``select_metric`` is set, else the last step).
"""

from __future__ import annotations

import json
import logging
import math
import platform
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from tamis.errors import InvalidInputError

logger = logging.getLogger("tamis.train")


@dataclass
class TrainConfig:
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup: float = 0.1  # fraction of the optimizer steps (< 1) or a number of steps (>= 1)
    schedule: str = "linear"  # linear | cosine | constant (after warmup)
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    bf16: bool = False  # torch.autocast(bfloat16) for forward passes
    eval_every: int = 0  # optimizer steps between dev evaluations; 0: at the end of each epoch
    save_every: int = 0  # optimizer steps between checkpoints; 0: with each evaluation
    log_every: int = 10
    seed: int = 0
    device: str = "cpu"
    select_metric: str | None = None  # dev metric that picks the saved model (higher is better)
    show_progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def schedule_rows(self) -> dict[str, Any]:
        """The optimizer and schedule as a recipe (model card, summary) lists them."""
        return {"lr": self.lr, "schedule": f"{self.schedule}, warmup {self.warmup}", "weight decay": self.weight_decay,
                "epochs / max steps": f"{self.epochs} / {self.max_steps}"}


# What a resumed run must share with its checkpoint (TrainConfig fields; then the caller's description of the
# model and loss): anything else about the run may change on resume (its length, evaluation cadence, device).
RESUME_MUST_MATCH_CONFIG = ("lr", "weight_decay", "warmup", "schedule", "grad_accum", "max_grad_norm", "bf16",
                            "seed", "select_metric")
RESUME_MUST_MATCH_DESCRIBE = ("title", "init", "base", "mode")


@dataclass
class StepOutput:
    loss: torch.Tensor
    examples: int  # examples (e.g. pairs) in the batch, for throughput
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainState:
    """Where a run stands: what a checkpoint saves (``trainer_state.json``) and a resumed run continues from."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch and batch the run continues at
    batch: int = 0
    best: float | None = None  # best dev value of ``select_metric`` and its step
    best_step: int | None = None
    last_eval: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0  # training time so far
    scheduler: dict[str, Any] | None = None  # the LR scheduler's state_dict

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> TrainState:
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})


@dataclass
class TrainResult:
    steps: int
    epochs_done: float
    seconds: float
    final_loss: float | None
    best_metric: float | None
    best_step: int | None
    last_eval: dict[str, float]
    model_dir: Path
    log_path: Path

    def summary(self, prepare_seconds: float) -> dict[str, Any]:
        """The run's numbers as every recipe's ``summary.json`` reports them."""
        return {"steps": self.steps, "train_seconds": round(self.seconds, 1),
                "prepare_seconds": round(prepare_seconds, 1), "final_loss": self.final_loss,
                "best_dev": self.best_metric, "best_step": self.best_step, "last_dev": self.last_eval}


def environment() -> dict[str, str]:
    """What a run's log records about where it ran: the CPU, torch and Python."""
    from tamis.train.card import cpu_model

    return {"cpu": cpu_model(), "torch": torch.__version__, "python": platform.python_version()}


def save_summary(out_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Write a recipe's ``summary.json`` under ``out_dir`` and return the summary."""
    (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layernorm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    if schedule not in ("linear", "cosine", "constant"):
        raise ValueError(f"unknown schedule {schedule!r}; use linear, cosine or constant")
    return f


# ----------------------------------------------------------------------- optimizer state <-> files


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for idx, slots in state["state"].items():
        meta["state"][str(idx)] = {}
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().contiguous().cpu()
                meta["state"][str(idx)][name] = "tensor"
            else:
                meta["state"][str(idx)][name] = value
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for idx, slots in meta["state"].items():
        state[int(idx)] = {n: tensors[f"{idx}.{n}"] if v == "tensor" else v for n, v in slots.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        out_dir: str | Path,
        epoch_batches: Callable[[int], list[Any]],
        step: Callable[[Any], StepOutput],
        save_model: Callable[[Path], None],
        evaluate: Callable[[], dict[str, float]] | None = None,
        describe: dict[str, Any] | None = None,
        model_dir: str | Path | None = None,
    ):
        """``model_dir``: where the selected model is saved (default ``out_dir/model``)."""
        self.model = model
        self.cfg = config
        self.out_dir = Path(out_dir)
        self.epoch_batches = epoch_batches
        self.step_fn = step
        self.save_model = save_model
        self.evaluate_fn = evaluate
        self.describe = describe or {}
        self.device = torch.device(config.device)
        self.log_path = self.out_dir / "train_log.jsonl"
        self.ckpt_dir = self.out_dir / "checkpoint"
        self.model_dir = Path(model_dir) if model_dir is not None else self.out_dir / "model"
        params = _param_groups(model, config.weight_decay)
        if not any(g["params"] for g in params):
            raise ValueError("the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(params, lr=config.lr)
        self._history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ bookkeeping
    def _total_steps(self, batches_per_epoch: int) -> int:
        per_epoch = math.ceil(batches_per_epoch / self.cfg.grad_accum)
        return self.cfg.max_steps if self.cfg.max_steps else per_epoch * self.cfg.epochs

    def _log(self, row: dict[str, Any]) -> None:
        self._history.append(row)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def _save_checkpoint(self, state: TrainState) -> None:
        tmp = self.ckpt_dir.with_name(self.ckpt_dir.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        model_state = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
        save_file(model_state, str(tmp / "model.safetensors"))
        tensors, meta = _flatten_optimizer(self.optimizer.state_dict())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        save_file(rng, str(tmp / "rng.safetensors"))
        py_state = random.getstate()
        np_state = np.random.get_state()
        full = {
            **asdict(state),
            "optimizer": meta,
            "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
            "numpy_rng": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "config": self.cfg.to_dict(),
            "describe": {k: self.describe[k] for k in RESUME_MUST_MATCH_DESCRIBE if k in self.describe},
        }
        (tmp / "trainer_state.json").write_text(json.dumps(full))
        if self.ckpt_dir.exists():
            old = self.ckpt_dir.with_name(self.ckpt_dir.name + ".old")
            if old.exists():
                _rmtree(old)
            self.ckpt_dir.rename(old)
            tmp.rename(self.ckpt_dir)
            _rmtree(old)
        else:
            tmp.rename(self.ckpt_dir)

    def _check_resumable(self, state: dict[str, Any]) -> None:
        """Refuse to continue a checkpoint made with other settings: its weights, optimizer and schedule
        would silently carry on under the new ones. Length and bookkeeping (max_steps, epochs, eval_every,
        save_every, log_every, device, show_progress) may change on resume."""
        saved_cfg = state.get("config") or {}
        now_cfg = self.cfg.to_dict()
        diffs = [f"{k} {saved_cfg[k]!r} -> {now_cfg[k]!r}" for k in RESUME_MUST_MATCH_CONFIG
                 if k in saved_cfg and saved_cfg[k] != now_cfg.get(k)]
        saved_desc = state.get("describe") or {}
        diffs += [f"{k} {saved_desc[k]!r} -> {self.describe.get(k)!r}" for k in RESUME_MUST_MATCH_DESCRIBE
                  if k in saved_desc and saved_desc[k] != self.describe.get(k)]
        if diffs:
            raise InvalidInputError(
                f"cannot resume {self.ckpt_dir}: it was made with other settings ({'; '.join(diffs)}); "
                f"rerun with its settings, or start fresh in another output directory")

    def _load_checkpoint(self) -> TrainState:
        state = json.loads((self.ckpt_dir / "trainer_state.json").read_text())
        self._check_resumable(state)
        weights = load_file(str(self.ckpt_dir / "model.safetensors"), device=str(self.device))
        self.model.load_state_dict(weights, strict=True)
        tensors = load_file(str(self.ckpt_dir / "optimizer.safetensors"))
        self.optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
        rng = load_file(str(self.ckpt_dir / "rng.safetensors"))
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available() and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        py = state["python_rng"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        nps = state["numpy_rng"]
        np.random.set_state((nps[0], np.array(nps[1], dtype=np.uint32), nps[2], nps[3], nps[4]))
        return TrainState.from_dict(state)

    def _plot(self) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # pragma: no cover - matplotlib is a dependency
            return
        steps = [r["step"] for r in self._history if "loss" in r]
        losses = [r["loss"] for r in self._history if "loss" in r]
        evals = [(r["step"], r["eval"]) for r in self._history if "eval" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        if steps:
            ax.plot(steps, losses, color="tab:blue", alpha=0.35, lw=1, label="loss")
            k = max(1, len(losses) // 20)
            smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1 :], smooth, color="tab:blue", lw=2, label=f"loss (mean of {k})")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss", color="tab:blue")
        metric = self.cfg.select_metric or (next(iter(evals[-1][1])) if evals and evals[-1][1] else None)
        if evals and metric:
            ax2 = ax.twinx()
            pts = [(s, e[metric]) for s, e in evals if metric in e]
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="tab:red", label=f"dev {metric}")
            ax2.set_ylabel(f"dev {metric}", color="tab:red")
        ax.set_title(str(self.describe.get("title", "training")))
        fig.tight_layout()
        fig.savefig(self.out_dir / "curve.png", dpi=110)
        plt.close(fig)

    # ------------------------------------------------------------------ the loop
    def train(self, resume: bool = False) -> TrainResult:
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)
        self.model.to(self.device)
        batches = self.epoch_batches(0)
        if not batches:
            raise ValueError("no training batches: the training data is empty after filtering")
        total = self._total_steps(len(batches))
        warmup = int(cfg.warmup) if cfg.warmup >= 1 else int(round(cfg.warmup * total))
        scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg.schedule, warmup, total))
        state = TrainState()
        if resume and (self.ckpt_dir / "trainer_state.json").is_file():
            state = self._load_checkpoint()
            scheduler.load_state_dict(state.scheduler)
            if self.log_path.is_file():
                self._history = [json.loads(x) for x in self.log_path.read_text().splitlines() if x.strip()]
                self._history = [r for r in self._history if r.get("step", 0) <= state.step]
                self.log_path.write_text("".join(json.dumps(r) + "\n" for r in self._history))
            logger.info("resumed from step %d (epoch %d, batch %d)", state.step, state.epoch, state.batch)
        elif resume:
            logger.info("no checkpoint in %s: starting from scratch", self.ckpt_dir)
            self.log_path.unlink(missing_ok=True)
        else:
            self.log_path.unlink(missing_ok=True)
        if state.step == 0 and not self._history:
            self._log({"start": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": cfg.to_dict(), **self.describe,
                       "total_steps": total, "warmup_steps": warmup, "batches_per_epoch": len(batches)})
        step, epoch, skip = state.step, state.epoch, state.batch
        eval_every = cfg.eval_every or math.ceil(len(batches) / cfg.grad_accum)
        save_every = cfg.save_every or eval_every
        bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=not cfg.show_progress,
                   file=sys.stderr, dynamic_ncols=True)
        started = time.perf_counter() - float(state.seconds)
        window_examples, window_start = 0, time.perf_counter()
        ema: float | None = None
        last_loss: float | None = None
        autocast_device = self.device.type if self.device.type in ("cpu", "cuda") else "cpu"
        done = step >= total
        while not done:
            if epoch:
                batches = self.epoch_batches(epoch)
            self.model.train()
            accum_loss, accum_n, micro = 0.0, 0, 0
            self.optimizer.zero_grad(set_to_none=True)
            for b_idx in range(skip, len(batches)):
                with torch.autocast(autocast_device, dtype=torch.bfloat16, enabled=cfg.bf16):
                    out = self.step_fn(batches[b_idx])
                loss = out.loss.float()
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at step {step}, batch {b_idx}: lower the learning rate")
                (loss / cfg.grad_accum).backward()
                accum_loss += float(loss.detach())
                accum_n += out.examples
                micro += 1
                last_batch = b_idx == len(batches) - 1
                if micro < cfg.grad_accum and not last_batch:
                    continue
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(
                        [p for g in self.optimizer.param_groups for p in g["params"]], cfg.max_grad_norm)
                self.optimizer.step()
                scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                step += 1
                last_loss = accum_loss / micro
                ema = last_loss if ema is None else 0.95 * ema + 0.05 * last_loss
                window_examples += accum_n
                accum_loss, accum_n, micro = 0.0, 0, 0
                bar.update(1)
                now = time.perf_counter()
                rate = window_examples / max(now - window_start, 1e-9)
                bar.set_postfix(loss=f"{ema:.4f}", ex_s=f"{rate:.1f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                if step % cfg.log_every == 0 or step == total:
                    self._log({"step": step, "epoch": epoch + (b_idx + 1) / len(batches), "loss": round(last_loss, 6),
                               "loss_ema": round(ema, 6), "lr": scheduler.get_last_lr()[0],
                               "examples_per_s": round(rate, 2), "elapsed_s": round(now - started, 1),
                               **{k: round(v, 6) for k, v in out.metrics.items()}})
                    window_examples, window_start = 0, now
                finished = step >= total
                next_pos = (epoch, b_idx + 1) if not last_batch else (epoch + 1, 0)
                if self.evaluate_fn is not None and (step % eval_every == 0 or finished):
                    self._evaluate(state, step, epoch + (b_idx + 1) / len(batches))
                    self.model.train()
                if step % save_every == 0 or finished:
                    state.step, (state.epoch, state.batch) = step, next_pos
                    state.seconds, state.scheduler = time.perf_counter() - started, scheduler.state_dict()
                    self._save_checkpoint(state)
                    self._plot()
                if finished:
                    done = True
                    break
            skip = 0
            epoch += 1
        bar.close()
        if cfg.select_metric is None or state.best is None:
            self.save_model(self.model_dir)
        self._plot()
        seconds = time.perf_counter() - started
        self._log({"end": time.strftime("%Y-%m-%dT%H:%M:%S"), "step": step, "seconds": round(seconds, 1),
                   "best": state.best, "best_step": state.best_step})
        return TrainResult(step, epoch, seconds, last_loss, state.best, state.best_step, state.last_eval,
                           self.model_dir, self.log_path)

    def _evaluate(self, state: TrainState, step: int, epoch: float) -> None:
        assert self.evaluate_fn is not None
        self.model.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            metrics = self.evaluate_fn()
        row = {"step": step, "epoch": round(epoch, 4), "eval": metrics, "eval_s": round(time.perf_counter() - t0, 1)}
        self._log(row)
        state.last_eval = metrics
        tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), file=sys.stderr)
        metric = self.cfg.select_metric
        if metric is not None:
            if metric not in metrics:
                raise KeyError(f"select_metric {metric!r} is not among the dev metrics {sorted(metrics)}")
            if state.best is None or metrics[metric] > state.best:
                state.best, state.best_step = metrics[metric], step
                self.save_model(self.model_dir)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
