"""FID and KID on Inception features: feature statistics, the Frechet distance, the polynomial-kernel MMD.

Frechet distance (Heusel et al. 2017) between N(mu1, S1) and N(mu2, S2):

    ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2})

Only the trace of the square root is needed: the sum of the square roots of the eigenvalues of S1 S2. Take
any F with F F^T = S1 (Cholesky factor, S1^{1/2}, or the centred samples / sqrt(N - 1)). Then S1 S2 = F (F^T S2)
and (F^T S2) F = F^T S2 F, and AB and BA have the same non-zero eigenvalues for any A (D x K), B (K x D).
F^T S2 F is symmetric positive semi-definite, so ``eigvalsh`` gives its eigenvalues stably and real
(rounding negatives are clipped to 0). This holds for singular S1 (fewer samples than feature dimensions),
where a general ``sqrtm`` of the non-symmetric S1 S2 returns complex noise and needs an epsilon added to
the diagonals. Each eigenvalue carries an error of about eps * ||S1|| * ||S2||, so a zero one can add its
square root (~1e-8 relative) to the trace: the accuracy limit of any backward-stable route.

KID (Binkowski et al. 2018): the unbiased estimate of MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3,
averaged over random subsets; the spread over subsets is its standard deviation.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .inception import FEATURE_DIM

# Below this many samples per set FID is not meaningful: the covariance of 2048-d features has rank < 2048
# and FID's bias (it falls as 1/N) dominates differences between models.
FID_MIN_SAMPLES = 2048
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
# KID is unbiased at any size but noisy on small subsets; below this the note says to read kid_std.
KID_NOISY_BELOW = 100
# Sets of up to this many samples together get one precomputed kernel matrix (8192^2 float32 = 268 MB):
# (N1 + N2)^2 products instead of 3 * subsets * subset_size^2, ~10x less work for 2 x 4096 samples.
_KID_GRAM_MAX = 8192


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, float64) of (N, D) features; N >= 2."""
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"feature_stats needs an (N, D) array with N >= 2, got shape {feats.shape}")
    if not np.isfinite(feats).all():
        raise ValueError("feature_stats: features contain NaN or inf (broken Inception weights?)")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _trace_sqrt(factor: torch.Tensor, sigma2: torch.Tensor) -> float:
    """Tr((F F^T S2)^{1/2}) as the sum of square roots of the eigenvalues of the symmetric F^T S2 F."""
    inner = factor.T @ sigma2 @ factor
    eig = torch.linalg.eigvalsh((inner + inner.T) / 2)
    return float(eig.clamp_min(0.0).sqrt().sum())


def _psd_factor(sigma: torch.Tensor) -> torch.Tensor:
    """Some F with F F^T = sigma: Cholesky when it succeeds, else from the eigendecomposition (singular sigma)."""
    chol, info = torch.linalg.cholesky_ex(sigma)
    if int(info) == 0:
        return chol
    w, v = torch.linalg.eigh(sigma)
    return v * w.clamp_min(0.0).sqrt()


def _sym(a: np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(a, dtype=np.float64))
    return (t + t.T) / 2


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S1 S2)^{1/2}) for symmetric PSD S1, S2 (float64, with torch's LAPACK: ~5x numpy's here)."""
    s1 = _sym(sigma1)
    return _trace_sqrt(_psd_factor(s1), _sym(sigma2))


def _fd(m1: np.ndarray, s1: np.ndarray, m2: np.ndarray, s2: np.ndarray, tr_sqrt: float) -> float:
    diff = m1 - m2
    value = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt
    # The true value is >= 0; only rounding makes it slightly negative for identical statistics.
    return float(max(value, 0.0))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between two Gaussians (FID when the statistics are of Inception features)."""
    m1, m2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = m1.shape[0]
    if m1.shape != (d,) or m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"frechet_distance: shapes do not match: mu {m1.shape}, {m2.shape}; "
                         f"sigma {s1.shape}, {s2.shape}")
    if not all(np.isfinite(a).all() for a in (m1, m2, s1, s2)):
        raise ValueError("frechet_distance: statistics contain NaN or inf")
    return _fd(m1, s1, m2, s2, trace_sqrt_product(s1, s2))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """``frechet_distance(*feature_stats(f1), *feature_stats(f2))``, faster when a set is smaller than D.

    The centred features of the smaller set, divided by sqrt(N - 1), are an exact factor of its covariance
    (N columns), so the eigenproblem is N x N instead of D x D.
    """
    (m1, s1), (m2, s2) = feature_stats(features1), feature_stats(features2)
    if m1.shape != m2.shape:
        raise ValueError(f"fid_from_features: feature sizes differ: {m1.shape[0]} and {m2.shape[0]}")
    small, other = (features1, s2) if len(features1) <= len(features2) else (features2, s1)
    feats = np.asarray(small, dtype=np.float64)
    if len(feats) - 1 < feats.shape[1]:
        factor = torch.as_tensor((feats - feats.mean(axis=0)).T / np.sqrt(len(feats) - 1))
        tr_sqrt = _trace_sqrt(factor, _sym(other))
    else:
        tr_sqrt = trace_sqrt_product(s1, s2)
    return _fd(m1, s1, m2, s2, tr_sqrt)


