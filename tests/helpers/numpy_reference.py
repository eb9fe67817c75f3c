"""numpy references shared by several test modules (no mxmask or MXNet code).

    np_group_norm(x (N, C, ...), groups, gamma, beta)      -> GroupNorm
    np_roi_align(feature (C, H, W), roi (4,), scale, pooled, sampling_ratio, aligned)
                                                           -> (C, pooled, pooled), as MXNet's
                                                              roi_align.cc samples and averages
"""
import math

import numpy as np


def np_group_norm(x, groups, gamma=None, beta=None, eps=1e-5):
    """GroupNorm of x (N, C, ...) with ``groups`` groups: each (sample, group) normalised with its
    mean and biased variance, then the per-channel affine (skipped when gamma and beta are None).

    Returns (y, x_hat), x_hat being the normalised input before the affine (the gamma gradient
    is sum(dy * x_hat)). Computed in float64."""
    x = np.asarray(x, np.float64)
    grouped = x.reshape(x.shape[0], groups, -1)
    x_hat = ((grouped - grouped.mean(-1, keepdims=True))
             / np.sqrt(grouped.var(-1, keepdims=True) + eps)).reshape(x.shape)
    if gamma is None and beta is None:
        return x_hat, x_hat
    bshape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    return x_hat * np.reshape(gamma, bshape) + np.reshape(beta, bshape), x_hat


def _axis_weights(start, bin_size, pooled, grid, size):
    """(pooled, size) matrix: the mean over the grid samples of each bin's bilinear weights.

    RoIAlign's sampling is separable (the validity test and the bilinear weights factor into
    y and x parts), so pooled[c] = Wy @ feature[c] @ Wx.T.
    """
    m = np.zeros((pooled, size))
    for p in range(pooled):
        for i in range(grid):
            y = start + p * bin_size + (i + 0.5) * bin_size / grid
            if y < -1.0 or y > size:
                continue
            y = max(y, 0.0)
            lo = int(y)
            if lo >= size - 1:
                lo = hi = size - 1
                y = float(lo)
            else:
                hi = lo + 1
            frac = y - lo
            m[p, lo] += 1.0 - frac
            m[p, hi] += frac
    return m / grid


def np_roi_align_weights(roi, scale, pooled, sampling_ratio, aligned, height, width):
    off = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = [float(v) * scale - off for v in roi]
    rw, rh = x2 - x1, y2 - y1
    if not aligned:
        rw, rh = max(rw, 1.0), max(rh, 1.0)
    gh = sampling_ratio if sampling_ratio > 0 else int(math.ceil(rh / pooled))
    gw = sampling_ratio if sampling_ratio > 0 else int(math.ceil(rw / pooled))
    wy = _axis_weights(y1, rh / pooled, pooled, gh, height)
    wx = _axis_weights(x1, rw / pooled, pooled, gw, width)
    return wy, wx


def np_roi_align(feature, roi, scale, pooled, sampling_ratio, aligned):
    """feature (C, H, W), roi (4,) input pixels -> (C, pooled, pooled)."""
    wy, wx = np_roi_align_weights(roi, scale, pooled, sampling_ratio, aligned, *feature.shape[1:])
    return np.einsum("ph,chw,qw->cpq", wy, feature.astype(np.float64), wx)
