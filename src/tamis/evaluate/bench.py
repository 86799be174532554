"""Throughput of embedding and reranking on real texts, optionally against sentence-transformers.

Units: documents per second and documents per 50 ms (the unit of Jina's reranker announcements), batch
latency p50 / p95 in milliseconds, and the peak resident memory of the process during the run.

Both systems get exactly the same calls: embedding is timed over consecutive batches of ``batch_size``
SciFact documents (title + text), one ``embed``/``encode`` call each; reranking over (query, top-``depth``
BM25 passages) groups of TREC DL 2021, one ``rerank``/``predict`` call per query. Each system is warmed
up first; the systems' calls are interleaved one by one (A, B, B, A, ...) so that load from other
processes hits both alike; throughput is the median over ``repeats`` passes, latency percentiles pool
every call, and the paired speedup is the median over calls of the two systems' latency ratio on the
same input (the steadiest figure on a shared machine).
After timing, the outputs of both systems on a sample are compared (cosine / ranking order), so a ratio
is never reported for two systems that compute different things.
sentence-transformers is imported only when asked for (``vs="sentence-transformers"``), and is loaded on
the same weights directory; models it could only load with remote code are skipped, never run. It runs
twice, as its users run it: float32, and with ``torch.autocast(bfloat16)`` (the fastest configuration a
sentence-transformers user gets with one line; on CPUs without native bf16 it is emulated and slow).
The CPU model and features (:mod:`tamis.hardware`) and tamis's resolved dtype go into the report.
"""

from __future__ import annotations

import gc
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from tamis.evaluate.datasets import load_corpus, load_queries, load_run, sorted_docs
from tamis.evaluate.first_stage import quiet_truncation

ST = "sentence-transformers"
ST_BF16 = "sentence-transformers+bf16-autocast"
ORT = "onnxruntime"
ORT_INT8 = "onnxruntime-int8-dynamic"
# ratio / check key suffix of every reference system (tamis / it), sentence-transformers fp32 first
REFERENCES = {ST: "", ST_BF16: "_vs_st_bf16", ORT: "_vs_ort", ORT_INT8: "_vs_ort_int8"}


# ------------------------------------------------------------------------------------------ memory


def _status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak resident memory inside a ``with`` block.

    On Linux the kernel's high-water mark is reset on entry (``/proc/self/clear_refs``), so the peak is
    the block's own; elsewhere it falls back to the process lifetime peak (``scope = "process"``). On
    CUDA the peak allocated device memory is reported too.
    """

    def __init__(self, device: str = "cpu", collect: bool = True):
        self.device = str(device)
        self.collect = collect
        self.scope = "block"
        self.start_mb = 0.0
        self.peak_mb = 0.0
        self.gpu_peak_mb: float | None = None

    def __enter__(self) -> PeakMemory:
        if self.collect:
            gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.scope = "process"
        rss = _status_kb("VmRSS")
        self.start_mb = rss / 1024 if rss else 0.0
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc: Any) -> None:
        hwm = _status_kb("VmHWM") if self.scope == "block" else None
        if hwm is None:
            self.scope = "process"
            # ru_maxrss is KiB on Linux, bytes on macOS
            scale = 1024 * 1024 if os.uname().sysname == "Darwin" else 1024
            hwm_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
        else:
            hwm_mb = hwm / 1024
        self.peak_mb = hwm_mb
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            self.gpu_peak_mb = torch.cuda.max_memory_allocated() / 2**20


# ------------------------------------------------------------------------------------------ results


@dataclass
class BenchResult:
    system: str  # "tamis" or "sentence-transformers"
    task: str  # "embed" or "rerank"
    model: str
    documents: int  # documents processed per pass
    calls: int  # calls per pass
    docs_per_second: float
    docs_per_50ms: float
    p50_ms: float
    p95_ms: float
    peak_rss_mb: float
    rss_growth_mb: float  # peak during the run minus resident memory at its start
    seconds_per_pass: float
    repeats: int
    memory_scope: str = "block"
    gpu_peak_mb: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "system": self.system,
            "model": self.model,
            "docs/s": round(self.docs_per_second, 1),
            "docs/50ms": round(self.docs_per_50ms, 2),
            "p50 ms": round(self.p50_ms, 1),
            "p95 ms": round(self.p95_ms, 1),
            "peak RSS MB": round(self.peak_rss_mb),
            "+RSS MB": round(self.rss_growth_mb),
            **({"GFLOP/s": round(self.extra["gflops"]), "% ceiling": round(self.extra["pct_of_ceiling"])}
               if "pct_of_ceiling" in self.extra else {}),
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


@dataclass
class Workload:
    """One system's calls on one task: ``call(item)`` for each item; ``sizes[i]`` documents in item i."""

    system: str
    task: str
    model: str
    call: Callable[[Any], Any]
    items: Sequence[Any]
    sizes: Sequence[int]
    extra: dict[str, Any] = field(default_factory=dict)