def _poly_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    k = a @ b.T / a.shape[1] + 1.0
    return k * k * k


def _kernel_matrix(z: np.ndarray, rows_per_block: int = 1024) -> np.ndarray:
    """The kernel over all pairs of rows of z, computed in float64 by blocks and stored as float32.

    float32 storage halves the memory; its rounding (~6e-8 relative, unbiased) averages out in the sums.
    """
    out = np.empty((len(z), len(z)), dtype=np.float32)
    for start in range(0, len(z), rows_per_block):
        out[start:start + rows_per_block] = _poly_kernel(z[start:start + rows_per_block], z)
    return out


def _unbiased_mmd2(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    m = len(kxx)
    within = (kxx.sum(dtype=np.float64) - np.trace(kxx, dtype=np.float64) + kyy.sum(dtype=np.float64)
              - np.trace(kyy, dtype=np.float64)) / (m * (m - 1))
    return float(within - 2.0 * kxy.mean(dtype=np.float64))


def kid(features1: np.ndarray, features2: np.ndarray, subsets: int = KID_SUBSETS,
        subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: (mean, std) of the unbiased MMD^2 over random subsets.

    Subsets hold ``min(subset_size, N1, N2)`` samples of each set, drawn without replacement. When that is
    both whole sets, every subset gives the same value: it is computed once and the std is NaN (no spread
    estimate exists).
    """
    x = np.asarray(features1, dtype=np.float64)
    y = np.asarray(features2, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"kid needs two (N, D) arrays with the same D, got {x.shape} and {y.shape}")
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError(f"kid needs at least 2 samples per set, got {len(x)} and {len(y)}")
    if subsets < 1:
        raise ValueError(f"kid needs subsets >= 1, got {subsets}")
    if m == len(x) == len(y):
        return _unbiased_mmd2(_poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)), float("nan")
    rng = np.random.default_rng(seed)
    # Up to a few thousand samples, one kernel matrix over both sets costs far less than three per subset.
    whole = _kernel_matrix(np.concatenate([x, y])) if len(x) + len(y) <= _KID_GRAM_MAX else None
    values = []
    for _ in range(subsets):
        ix, iy = rng.choice(len(x), m, replace=False), rng.choice(len(y), m, replace=False)
        if whole is not None:
            jy = iy + len(x)
            kernels = whole[np.ix_(ix, ix)], whole[np.ix_(jy, jy)], whole[np.ix_(ix, jy)]
        else:
            xs, ys = x[ix], y[iy]
            kernels = _poly_kernel(xs, xs), _poly_kernel(ys, ys), _poly_kernel(xs, ys)
        values.append(_unbiased_mmd2(*kernels))
    return float(np.mean(values)), float(np.std(values))


class FidEvaluator:
    """Runs the FID Inception over uint8 images in batches and returns their 2048-d pool3 features."""

    def __init__(self, inception: nn.Module, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.inception = inception.to(self.device).eval()
        self.batch_size = batch_size

    def features(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, C) uint8 images (C = 3 RGB, 1 grey, 4 RGBA with alpha ignored) -> (N, 2048) float32."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
            raise ValueError(f"FidEvaluator.features expects uint8 (N, H, W, C) images with C in 1/3/4, got "
                             f"{images.dtype} {images.shape}")
        out = []
        # cuDNN's default TF32 convolutions move the features by ~1e-3 (relative) and FID with them; full fp32
        # keeps CUDA within ~1e-6 of the CPU (measured on an H200). Restored afterwards: training may want TF32.
        tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            # autocast off: a caller inside a bf16/fp16 autocast region must still get fp32 features.
            with torch.inference_mode(), torch.autocast(self.device.type, enabled=False):
                for start in range(0, len(images), self.batch_size):
                    batch = torch.from_numpy(np.ascontiguousarray(images[start:start + self.batch_size]))
                    x = batch.to(self.device).permute(0, 3, 1, 2).float() / 255.0
                    if x.shape[1] == 1:
                        x = x.expand(-1, 3, -1, -1)
                    out.append(self.inception(x[:, :3]).float().cpu().numpy())
        finally:
            torch.backends.cudnn.allow_tf32 = tf32
        if not out:
            return np.zeros((0, FEATURE_DIM), dtype=np.float32)
        return np.concatenate(out, axis=0)
