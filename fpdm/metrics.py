"""Distances between sets of features: Frechet distance (FID's), precision and recall (Kynkaanniemi et al.),
the Inception Score. Plain float64 NumPy (and torch for the nearest neighbours); no network here."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .checks import InputError

__all__ = [
    "FeatureStats", "feature_stats", "frechet_distance", "frechet_from_moments", "frechet_to_moments",
    "trace_sqrt_product",
    "precision_recall", "inception_score",
]  # fmt: skip


class FeatureStats(NamedTuple):
    """The moments of a set of features: ``mu`` (d,) and ``sigma`` (d, d), float64 (pytorch-fid's npz keys)."""

    mu: np.ndarray
    sigma: np.ndarray


def feature_stats(features: np.ndarray | Tensor) -> FeatureStats:
    """Mean and covariance (N - 1 normalised, as ADM's evaluator and pytorch-fid: np.cov) of features (N, d)."""
    feats = np.asarray(features, dtype=np.float64)
    feats = feats.reshape(len(feats), -1)
    return FeatureStats(feats.mean(0), np.atleast_2d(np.cov(feats, rowvar=False)))


def _check_finite(feats: np.ndarray, name: str) -> None:
    if not np.isfinite(feats).all():
        raise InputError(f"the {name} set's features hold NaN or Inf (non-finite images?): no Frechet distance")


def frechet_distance(a: np.ndarray | Tensor, b: np.ndarray | Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between two sets of features (N, d), in float64.
    With fewer samples than dimensions Tr((S_a S_b)^(1/2)) comes from the samples (exact, cheap); otherwise
    this is ``frechet_from_moments`` of their moments."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    _check_finite(a, "first")
    _check_finite(b, "second")
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    (mu_a, cov_a), (mu_b, cov_b) = feature_stats(a), feature_stats(b)
    if min(len(a), len(b)) < a.shape[1]:
        cross = trace_sqrt_product(a - mu_a, b - mu_b, cov_a, cov_b, from_samples=True)
        return _frechet(mu_a, cov_a, mu_b, cov_b, cross)
    return frechet_from_moments(mu_a, cov_a, mu_b, cov_b)


def frechet_from_moments(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """The Frechet distance between Gaussians N(mu_a, cov_a) and N(mu_b, cov_b), in float64: FID from
    statistics (an ADM reference batch's or pytorch-fid's ``mu``, ``sigma``). Moments of different dimensions
    or holding NaN/Inf are an InputError."""
    mu_a, cov_a, mu_b, cov_b = _checked_moments(mu_a, cov_a, mu_b, cov_b)
    return _frechet(mu_a, cov_a, mu_b, cov_b, trace_sqrt_product(None, None, cov_a, cov_b, from_samples=False))


def frechet_to_moments(a: np.ndarray | Tensor, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """The Frechet distance between features a (N, d) and statistics (mu_b, cov_b): ``frechet_from_moments``
    of a's moments and them. With fewer samples than dimensions, through the samples: S_a S_b's nonzero
    eigenvalues are those of the symmetric PSD (N, N) matrix A S_b A^T / (N - 1), A the centred samples
    (exact; O(N d^2) rather than two d x d eigendecompositions: 500 samples against FID-50K statistics)."""
    a = np.asarray(a, dtype=np.float64)
    _check_finite(a, "first")
    a = a.reshape(len(a), -1)
    mu_a, cov_a, mu_b, cov_b = _checked_moments(*feature_stats(a), mu_b, cov_b)
    if len(a) > a.shape[1]:
        return frechet_from_moments(mu_a, cov_a, mu_b, cov_b)
    centred = a - mu_a
    inner = centred @ cov_b @ centred.T / (len(a) - 1)  # (N, N)
    cross = float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum())
    return _frechet(mu_a, cov_a, mu_b, cov_b, cross)


def _checked_moments(mu_a, cov_a, mu_b, cov_b) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    mu_a, mu_b = (np.atleast_1d(np.asarray(m, dtype=np.float64)) for m in (mu_a, mu_b))
    cov_a, cov_b = (np.atleast_2d(np.asarray(c, dtype=np.float64)) for c in (cov_a, cov_b))
    d = mu_a.shape[0]
    if mu_a.shape != (d,) or mu_b.shape != (d,) or cov_a.shape != (d, d) or cov_b.shape != (d, d):
        raise InputError(f"statistics of different dimensions: mu {mu_a.shape} and {mu_b.shape}, sigma "
                         f"{cov_a.shape} and {cov_b.shape}")  # fmt: skip
    for name, (mu, cov) in (("first", (mu_a, cov_a)), ("second", (mu_b, cov_b))):
        if not (np.isfinite(mu).all() and np.isfinite(cov).all()):
            raise InputError(f"the {name} set's statistics hold NaN or Inf: no Frechet distance")
    return mu_a, cov_a, mu_b, cov_b


def _frechet(mu_a, cov_a, mu_b, cov_b, cross: float) -> float:
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def trace_sqrt_product(
    a: np.ndarray | None, b: np.ndarray | None, cov_a: np.ndarray, cov_b: np.ndarray, *, from_samples: bool
) -> float:
    """Tr((S_a S_b)^(1/2)) for covariances S_a, S_b (d, d) of the centred samples a (N_a, d), b (N_b, d)
    (needed only ``from_samples``).

    It is the sum of the square roots of S_a S_b's eigenvalues, which are those of the symmetric PSD
    S_a^(1/2) S_b S_a^(1/2): real and >= 0 (rounding's negatives are clipped), by two symmetric
    eigendecompositions (~1 s at d = 2048, where scipy.linalg.sqrtm of the product takes ~20 s and needs
    pytorch-fid's regularisation when it is singular). ``from_samples`` (fewer samples than dimensions):
    S_a S_b's nonzero eigenvalues are the squared singular values of a b^T / sqrt((N_a - 1)(N_b - 1)), an
    (N_a, N_b) matrix, so a few images cost microseconds. Both are exact; tests compare them with each
    other and with closed forms."""
    if from_samples:
        scale = np.sqrt((len(a) - 1) * (len(b) - 1))
        return float(np.linalg.svd(a @ b.T, compute_uv=False).sum() / scale)
    w, v = np.linalg.eigh(cov_a)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # S_a^(1/2)
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(root @ cov_b @ root), 0, None)).sum())