def time_workloads(
    workloads: Sequence[Workload],
    repeats: int = 3,
    warmup: int = 2,
    device: str = "cpu",
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """Time every workload ``repeats`` times, interleaved call by call (item j of A, item j of B, then
    item j+1 of B, item j+1 of A, ...) so that load from other processes hits every system alike;
    ``warmup`` calls each first. Per workload: per-pass seconds (sum of its calls in a repeat), median
    throughput, latency percentiles over every call, the peak memory of its calls, and ``latencies`` in
    call order (index k is the same item for every workload, for paired comparisons)."""
    for w in workloads:
        for item in list(w.items)[: max(0, warmup)]:
            w.call(item)
    _sync(device)
    gc.collect()
    n_items = max((len(w.items) for w in workloads), default=0)
    passes: list[list[float]] = [[] for _ in workloads]
    lats: list[list[float]] = [[] for _ in workloads]
    peaks: list[float] = [0.0 for _ in workloads]
    growth: list[float] = [0.0 for _ in workloads]
    gpu: list[float | None] = [None for _ in workloads]
    scope = "block"
    total = max(1, repeats) * sum(len(w.items) for w in workloads)
    with tqdm(total=total, desc="bench " + "/".join(dict.fromkeys(w.task for w in workloads)), unit="call",
              disable=not show_progress, leave=False) as bar:
        for r in range(max(1, repeats)):
            sums = [0.0 for _ in workloads]
            for j in range(n_items):
                order = list(range(len(workloads)))
                if (r * n_items + j) % 2:
                    order.reverse()
                for i in order:
                    w = workloads[i]
                    if j >= len(w.items):
                        continue
                    with PeakMemory(device, collect=False) as mem:
                        t0 = time.perf_counter()
                        w.call(w.items[j])
                        _sync(device)
                        dt = time.perf_counter() - t0
                    sums[i] += dt
                    lats[i].append(dt)
                    peaks[i] = max(peaks[i], mem.peak_mb)
                    growth[i] = max(growth[i], mem.peak_mb - mem.start_mb)
                    if mem.gpu_peak_mb is not None:
                        gpu[i] = max(gpu[i] or 0.0, mem.gpu_peak_mb)
                    scope = mem.scope
                    bar.update(1)
            for i in range(len(workloads)):
                passes[i].append(sums[i])
    out = []
    for i, w in enumerate(workloads):
        median = statistics.median(passes[i])
        n_docs = int(sum(w.sizes))
        dps = n_docs / median if median > 0 else float("inf")
        out.append({
            "documents": n_docs,
            "calls": len(w.items),
            "pass_seconds": passes[i],
            "seconds_per_pass": median,
            "docs_per_second": dps,
            "docs_per_50ms": dps * 0.05,
            "p50_ms": float(np.percentile(lats[i], 50) * 1000) if lats[i] else 0.0,
            "p95_ms": float(np.percentile(lats[i], 95) * 1000) if lats[i] else 0.0,
            "peak_rss_mb": peaks[i],
            "rss_growth_mb": max(0.0, growth[i]),
            "memory_scope": scope,
            "gpu_peak_mb": gpu[i],
            "latencies": lats[i],
        })
    return out


def paired_speedup(first: Sequence[float], second: Sequence[float]) -> float:
    """Median over paired calls of ``second / first`` latency: how many times faster the first system
    is on the same input under the same momentary load (robust to load swings on a shared machine)."""
    ratios = [b / a for a, b in zip(first, second) if a > 0]
    return float(statistics.median(ratios)) if ratios else float("nan")


def time_calls(
    call: Callable[[Any], Any],
    items: Sequence[Any],
    sizes: Sequence[int],
    repeats: int = 3,
    warmup: int = 2,
    device: str = "cpu",
    show_progress: bool = True,
) -> dict[str, Any]:
    """:func:`time_workloads` for a single callable."""
    w = Workload("", "", "", call, items, sizes)
    return time_workloads([w], repeats, warmup, device, show_progress)[0]


def _result(w: Workload, t: dict[str, Any], repeats: int) -> BenchResult:
    return BenchResult(
        system=w.system, task=w.task, model=w.model, documents=t["documents"], calls=t["calls"],
        docs_per_second=t["docs_per_second"], docs_per_50ms=t["docs_per_50ms"], p50_ms=t["p50_ms"],
        p95_ms=t["p95_ms"], peak_rss_mb=t["peak_rss_mb"], rss_growth_mb=t["rss_growth_mb"],
        seconds_per_pass=t["seconds_per_pass"], repeats=repeats, memory_scope=t["memory_scope"],
        gpu_peak_mb=t["gpu_peak_mb"], extra={**w.extra, "pass_seconds": t["pass_seconds"]},
    )


# ------------------------------------------------------------------------------- matmul ceiling


def matmul_probe(dtype: str, hidden: int = 384, intermediate: int = 1536, tokens: int = 4096,
                 device: str = "cpu", repeats: int = 5) -> float:
    """GFLOP/s of ``F.linear`` in ``dtype`` at a BERT layer's FFN shapes ([tokens, hidden] x [hidden,
    intermediate] and back), the faster shape's median over ``repeats``: the matmul rate torch's kernels reach
    at those sizes on this machine, the practical ceiling of torch-based code (the "% ceiling" column of
    ``tamis bench``; another runtime's own kernels, ONNX Runtime's fp32 GEMM say, can pass it)."""
    import torch
    import torch.nn.functional as F

    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    best = 0.0
    with torch.inference_mode():
        for k, n in ((hidden, intermediate), (intermediate, hidden)):
            x = torch.randn(tokens, k, generator=gen).to(device=device, dtype=dt)
            w = torch.randn(n, k, generator=gen).to(device=device, dtype=dt)
            for _ in range(2):
                F.linear(x, w)
            times = []
            for _ in range(repeats):
                _sync(device)
                t0 = time.perf_counter()
                F.linear(x, w)
                _sync(device)
                times.append(time.perf_counter() - t0)
            best = max(best, 2.0 * tokens * k * n / statistics.median(times) / 1e9)
    return best


def encoder_gflop(config: dict[str, Any], lengths: Sequence[int]) -> float | None:
    """Matmul work of one pass of a BERT-like encoder over sequences of these token counts, in GFLOP: the
    layers' projections (2 x (4 h^2 + 2 h i) per token) plus attention's two products (4 L^2 h per sequence
    and layer); embeddings, norms, pooling and heads are left out. None for configs without those sizes."""
    try:
        h, i, n = int(config["hidden_size"]), int(config["intermediate_size"]), int(config["num_hidden_layers"])
    except (KeyError, TypeError, ValueError):
        return None
    tokens = sum(lengths)
    squares = sum(x * x for x in lengths)
    return n * (2.0 * (4 * h * h + 2 * h * i) * tokens + 4.0 * h * squares) / 1e9


def _token_lengths(task: str, model: Any, items: Sequence[Any]) -> list[int] | None:
    """Token counts a tamis model computes for the timed items (texts, or (query, passages) groups for a
    cross-encoder), truncated as it truncates them; None where the model has no single encoder to count."""
    tok, limit = getattr(model, "tokenizer", None), getattr(model, "max_length", None)
    if tok is None or getattr(model, "config", None) is None:
        return None
    if task == "embed":
        return [len(e) for e in tok.encode(list(items), limit)]
    if not hasattr(tok, "encode_pairs") or getattr(model, "kind", None) not in (None, "cross-encoder"):
        return None
    return [len(e) for q, docs in items for e in tok.encode_pairs([q] * len(docs), docs, limit)]


def _compute_dtype(r: BenchResult) -> str | None:
    """The dtype a timed system computes its matmuls in (tamis's own results carry it in ``extra``)."""
    return {ST: "float32", ST_BF16: "bfloat16", ORT: "float32", ORT_INT8: "int8"}.get(r.system, r.extra.get("dtype"))


def _attach_flops(results: Sequence[BenchResult], work: float, ceilings: dict[str, float]) -> None:
    """Achieved GFLOP/s (``work`` GFLOP of useful work per pass: real tokens, padding not counted) and % of
    the dtype's matmul ceiling for every system timed on the same items."""
    for r in results:
        dtype = _compute_dtype(r)
        rate = work / r.seconds_per_pass
        r.extra.update(gflop_per_pass=work, gflops=rate)
        if dtype in ceilings:
            r.extra.update(ceiling_dtype=dtype, pct_of_ceiling=100.0 * rate / ceilings[dtype])


# ---------------------------------------------------------------------------------------- workloads


def embedding_texts(data_dir: str | os.PathLike[str], n: int = 1000, with_title: bool = True) -> list[str]:
    """The first ``n`` documents of a corpus (SciFact by default), title + " " + text."""
    corpus = load_corpus(data_dir)
    return corpus.documents(with_title)[: max(1, n)]


def rerank_groups(
    data_dir: str | os.PathLike[str], n_queries: int = 10, depth: int = 100, run_name: str = "run.bm25.tsv"
) -> list[tuple[str, list[str]]]:
    """(query, top-``depth`` passages of the run) for the first ``n_queries`` queries of a run (TREC DL 21)."""
    data_dir = Path(data_dir)
    corpus = load_corpus(data_dir)
    texts = dict(zip(corpus.ids, corpus.documents(True)))
    queries = load_queries(data_dir)
    run = load_run(data_dir / run_name if not Path(run_name).is_absolute() else run_name)
    groups: list[tuple[str, list[str]]] = []
    for qid, docs in run.items():
        if qid not in queries:
            continue
        passages = [texts[d] for d, _ in sorted_docs(docs)[:depth] if d in texts]
        if passages:
            groups.append((queries[qid], passages))
        if len(groups) >= n_queries:
            break
    return groups


def _batches(texts: Sequence[str], size: int) -> list[list[str]]:
    return [list(texts[i : i + size]) for i in range(0, len(texts), max(1, size))]


def tamis_embed_workload(embedder: Any, texts: Sequence[str], batch_size: int = 32) -> Workload:
    batches = _batches(texts, batch_size)
    task = getattr(embedder, "passage_task", None)

    def call(batch: list[str]) -> np.ndarray:
        with quiet_truncation():
            return np.asarray(embedder.embed(batch, task=task, show_progress=False), dtype=np.float32)

    return Workload("tamis", "embed", str(getattr(embedder, "name", "")), call, batches, [len(b) for b in batches],
                    {"batch_size": batch_size})


def tamis_rerank_workload(reranker: Any, groups: Sequence[tuple[str, list[str]]]) -> Workload:
    def call(group: tuple[str, list[str]]) -> list[float]:
        with quiet_truncation():
            ranked = reranker.rerank(group[0], group[1], top_n=None, return_documents=False)
        scores = [0.0] * len(group[1])
        for r in ranked.results:
            scores[r.index] = float(r.relevance_score)
        return scores

    depth = max((len(g[1]) for g in groups), default=0)
    return Workload("tamis", "rerank", str(getattr(reranker, "name", "")), call, list(groups),
                    [len(g[1]) for g in groups], {"depth": depth, "kind": getattr(reranker, "kind", None)})


def _autocast(device: str, enabled: bool):
    import contextlib

    import torch

    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def _st_embedder(model_dir: Path, device: str, max_length: int | None):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_dir), device=device, trust_remote_code=False)
    if max_length:
        st.max_seq_length = int(max_length)
    return st


