"""Ranking and distillation losses on lists of scores.

Every listwise loss takes ``scores`` of shape ``[B, L]``: B lists (one query each) of L candidates, the
model's raw scores (logits). Labels and teacher scores have the same shape. ``mask`` (``[B, L]``, bool,
optional) marks real candidates when lists are padded to a common length; masked entries take no part.
Losses are averaged over lists unless stated otherwise.

Pointwise:   :func:`bce` (with ``pos_weight``), :func:`mse`.
Listwise:    :func:`softmax_ce` (InfoNCE over 1+ positives and k negatives), :func:`listnet`,
             :func:`lambda_loss` (LambdaLoss, NDCG-Loss2++ weighting).
Distillation on cached teacher scores: :func:`mse`, :func:`margin_mse`, :func:`kl_div`; on the live
teacher's hidden states (a student made by layer selection): :func:`hidden_mse` (every token), :func:`cls_distance` ([CLS]).
Embeddings: :func:`in_batch_infonce` (multiple-negatives ranking on vectors), :func:`matryoshka` (the
same loss on nested prefixes of the vectors).
jina-reranker-v3's listwise objective (vectors read in one prompt, cosine similarities, temperature τ):
:func:`rank_infonce` (ℓ_rank, and ℓ_dual with the dual query vector), :func:`disperse`,
:func:`similar`, combined by :func:`listwise_objective` with :class:`ListwiseWeights`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NEG_INF = -1e9  # a large negative used instead of -inf so that softmax rows stay finite


def _mask(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.bool()


def bce(scores: torch.Tensor, labels: torch.Tensor, pos_weight: float | None = None,
        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pointwise binary cross-entropy on logits: mean over candidates of
    ``-(w·y·log σ(s) + (1-y)·log(1-σ(s)))``, ``w = pos_weight`` (sentence-transformers sets it to the
    number of negatives per positive, so positives and negatives weigh the same in total)."""
    m = _mask(scores, mask)
    weight = None if pos_weight is None else torch.tensor(pos_weight, dtype=scores.dtype, device=scores.device)
    losses = F.binary_cross_entropy_with_logits(scores, labels.to(scores.dtype), pos_weight=weight, reduction="none")
    return losses[m].mean()


