"""The matrix a link graph implies, its best rank-K approximation, and what each component holds.

Row ``i`` of the matrix is the next-token distribution after token ``i``, as *centred
log-probabilities*::

    P[i, j] = (1 - s) * w[i, j] / sum_j w[i, j]  +  s / V     (s: smoothing; a source without
    M[i, j] = log P[i, j] - mean_j log P[i, j]                   links gets the uniform row)

Why log-probabilities and not PMI: the compiled model's logits *are* this matrix (or its rank-K
approximation), and a transformer turns logits into next-token probabilities with a softmax. At
full rank ``softmax(M[i]) == P[i]`` exactly, so the model starts as the graph's bigram model and
its training loss is the graph's cross-entropy. PMI (``log P[i, j] - log P[j]``) differs from
``log P`` by a per-*column* term, which a softmax does not ignore; the model would need a bias
per output token to undo it, and GPT-2's output layer has none.

Why centred: softmax is shift-invariant per row, so a row's mean is invisible to the model.
Left in, it would cost rank (the all-ones direction is typically the largest singular
direction of raw log-probabilities) while changing nothing the model can express. So the
compiled logits equal ``M_K`` exactly, and equal the rank-K approximation of ``log P`` up to a
per-row constant.

Eckart–Young: the truncated SVD ``M_K = U_K S_K V_K^T`` is the closest rank-K matrix to ``M``
in Frobenius norm, and the distance is ``sqrt(sum_{k>K} s_k^2)``; :func:`factorise` reports it
both ways (the residual measured, and the discarded singular values), which must agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lmtune.compile.graph import Link
from lmtune.errors import InputError


@dataclass
class Factors:
    """The truncated SVD of the graph matrix and its approximation error.

    ``rows`` ``(V, K)`` = ``U_K S_K^½`` (what each token writes into the model), ``cols`` ``(V, K)``
    = ``V_K S_K^½`` (how each next token reads it): ``rows @ cols.T == M_K``.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    singular_values: torch.Tensor  # (min V,) all of them, descending
    residual_frobenius: float  # ||M - M_K||_F, measured
    discarded_root: float  # sqrt(sum of discarded singular values squared)
    total_norm: float  # ||M||_F

    @property
    def rank(self) -> int:
        return self.rows.shape[1]

    def as_dict(self) -> dict[str, Any]:
        energy = self.singular_values.square()
        return {
            "rank": self.rank,
            "residual_frobenius": self.residual_frobenius,
            "discarded_singular_values_root": self.discarded_root,
            "relative_error": self.residual_frobenius / max(self.total_norm, 1e-300),
            "energy_kept": float(energy[: self.rank].sum() / energy.sum()) if energy.sum() > 0 else 1.0,
            "singular_values": [round(float(s), 6) for s in self.singular_values],
        }


def graph_matrix(links: list[Link], index: dict[str, int], vocab_size: int, smoothing: float) -> torch.Tensor:
    """The centred log-probability matrix ``M`` ``(V, V)``, float64, of the links over ``index``.

    Args:
        links: the graph; every source and target must be a key of ``index``.
        index: token -> row/column id.
        vocab_size: V, the number of rows and columns.
        smoothing: the probability mass ``s`` in (0, 1] spread evenly over all V next tokens.
    """
    if not 0 < smoothing <= 1:
        raise InputError(f"smoothing={smoothing} must be in (0, 1]: the share of each row's probability spread "
                         "evenly over all tokens (0 would give unlinked pairs log 0 = -inf)")
    weights = torch.zeros(vocab_size, vocab_size, dtype=torch.float64)  # (V, V)
    for link in links:
        weights[index[link.source], index[link.target]] += link.weight
    totals = weights.sum(dim=1, keepdim=True)  # (V, 1)
    linked = totals > 0
    probs = torch.where(linked, (1 - smoothing) * weights / totals.clamp_min(1e-300) + smoothing / vocab_size,
                        torch.full_like(weights, 1.0 / vocab_size))  # (V, V), rows sum to 1
    logp = probs.log()
    return logp - logp.mean(dim=1, keepdim=True)


def factorise(matrix: torch.Tensor, rank: int) -> Factors:
    """Truncated SVD of ``matrix`` ``(V, V)`` at ``rank`` with its error measured two ways.

    Raises:
        InputError: ``rank`` is below 1 or above V.
    """
    v = matrix.shape[0]
    if not 1 <= rank <= v:
        raise InputError(f"rank={rank} must be between 1 and the vocabulary size {v} (the matrix is {v} x {v}, "
                         f"so it has at most {v} components)")
    u, s, vh = torch.linalg.svd(matrix.double())  # (V, V), (V,), (V, V)
    root = s[:rank].sqrt()
    rows = u[:, :rank] * root  # (V, K)
    cols = vh[:rank].T * root  # (V, K)
    residual = torch.linalg.matrix_norm(matrix - rows @ cols.T)
    return Factors(rows=rows, cols=cols, singular_values=s, residual_frobenius=float(residual),
                   discarded_root=float(s[rank:].square().sum().sqrt()),
                   total_norm=float(torch.linalg.matrix_norm(matrix)))


def dominant_links(factors: Factors, links: list[Link], index: dict[str, int], components: int = 5,
                   per_component: int = 3) -> list[dict[str, Any]]:
    """For each top component, the graph's links whose logit it raises most.

    Component k adds ``s_k * u[i, k] * v[j, k]`` to the logit of ``j`` after ``i`` (the sign
    convention of the singular vectors cancels in the product).
    """
    src = torch.tensor([index[link.source] for link in links])
    tgt = torch.tensor([index[link.target] for link in links])
    report = []
    for k in range(min(components, factors.rank)):
        contrib = factors.rows[src, k] * factors.cols[tgt, k]  # (L,) this component's share of each link's logit
        top = contrib.argsort(descending=True)[:per_component]
        report.append({
            "component": k + 1,
            "singular_value": float(factors.singular_values[k]),
            "links": [[links[i].source, links[i].target, round(float(contrib[i]), 4)] for i in top.tolist()],
        })
    return report
