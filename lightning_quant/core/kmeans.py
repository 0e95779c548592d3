"""k-means for codebook quantizers: seeded k-means++ initialisation and batched Lloyd iterations, CPU or GPU.

Codebook quantizers (kernel quantization, SLQ/MLQ) cluster a layer's weights -- scalars or whole k x k kernels --
and store one index per weight or kernel plus the centres. :func:`kmeans` follows Lloyd's algorithm as
scikit-learn's ``KMeans(algorithm="lloyd")`` does, so that both reach the same centres and inertia from the same
initial centres:

* assignment: each point to its nearest centre (squared Euclidean distance, computed in chunks of ``batch_size``
  points as ``|x|^2 - 2 x.c + |c|^2``, so memory stays bounded on large layers);
* update: each centre to the mean of its points; a centre left without points is moved to a point far from its
  own centre (like scikit-learn's relocation, without its correction of the donor clusters' means); *fixed*
  centres (e.g. SLQ's centre at exactly 0) never move;
* stop when no assignment changes, when every centre moved by at most ``tol`` (squared shift summed over the
  centres, as scikit-learn does), or after ``iterations``; the final labels and inertia come from the final
  centres.

>>> x = torch.tensor([[0.0], [0.1], [1.0], [1.1]], dtype=torch.float64)
>>> result = kmeans(x, torch.tensor([[0.0], [1.0]], dtype=torch.float64))
>>> result.centers.flatten().tolist(), result.labels.tolist(), round(result.inertia, 4)
([0.05, 1.05], [0, 0, 1, 1], 0.01)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_quant.core.errors import QuantizationConfigError

#: points per chunk of the distance computation
DEFAULT_BATCH_SIZE = 65536


@dataclass(frozen=True)
class KMeansResult:
    """What :func:`kmeans` returns.

    Attributes:
        centers: ``[k, d]`` final centres.
        labels: ``[n]`` index of each point's nearest final centre (long).
        inertia: sum of squared distances of the points to their centres.
        iterations: Lloyd iterations run.
    """

    centers: Tensor
    labels: Tensor
    inertia: float
    iterations: int


def nearest(x: Tensor, centers: Tensor, batch_size: int = DEFAULT_BATCH_SIZE) -> tuple[Tensor, Tensor]:
    """``(labels, squared distances)`` of each row of ``x`` to its nearest row of ``centers``, in chunks."""
    center_sq = (centers * centers).sum(dim=1)
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dists = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], batch_size):
        chunk = x[start : start + batch_size]
        d = (chunk * chunk).sum(dim=1, keepdim=True) - 2.0 * chunk @ centers.T + center_sq
        best, index = d.min(dim=1)
        labels[start : start + batch_size] = index
        dists[start : start + batch_size] = best.clamp_min(0.0)
    return labels, dists


def kmeans_plus_plus(x: Tensor, k: int, seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE) -> Tensor:
    """``k`` initial centres by k-means++ (Arthur & Vassilvitskii, 2007): each next centre is a point drawn with
    probability proportional to its squared distance to the nearest centre so far. Seeded, device-agnostic."""
    generator = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centers = [x[first]]
    closest = nearest(x, x[first : first + 1], batch_size)[1]
    for _ in range(1, k):
        weights = closest.double().cpu()
        if float(weights.sum()) <= 0.0:  # every point is already a centre: take any point
            pick = int(torch.randint(n, (1,), generator=generator))
        else:
            pick = int(torch.multinomial(weights, 1, generator=generator))
        centers.append(x[pick])
        closest = torch.minimum(closest, nearest(x, x[pick : pick + 1], batch_size)[1])
    return torch.stack(centers)


def kmeans(
    x: Tensor,
    init: Tensor | int,
    *,
    iterations: int = 50,
    tol: float = 0.0,
    fixed: Tensor | None = None,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> KMeansResult:
    """Cluster the rows of ``x`` (``[n, d]``) with Lloyd's algorithm (see the module docs).

    Args:
        x: the points, one per row (a 1-D tensor is taken as ``n`` scalars).
        init: the initial centres ``[k, d]``, or ``k`` to draw them with seeded k-means++.
        iterations: the most Lloyd iterations.
        tol: stop when the summed squared centre shift is at most this.
        fixed: ``[k]`` boolean mask of centres that never move.
        seed: the k-means++ seed (when ``init`` is an int).
        batch_size: points per chunk of the distance computation.

    Raises:
        QuantizationConfigError: fewer points than centres, or a bad argument.
    """
    if x.dim() == 1:
        x = x.unsqueeze(1)
    if x.dim() != 2 or x.shape[0] == 0:
        raise QuantizationConfigError(f"`x` must be a non-empty [n, d] tensor of points, got shape {tuple(x.shape)}.")
    if isinstance(init, int):
        if not 1 <= init <= x.shape[0]:
            raise QuantizationConfigError(
                f"`init` = {init} centres for {x.shape[0]} points: k-means needs 1 <= k <= n. HINT: use fewer "
                "codebook entries (a smaller index width) for this tensor."
            )
        centers = kmeans_plus_plus(x, init, seed, batch_size)
    else:
        centers = init.to(device=x.device, dtype=x.dtype)
        if centers.dim() == 1:
            centers = centers.unsqueeze(1)
        if centers.shape[1] != x.shape[1] or centers.shape[0] > x.shape[0]:
            raise QuantizationConfigError(
                f"`init` centres of shape {tuple(centers.shape)} do not fit {x.shape[0]} points of dimension "
                f"{x.shape[1]}: pass [k, {x.shape[1]}] centres with k <= {x.shape[0]}."
            )
    centers = centers.clone()
    k = centers.shape[0]
    movable = torch.ones(k, dtype=torch.bool, device=x.device) if fixed is None else ~fixed.to(x.device).bool()
    labels = None
    done = 0
    for step in range(1, iterations + 1):
        done = step
        new_labels, dists = nearest(x, centers, batch_size)
        counts = torch.bincount(new_labels, minlength=k)
        sums = torch.zeros_like(centers).index_add_(0, new_labels, x)
        empty = (counts == 0) & movable
        updated = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None].to(x.dtype), centers)
        if bool(empty.any()):
            # like scikit-learn: an empty cluster takes one of the points farthest from their own centres
            far = torch.argsort(dists, descending=True)[: int(empty.sum())]
            updated[empty] = x[far]
        updated = torch.where(movable[:, None], updated, centers)
        shift = float(((updated - centers) ** 2).sum())
        centers = updated
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        if shift <= tol:
            break
    labels, dists = nearest(x, centers, batch_size)
    return KMeansResult(centers, labels, float(dists.double().sum()), done)


__all__ = ["DEFAULT_BATCH_SIZE", "KMeansResult", "kmeans", "kmeans_plus_plus", "nearest"]