def st_embed_workload(
    model_dir: str | os.PathLike[str], texts: Sequence[str], batch_size: int = 32, device: str = "cpu",
    max_length: int | None = None, name: str | None = None, bf16_autocast: bool = False,
) -> Workload:
    """sentence-transformers ``SentenceTransformer.encode`` on the same weights and batches (optionally under
    bf16 autocast)."""
    st = _st_embedder(Path(model_dir), device, max_length)
    batches = _batches(texts, batch_size)

    def call(batch: list[str]) -> np.ndarray:
        with _autocast(device, bf16_autocast):
            out = st.encode(batch, batch_size=batch_size, normalize_embeddings=True, convert_to_tensor=True,
                            show_progress_bar=False)
        return out.float().cpu().numpy()

    return Workload(ST_BF16 if bf16_autocast else ST, "embed", name or Path(model_dir).name, call, batches, [len(b) for b in batches],
                    {"batch_size": batch_size})


def st_rerank_workload(
    reranker: Any, groups: Sequence[tuple[str, list[str]]], device: str = "cpu", batch_size: int = 32,
    bf16_autocast: bool = False,
) -> Workload:
    """The sentence-transformers counterpart of a tamis reranker on the same weights: ``CrossEncoder``
    for a cross-encoder, ``SentenceTransformer`` + cosine for the embedding-similarity reranker."""
    kind = getattr(reranker, "kind", None)
    model_dir = _reranker_dir(reranker)
    if kind == "cross-encoder":
        from sentence_transformers import CrossEncoder

        ce = CrossEncoder(str(model_dir), device=device, trust_remote_code=False,
                          max_length=getattr(reranker, "max_length", None))

        def call(group: tuple[str, list[str]]) -> list[float]:
            with _autocast(device, bf16_autocast):
                out = ce.predict([(group[0], d) for d in group[1]], batch_size=batch_size, show_progress_bar=False,
                                 convert_to_tensor=True)
            return [float(x) for x in out.float().cpu().reshape(-1)]
    elif kind == "embedding":
        emb = getattr(reranker, "embedder", None)
        st = _st_embedder(model_dir, device, getattr(emb, "max_length", None))

        def call(group: tuple[str, list[str]]) -> list[float]:
            with _autocast(device, bf16_autocast):
                vecs = st.encode([group[0], *group[1]], batch_size=batch_size, normalize_embeddings=True,
                                 convert_to_tensor=True, show_progress_bar=False)
            vecs = vecs.float().cpu().numpy()
            return [float(x) for x in vecs[1:] @ vecs[0]]
    else:
        raise NotImplementedError(f"no sentence-transformers counterpart for a {kind} reranker")
    name = str(getattr(reranker, "name", "") or Path(model_dir).name)
    return Workload(ST_BF16 if bf16_autocast else ST, "rerank", name, call, list(groups), [len(g[1]) for g in groups],
                    {"kind": kind})