def softmax_ce(scores: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Listwise softmax cross-entropy (InfoNCE): ``-log Σ_{i∈pos} exp(s_i/τ) / Σ_j exp(s_j/τ)`` per list.

    ``labels > 0`` marks positives (several positives share the probability mass). Lists without a
    positive are skipped.
    """
    m = _mask(scores, mask)
    logits = (scores / temperature).masked_fill(~m, NEG_INF)
    pos = (labels > 0) & m
    keep = pos.any(dim=1)
    if not keep.any():
        return scores.sum() * 0.0
    log_denominator = torch.logsumexp(logits, dim=1)
    log_numerator = torch.logsumexp(logits.masked_fill(~pos, NEG_INF), dim=1)
    return (log_denominator - log_numerator)[keep].mean()


def listnet(scores: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """ListNet (top-one probabilities): cross-entropy ``-Σ_i softmax(t)_i · log softmax(s/τ)_i`` between
    the distribution of the targets (graded labels or teacher scores) and the model's."""
    m = _mask(scores, mask)
    target = F.softmax(targets.to(scores.dtype).masked_fill(~m, NEG_INF), dim=1)
    log_p = F.log_softmax((scores / temperature).masked_fill(~m, NEG_INF), dim=1)
    return -(target * log_p).masked_fill(~m, 0.0).sum(dim=1).mean()


def kl_div(scores: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Distillation over lists: ``τ² · KL(softmax(t/τ) ‖ softmax(s/τ))`` per list (Hinton et al.; τ² keeps
    gradient sizes comparable across temperatures)."""
    m = _mask(scores, mask)
    log_q = F.log_softmax((scores / temperature).masked_fill(~m, NEG_INF), dim=1)
    log_p = F.log_softmax((teacher.to(scores.dtype) / temperature).masked_fill(~m, NEG_INF), dim=1)
    kl = (log_p.exp() * (log_p - log_q)).masked_fill(~m, 0.0).sum(dim=1)
    return kl.mean() * temperature**2


def mse(scores: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pointwise distillation: mean of ``(s - t)²`` over candidates."""
    m = _mask(scores, mask)
    return ((scores - teacher.to(scores.dtype)) ** 2)[m].mean()


def margin_mse(scores: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """MarginMSE (Hofstätter et al.): mean over negatives j ≥ 1 of ``((s_0 - s_j) - (t_0 - t_j))²``,
    candidate 0 of each list being the positive."""
    m = _mask(scores, mask)
    t = teacher.to(scores.dtype)
    diff = (scores[:, :1] - scores[:, 1:]) - (t[:, :1] - t[:, 1:])
    return (diff**2)[m[:, 1:]].mean()


def lambda_loss(scores: torch.Tensor, labels: torch.Tensor, sigma: float = 1.0, mu: float = 10.0,
                mask: torch.Tensor | None = None, eps: float = 1e-10) -> torch.Tensor:
    """LambdaLoss with the NDCG-Loss2++ weighting (Wang et al., CIKM 2018), summed over pairs, mean
    over lists.

    Candidates are put in the model's order; for every pair (i, j) with ``y_i > y_j`` the loss is
    ``-log2 σ(σ·(s_i - s_j))^{w_ij}`` with ``w_ij = μ·δ_ij·|G_i - G_j| + ρ_ij·|G_i - G_j|`` where
    ``G = (2^y - 1) / maxDCG``, ``δ_ij = |1/D(|i-j|) - 1/D(|i-j|+1)|`` (NDCG-Loss2) and
    ``ρ_ij = |1/D(i) - 1/D(j)|`` (LambdaRank), ``D(r) = log2(1 + r)`` for 1-based ranks r.
    """
    m = _mask(scores, mask)
    y = labels.to(scores.dtype).masked_fill(~m, -1.0)  # padded entries sink below every real label
    s = scores.masked_fill(~m, NEG_INF)
    s_sorted, order = s.sort(dim=1, descending=True)
    y_by_pred = y.gather(1, order)
    y_ideal, _ = y.sort(dim=1, descending=True)
    n = scores.shape[1]
    ranks = torch.arange(1, n + 1, device=scores.device, dtype=scores.dtype)
    discount = torch.log2(1.0 + ranks)  # D(r)
    gains_ideal = (torch.pow(2.0, y_ideal.clamp_min(0)) - 1.0) / discount
    max_dcg = gains_ideal.sum(dim=1).clamp_min(eps)
    g = (torch.pow(2.0, y_by_pred.clamp_min(0)) - 1.0) / max_dcg[:, None]
    gain_diff = (g[:, :, None] - g[:, None, :]).abs()
    # NDCG-Loss2: delta depends on the rank distance |i - j|
    dist = (ranks[:, None] - ranks[None, :]).abs()
    delta = (1.0 / torch.log2(1.0 + dist).clamp_min(eps) - 1.0 / torch.log2(2.0 + dist)).abs()
    delta = delta.masked_fill(dist == 0, 0.0)
    rho = (1.0 / discount[:, None] - 1.0 / discount[None, :]).abs()
    weights = mu * delta[None] * gain_diff + rho[None] * gain_diff
    valid = (y_by_pred[:, :, None] > y_by_pred[:, None, :]) & (y_by_pred[:, None, :] >= 0)
    diffs = (s_sorted[:, :, None] - s_sorted[:, None, :]).clamp(-1e8, 1e8)
    log_probs = torch.log2(torch.sigmoid(sigma * diffs).clamp_min(eps)) * weights
    per_list = -(log_probs * valid).sum(dim=(1, 2))
    return per_list.mean()


def in_batch_infonce(queries: torch.Tensor, docs: torch.Tensor, targets: torch.Tensor, scale: float = 20.0,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multiple-negatives ranking loss (InfoNCE with in-batch negatives) on embeddings.

    ``queries`` ``[B, d]`` and ``docs`` ``[N, d]`` are L2-normalised here; each query scores every
    document by cosine × ``scale`` (= 1 / temperature; 20 is sentence-transformers' default) and
    ``targets`` ``[B]`` names its positive's column. Every other document of the batch — the other
    queries' positives and any mined hard negatives — is a negative, except where ``mask`` ``[B, N]`` is
    False (documents known to be relevant to that query as well).
    """
    q = F.normalize(queries.float(), dim=-1)
    d = F.normalize(docs.float(), dim=-1)
    scores = (q @ d.T) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, NEG_INF)
    return F.cross_entropy(scores, targets)


def matryoshka(queries: torch.Tensor, docs: torch.Tensor, targets: torch.Tensor, dims: Sequence[int],
               weights: Sequence[float] | None = None, scale: float = 20.0, mask: torch.Tensor | None = None,
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """Matryoshka representation loss (Kusupati et al.): :func:`in_batch_infonce` on the first ``d``
    dimensions of the same vectors for each ``d`` in ``dims`` (each prefix re-normalised), weighted and
    summed; the encoder runs once. Returns the total and each prefix's loss (for logging)."""
    if not dims:
        raise ValueError("matryoshka needs at least one dimension")
    width = queries.shape[-1]
    bad = [d for d in dims if not 1 <= int(d) <= width]
    if bad:
        raise ValueError(f"matryoshka dimensions {bad} are outside 1..{width}")
    ws = list(weights) if weights is not None else [1.0] * len(dims)
    if len(ws) != len(dims):
        raise ValueError(f"{len(ws)} matryoshka weights for {len(dims)} dimensions")
    total = queries.new_zeros((), dtype=torch.float32)
    parts = {}
    for dim, w in zip(dims, ws):
        value = in_batch_infonce(queries[:, : int(dim)], docs[:, : int(dim)], targets, scale, mask)
        parts[f"loss_d{int(dim)}"] = float(value.detach())
        total = total + w * value
    return total, parts


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of ``a`` [..., M, P] with every row of ``b`` [..., N, P] -> [..., M, N]."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).transpose(-1, -2)


def rank_infonce(query: torch.Tensor, docs: torch.Tensor, positive: torch.Tensor,
                 temperature: float = 0.25) -> torch.Tensor:
    """ℓ_rank: InfoNCE of the positive document against the other documents of the same prompt.

    ``query`` [B, P], ``docs`` [B, N, P], ``positive`` [B] (index of the positive in each list):
    ``ℓ = -1/B Σ_b log( exp(cos(q_b, d_b,pos)/τ) / Σ_j exp(cos(q_b, d_b,j)/τ) )``.
    ℓ_dual is the same function given the dual query vector (read right after the first query).
    """
    logits = _cosines(query[:, None], docs)[:, 0] / temperature  # [B, N]
    return F.cross_entropy(logits, positive.to(logits.device).long())


def disperse(docs: torch.Tensor, temperature: float = 0.25) -> torch.Tensor:
    """ℓ_disperse: log-mean-exp of the similarities between distinct documents of a list.

    ``docs`` [B, N, P]: ``ℓ = 1/B Σ_b log( 1/(N(N-1)) Σ_{i≠j} exp(cos(d_b,i, d_b,j)/τ) )`` over every
    positive–negative and negative–negative pair (the dispersive loss of arXiv 2401.08690 on cosines:
    lower when documents spread apart, against a collapse of the document vectors).
    """
    n = docs.shape[1]
    if n < 2:
        return docs.sum() * 0.0
    sims = _cosines(docs, docs) / temperature  # [B, N, N]
    off = ~torch.eye(n, dtype=torch.bool, device=docs.device)
    pairs = sims[:, off]  # [B, N(N-1)]
    return (torch.logsumexp(pairs, dim=1) - math.log(n * (n - 1))).mean()


def similar(docs: torch.Tensor, augmented: torch.Tensor, temperature: float = 0.25) -> torch.Tensor:
    """ℓ_similar: a document and its augmented copy are a positive pair, the other copies negatives.

    ``docs`` and ``augmented`` [B, N, P] (``augmented[b, i]`` is a copy of ``docs[b, i]``):
    ``ℓ = -1/(BN) Σ_b Σ_i log( exp(cos(d_i, d̃_i)/τ) / Σ_j exp(cos(d_i, d̃_j)/τ) )``.
    """
    b, n, _ = docs.shape
    logits = _cosines(docs, augmented) / temperature  # [B, N, N]
    target = torch.arange(n, device=docs.device).expand(b, n)
    return F.cross_entropy(logits.reshape(b * n, n), target.reshape(-1))


@dataclass(frozen=True)
class ListwiseWeights:
    """ℓ = ℓ_rank + disperse·ℓ_disperse + dual·ℓ_dual + similar·ℓ_similar (defaults: jina-reranker-v3's
    paper, arXiv 2509.25085; τ 0.25 is its first training stage)."""

    disperse: float = 0.45
    dual: float = 0.85
    similar: float = 0.85
    temperature: float = 0.25


def listwise_objective(query: torch.Tensor, docs: torch.Tensor, positive: torch.Tensor,
                       dual_query: torch.Tensor | None = None, augmented: torch.Tensor | None = None,
                       weights: ListwiseWeights = ListwiseWeights()) -> dict[str, torch.Tensor]:
    """The four terms and their weighted sum ``"loss"``. A term whose weight is 0 or whose input is
    missing (``dual_query``, ``augmented``) is left out."""
    tau = weights.temperature
    terms = {"rank": rank_infonce(query, docs, positive, tau)}
    if weights.disperse:
        terms["disperse"] = disperse(docs, tau)
    if weights.dual and dual_query is not None:
        terms["dual"] = rank_infonce(dual_query, docs, positive, tau)
    if weights.similar and augmented is not None:
        terms["similar"] = similar(docs, augmented, tau)
    w = {"rank": 1.0, "disperse": weights.disperse, "dual": weights.dual, "similar": weights.similar}
    terms["loss"] = sum(w[k] * v for k, v in terms.items())
    return terms


LOSSES = {
    "bce": "pointwise binary cross-entropy on labels (pos_weight = negatives per positive)",
    "infonce": "listwise softmax cross-entropy over 1 positive + k negatives",
    "listnet": "ListNet cross-entropy against graded labels (or teacher scores)",
    "lambda": "LambdaLoss (NDCG-Loss2++) on labels",
    "mse": "distillation: MSE to teacher scores",
    "margin-mse": "distillation: MarginMSE on teacher(pos) - teacher(neg)",
    "kl": "distillation: KL divergence between teacher and student softmax over each list",
}
# losses on hidden states rather than scores (a ListStep with a live teacher model computes them)
STATE_LOSSES = {
    "hidden": "distillation: MSE of hidden states to the live teacher's mapped layers (layer-selected students)",
    "cls": "distillation: squared distance of normalised [CLS] states to the live teacher's mapped layers (PKD)",
}


def compute(name: str, scores: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None,
            mask: torch.Tensor | None, temperature: float = 1.0, pos_weight: float | None = None) -> torch.Tensor:
    """One named loss (see :data:`LOSSES`) on a batch of lists."""
    if name in ("mse", "margin-mse", "kl") and teacher is None:
        raise ValueError(f"loss {name!r} needs teacher scores (score the training lists with a teacher first)")
    if name == "bce":
        return bce(scores, labels, pos_weight, mask)
    if name == "infonce":
        return softmax_ce(scores, labels, temperature, mask)
    if name == "listnet":
        return listnet(scores, labels if teacher is None else teacher, temperature, mask)
    if name == "lambda":
        return lambda_loss(scores, labels, mask=mask)
    if name == "mse":
        return mse(scores, teacher, mask)
    if name == "margin-mse":
        return margin_mse(scores, teacher, mask)
    if name == "kl":
        return kl_div(scores, teacher, temperature, mask)
    if name in STATE_LOSSES:
        raise ValueError(f"loss {name!r} compares hidden states, not scores: a ListStep with a live teacher "
                         "model computes it (hidden_mse, cls_distance)")
    raise ValueError(f"unknown loss {name!r}; use one of {', '.join(LOSSES)}")


def hidden_mse(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], layer_map: Sequence[int],
               attention_mask: torch.Tensor) -> torch.Tensor:
    """Intermediate-layer distillation (TinyBERT, arXiv 1909.10351): the mean over mapped layers of the MSE
    between the student's hidden states and the teacher's, over real tokens only.

    ``student[i]`` / ``teacher[j]``: ``[B, T, H]`` states, index 0 the embeddings, i the output of layer i;
    ``layer_map[i]`` is the teacher state the student's state i learns (e.g. ``[0, 1, 6]`` for a student
    keeping layers 0 and 5 of six). Every token's state is a target, so a small student gets a dense signal
    where list losses give one scalar per pair."""
    if len(layer_map) != len(student):
        raise ValueError(f"layer_map has {len(layer_map)} entries for {len(student)} student states")
    m = attention_mask.to(torch.bool)
    total = student[0].new_zeros(())
    for s, j in zip(student, layer_map):
        total = total + ((s.float() - teacher[j].float()) ** 2)[m].mean()
    return total / len(student)


def cls_distance(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                 layer_map: Sequence[int]) -> torch.Tensor:
    """Patient knowledge distillation (PKD, arXiv 1908.09355): the mean over mapped layers (not the
    embeddings) of the squared distance between the student's and the teacher's L2-normalised first-token
    ([CLS]) states, so in [0, 4] per pair.

    A cross-encoder's head reads only that state; a layer-selected student starts with a [CLS] that is
    nearly the same for every document (layers 0-1 of six: cosine 1.0 between documents), so its scores
    are flat and list losses give it almost no gradient. This term gives the 384-wide target the head reads
    instead of one scalar per pair."""
    if len(layer_map) != len(student):
        raise ValueError(f"layer_map has {len(layer_map)} entries for {len(student)} student states")
    pairs = [(s, teacher[j]) for s, j in list(zip(student, layer_map))[1:]]
    if not pairs:
        raise ValueError("loss 'cls' needs a student with at least one layer")
    total = student[0].new_zeros(())
    for s, t in pairs:
        diff = F.normalize(s[:, 0].float(), dim=-1) - F.normalize(t[:, 0].float(), dim=-1)
        total = total + (diff ** 2).sum(-1).mean()
    return total / len(pairs)


def parse_loss_spec(spec: str) -> list[tuple[str, float]]:
    """``"infonce+0.5*kl"`` -> ``[("infonce", 1.0), ("kl", 0.5)]``; each name from :data:`LOSSES` or
    :data:`STATE_LOSSES`."""
    terms = []
    for part in spec.replace(" ", "").split("+"):
        if not part:
            continue
        weight, _, name = part.rpartition("*")
        w = float(weight) if weight else 1.0
        if name not in LOSSES and name not in STATE_LOSSES:
            raise ValueError(f"unknown loss {name!r} in {spec!r}; use one of {', '.join([*LOSSES, *STATE_LOSSES])}")
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"loss weight must be a non-negative number, got {weight!r}")
        terms.append((name, w))
    if not terms:
        raise ValueError("empty loss specification")
    return terms