@torch.no_grad()
def precision_recall(
    real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, *, k: int = 3, batch_size: int = 10000,
    device: torch.device | str = "cpu",
) -> tuple[float, float]:  # fmt: skip
    """Improved precision and recall (Kynkaanniemi et al. 2019) of ``fake`` features (M, d) against ``real``
    (N, d), as ADM's evaluator and torch-fidelity compute them: each set's manifold is the union of balls
    around its points reaching their k-th nearest neighbour in the set (the point itself not counted);
    precision is the share of fake points inside the real manifold, recall the share of real points inside
    the fake one (a point on a ball's surface is inside). Distances in float32 on ``device``, in blocks of
    ``batch_size`` rows and columns: memory ``batch_size``^2 floats, whatever N and M."""
    real, fake = (torch.as_tensor(np.asarray(f), dtype=torch.float32, device=device) for f in (real, fake))
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise InputError(f"precision/recall needs two feature sets (N, d) of one d, got {tuple(real.shape)} and "
                         f"{tuple(fake.shape)}")  # fmt: skip
    if min(len(real), len(fake)) <= k:
        raise InputError(f"precision/recall with k = {k} needs more than {k} points in each set, got "
                         f"{len(real)} real and {len(fake)} fake")  # fmt: skip

    def radii(points: Tensor) -> Tensor:  # (N,): distance to the k-th neighbour (itself is the 0th)
        out = []
        for rows in points.split(batch_size):
            nearest = rows.new_full((len(rows), 0), float("inf"))  # the k + 1 smallest so far, per row
            for cols in points.split(batch_size):
                both = torch.cat([nearest, torch.cdist(rows, cols)], dim=1)
                nearest = both.topk(min(k + 1, both.shape[1]), dim=1, largest=False).values
            out.append(nearest[:, k])
        return torch.cat(out)

    def inside(points: Tensor, centres: Tensor, radius: Tensor) -> float:  # the share of points in any ball
        hits = []
        for rows in points.split(batch_size):
            hit = torch.zeros(len(rows), dtype=torch.bool, device=rows.device)
            for cols, r in zip(centres.split(batch_size), radius.split(batch_size)):
                hit |= (torch.cdist(rows, cols) <= r).any(dim=1)
            hits.append(hit)
        return float(torch.cat(hits).double().mean())

    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def inception_score(logits: np.ndarray | Tensor, split_size: int = 5000) -> float:
    """exp(E_x KL(p(y|x) || p(y))) from Inception logits (N, 1008), as ADM's evaluator computes it: softmax
    of the unbiased logits, consecutive splits of ``split_size`` images, the mean of their scores (in float64).
    torch-fidelity shuffles first and uses 10 splits: the same for N <= split_size up to the split."""
    logits = torch.as_tensor(logits, dtype=torch.float64).detach()
    scores = []
    for part in logits.split(split_size):
        log_p = part.log_softmax(1)
        log_marginal = torch.logsumexp(log_p, 0) - np.log(len(part))  # log of the mean of p(y|x) over x
        scores.append((log_p.exp() * (log_p - log_marginal)).sum(1).mean().exp())
    return float(torch.stack(scores).mean())