def ort_embed_workloads(embedder: Any, texts: Sequence[str], batch_size: int, workdir: str | os.PathLike[str],
                        threads: int) -> list[Workload]:
    """ONNX Runtime float32 and dynamic int8 (per-channel weights, ``quantize_dynamic``) of the embedder's
    own weights: tamis's padded BERT module exported to ONNX (opset 17) into ``workdir``, inputs tokenized
    by tamis and padded per call, pooled and L2-normalised as tamis pools. BERT-family embedders only;
    needs ``onnxruntime`` (and ``onnx`` for the export)."""
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from tamis.embed import pool
    from tamis.models import bert

    if getattr(embedder, "family", None) != "bert":
        raise ValueError(f"the ONNX Runtime comparison runs BERT-family embedders, not {embedder.family}")
    fp32 = Path(workdir) / "model.onnx"
    int8 = Path(workdir) / "model-int8.onnx"
    names = ["input_ids", "attention_mask", "token_type_ids"]
    model = bert.from_pretrained(embedder.model_dir, device="cpu", dtype=torch.float32, classification=False).eval()
    ids = torch.ones(2, 8, dtype=torch.long)
    with torch.no_grad():
        torch.onnx.export(model, (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(fp32),
                          input_names=names, output_names=["hidden"], opset_version=17, dynamo=False,
                          dynamic_axes={k: {0: "batch", 1: "tokens"} for k in [*names, "hidden"]})
    del model
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    batches = _batches(texts, batch_size)
    out = []
    for system, path in ((ORT, fp32), (ORT_INT8, int8)):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def call(batch: list[str], session: Any = session) -> np.ndarray:
            with quiet_truncation():
                enc = embedder.tokenizer.pad(embedder.tokenize(batch), "cpu")
            feeds = {"input_ids": enc.input_ids.numpy(), "attention_mask": enc.attention_mask.numpy(),
                     "token_type_ids": enc.token_type_ids.numpy()}
            hidden = torch.from_numpy(session.run(None, feeds)[0])
            vecs = torch.nn.functional.normalize(pool(hidden, enc.attention_mask, embedder.pooling), dim=-1)
            return vecs.numpy()

        out.append(Workload(system, "embed", str(getattr(embedder, "name", "")), call, batches,
                            [len(b) for b in batches], {"batch_size": batch_size}))
    return out


def _ort_unavailable(embedder: Any, device: str) -> str | None:
    """Why the ONNX Runtime comparison cannot run here, or None."""
    import importlib.util

    missing = [m for m in ("onnxruntime", "onnx") if importlib.util.find_spec(m) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (pip install onnxruntime onnx)"
    if str(device) != "cpu" or getattr(embedder, "family", None) != "bert":
        return "runs BERT-family embedders on the CPU only"
    return None


def _reranker_dir(reranker: Any) -> Path:
    for attr in ("model_dir", "path"):
        d = getattr(reranker, attr, None)
        if d is not None:
            return Path(d)
    emb = getattr(reranker, "embedder", None)
    if emb is not None and getattr(emb, "model_dir", None) is not None:
        return Path(emb.model_dir)
    from tamis.models.loading import resolve_model_dir

    return resolve_model_dir(getattr(reranker, "name", None))


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest cosine between matching rows."""
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return float(np.min(np.sum(a * b, axis=1)))


def _rank_agreement(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], tol: float = 1e-5) -> float:
    """Fraction of groups ranked alike: no pair of documents whose scores differ by more than ``tol`` in
    both systems is ordered differently (scores may differ by a monotone map such as a sigmoid; near
    ties may flip on float noise)."""
    if not a:
        return 1.0
    same = 0
    for x, y in zip(a, b):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        dx = x[:, None] - x[None, :]
        dy = y[:, None] - y[None, :]
        clear = (np.abs(dx) > tol) & (np.abs(dy) > tol)
        same += int(not np.any(clear & (np.sign(dx) != np.sign(dy))))
    return same / len(a)


# --------------------------------------------------------------------------------------------- run


@dataclass
class BenchReport:
    results: list[BenchResult]
    ratios: dict[str, float]
    checks: dict[str, Any]
    config: dict[str, Any]
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "results": [r.to_dict() for r in self.results],
            "ratios": self.ratios,
            "checks": self.checks,
            "skipped": self.skipped,
        }


def run_bench(
    data_root: str | os.PathLike[str],
    model: Any = None,
    reranker: Any = "default",
    tasks: Sequence[str] = ("embed", "rerank"),
    n_docs: int = 1000,
    batch_size: int = 32,
    n_queries: int = 10,
    depth: int = 100,
    repeats: int = 3,
    vs: str | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    embed_data: str | os.PathLike[str] | None = None,
    rerank_data: str | os.PathLike[str] | None = None,
    show_progress: bool = True,
    compare_rerankers: Sequence[Any] = (),
    st_bf16: bool = True,
    compile: bool | str = "auto",
    ort: bool = True,
) -> BenchReport:
    """Benchmark embedding (SciFact documents) and reranking (TREC DL 21 BM25 candidates), and with
    ``vs="sentence-transformers"`` the same calls through sentence-transformers (float32, and with
    ``st_bf16`` also under bf16 autocast), calls interleaved.

    ``ratios[task]`` is tamis / sentence-transformers float32 throughput, ``ratios[task + "_vs_st_bf16"]``
    tamis / sentence-transformers bf16 autocast; ``*_paired_median`` the median per-call speedups.
    ``compile``: ``"auto"`` loads tamis's models as they load by default (compiled where that pays, see
    :func:`tamis.hardware.auto_compile`), True / False or ``"on"`` / ``"off"`` force it (warm-up paid and
    reported before timing).
    With ``vs`` and ``ort``, embedding also times ONNX Runtime float32 and dynamic int8 of the same weights
    when ``onnxruntime`` is installed (:func:`ort_embed_workloads`; ratios ``embed_vs_ort`` /
    ``embed_vs_ort_int8``); otherwise ``skipped["embed:onnxruntime"]`` says why.
    ``checks`` compare every system's outputs with sentence-transformers float32 (the reference)."""
    from tamis.evaluate.pipeline import load_embedder, load_reranker
    from tamis.hardware import cpu_info

    if vs not in (None, ST):
        raise ValueError(f"vs supports only {ST!r}, got {vs!r}")
    root = Path(data_root).expanduser()
    results: list[BenchResult] = []
    ratios: dict[str, float] = {}
    checks: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    info = cpu_info()
    config: dict[str, Any] = {"device": device, "dtype": dtype, "repeats": repeats, "vs": vs,
                              "torch_threads": _threads(), "cpus": os.cpu_count(), "cpu": info.describe(),
                              "cpu_info": info.to_dict(), "compile": compile}
    from tamis.cli import compile_kwargs

    options: dict[str, Any] = compile_kwargs(compile) if isinstance(compile, str) else {"compile": compile}

    ceilings: dict[str, float] = {}

    def attach_flops(task: str, model: Any, res: Sequence[BenchResult], items: Sequence[Any]) -> None:
        cfg = getattr(model, "config", None)
        lengths = _token_lengths(task, model, items) if isinstance(cfg, dict) else None
        work = encoder_gflop(cfg, lengths) if lengths else None
        if work is None:
            return
        res[0].extra["dtype"] = config[task]["tamis"].get("dtype")
        sizes = {"hidden": int(cfg["hidden_size"]), "intermediate": int(cfg["intermediate_size"])}
        for dt in dict.fromkeys(_compute_dtype(r) for r in res):  # probe only the dtypes timed
            if dt in ("float32", "bfloat16", "float16") and dt not in ceilings:
                ceilings[dt] = matmul_probe(dt, device=device, **sizes)
        config["matmul_probe_gflops"] = {**ceilings, "shape": sizes}
        _attach_flops(res, work, ceilings)

    def measure(task: str, ours: Workload, make_theirs: Callable[[bool], Workload], sample: Sequence[Any],
                model: Any = None, make_ort: Callable[[], list[Workload]] | None = None) -> None:
        workloads = [ours]
        if vs == ST:
            try:
                workloads.append(make_theirs(False))
                if st_bf16:
                    workloads.append(make_theirs(True))
            except Exception as exc:  # e.g. a model sentence-transformers could only load with remote code
                skipped[task] = f"{type(exc).__name__}: {exc}"
                workloads = workloads[:1]
            if len(workloads) > 1 and make_ort is not None:
                workloads.extend(make_ort())
        timed = time_workloads(workloads, repeats, device=device, show_progress=show_progress)
        res = [_result(w, t, repeats) for w, t in zip(workloads, timed)]
        results.extend(res)
        attach_flops(task, model, res, [t for b in ours.items for t in b] if task == "embed" else ours.items)
        if len(res) < 2:
            return
        outputs = [[w.call(x) for x in sample] for w in workloads]
        ref = outputs[1]  # sentence-transformers float32
        for k in range(1, len(res)):
            suffix = REFERENCES[workloads[k].system]
            ratios[task + suffix] = res[0].docs_per_second / res[k].docs_per_second
            ratios[f"{task}_paired_median{suffix}"] = paired_speedup(timed[0]["latencies"], timed[k]["latencies"])
        for k, out in enumerate(outputs):
            if k == 1:
                continue
            who = "" if k == 0 else REFERENCES[workloads[k].system].removeprefix("_vs_") + "_"
            if task == "embed":
                checks[f"embed_{who}min_cosine_vs_st"] = _agreement(np.concatenate(out), np.concatenate(ref))
            else:
                checks[f"rerank_{who}same_order_vs_st"] = _rank_agreement(out, ref)
                checks[f"rerank_{who}max_abs_score_diff_vs_st"] = float(
                    max(np.max(np.abs(np.asarray(x) - np.asarray(y))) for x, y in zip(out, ref)))

    if "embed" in tasks:
        data = Path(embed_data) if embed_data else root / "scifact"
        texts = embedding_texts(data, n_docs)
        config["embed"] = {"data": str(data), "documents": len(texts), "batch_size": batch_size}
        emb = load_embedder(model, device, dtype, **options)
        config["embed"]["tamis"] = _precision_of(emb)
        ours = tamis_embed_workload(emb, texts, batch_size)
        make_ort = None
        if ort and vs == ST:
            why = _ort_unavailable(emb, device)
            if why:
                skipped["embed:onnxruntime"] = why
            else:
                workdir = tempfile.TemporaryDirectory(prefix="tamis-bench-onnx-")
                make_ort = lambda: ort_embed_workloads(emb, texts, batch_size, workdir.name, _threads())  # noqa: E731
        measure("embed", ours,
                lambda bf16: st_embed_workload(emb.model_dir, texts, batch_size, device,
                                               getattr(emb, "max_length", None), ours.model, bf16),
                _batches(texts[:64], batch_size), emb, make_ort)
        del emb, ours
        gc.collect()

    if "rerank" in tasks:
        data = Path(rerank_data) if rerank_data else root / "trec-dl21"
        groups = rerank_groups(data, n_queries, depth)
        config["rerank"] = {"data": str(data), "queries": len(groups), "depth": depth,
                            "pairs": sum(len(g[1]) for g in groups)}
        rr = load_reranker(reranker, device, dtype, **options)
        config["rerank"]["tamis"] = _precision_of(rr)
        ours = tamis_rerank_workload(rr, groups)
        if compare_rerankers:
            # several tamis rerankers (e.g. a teacher and its distilled student), interleaved call by call
            others = [tamis_rerank_workload(load_reranker(c, device, dtype, **options), groups)
                      for c in compare_rerankers]
            _distinct_names([ours, *others], [reranker, *compare_rerankers])
            timed = time_workloads([ours, *others], repeats, device=device, show_progress=show_progress)
            results.extend(_result(w, t, repeats) for w, t in zip([ours, *others], timed))
            for w, t in zip(others, timed[1:]):
                ratios[f"rerank:{w.model}/{ours.model}"] = t["docs_per_second"] / timed[0]["docs_per_second"]
                ratios[f"rerank:{w.model}/{ours.model}_paired_median"] = paired_speedup(t["latencies"],
                                                                                       timed[0]["latencies"])
        else:
            measure("rerank", ours, lambda bf16: st_rerank_workload(rr, groups, device, batch_size, bf16), groups[:3],
                    rr)
        del rr, ours
        gc.collect()
    return BenchReport(results, ratios, checks, config, skipped)


def _distinct_names(workloads: Sequence[Workload], specs: Sequence[Any]) -> None:
    """Two rerankers loaded from directories named alike (``teacher/model``, ``student/model``) get their
    paths' last two parts as names, so the report tells them apart."""
    names = [w.model for w in workloads]
    if len(set(names)) == len(names):
        return
    for w, spec in zip(workloads, specs):
        if isinstance(spec, str | os.PathLike) and Path(spec).is_dir():
            w.model = "/".join(Path(spec).resolve().parts[-2:])


def _precision_of(model: Any) -> dict[str, Any]:
    """What dtype a tamis model (an embedding reranker: its embedder) resolved to and why (``dtype="auto"``),
    and whether it runs packed; an ensemble gives its members' dtypes, each named once."""
    model = getattr(model, "embedder", model)
    members = getattr(model, "members", None)
    if members:
        parts = [_precision_of(m) for m in members]
        return {"dtype": "+".join(dict.fromkeys(str(p["dtype"]) for p in parts)), "packed": None, "members": parts}
    p = getattr(model, "precision", None)
    out: dict[str, Any] = {"packed": getattr(model, "packed", None)}
    if getattr(model, "compile_seconds", None) is not None:
        out["compile_seconds"] = model.compile_seconds
    if getattr(model, "compile_reason", None):
        out["compile_reason"] = model.compile_reason
    if p is not None:
        out.update(dtype=p.name, requested=p.requested, reason=p.reason)
        if out["packed"] and p.name == "bfloat16" and str(getattr(model, "device", "cpu")).startswith("cpu"):
            from tamis.models.kernels import attention_path

            out["attention"] = attention_path()
    else:
        out["dtype"] = str(getattr(model, "dtype", "")).removeprefix("torch.") or None
    return out


def _threads() -> int:
    import torch

    return torch.get_num_threads()
