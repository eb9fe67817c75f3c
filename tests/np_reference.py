"""numpy references shared by several test modules (no mxmask or MXNet code)."""
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
