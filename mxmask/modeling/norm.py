"""Normalisation layers for the backbone, the FPN and the RoI heads, chosen by name.

    make_norm(kind, channels, gn_groups=32, prefix=None, epsilon=1e-5, num_devices=None)
        -> block: input (N, C, H, W) -> output (N, C, H, W), with C == channels

kinds:
- ``frozen_bn``: :class:`FrozenBatchNorm`, a BatchNorm fixed to its running statistics; the
  parameter names are BatchNorm's, so GluonCV ImageNet files load.
- ``bn``: ``mx.gluon.nn.BatchNorm`` (batch statistics while training).
- ``syncbn``: ``mx.gluon.contrib.nn.SyncBatchNorm`` over ``num_devices`` contexts.
- ``gn``: :class:`GroupNorm`, ``gn_groups`` groups with a per-channel affine (gamma and beta of
  shape ``(C,)``, as in the GroupNorm paper, PyTorch and Detectron2).
"""
import warnings

import mxnet as mx
import numpy as np
from mxnet.gluon import nn
from mxnet.gluon.block import HybridBlock

from ..ops import compiled_kernels_active
from ..utils import UserError

_AFFINE_EPS = 1e-5

NORM_KINDS = ("frozen_bn", "bn", "syncbn", "gn")

# A graph traced inside compiled_kernels (GroupNorm below) leaves the affine's constants unused.
_UNUSED_AFFINE = r"Parameter (\S*affine_(mean|var),? )+is not used by any computation"
warnings.filterwarnings("ignore", message=_UNUSED_AFFINE)


class FrozenBatchNorm(nn.BatchNorm):
    """A BatchNorm fixed to its running statistics, with no trainable parameter.

    An ``nn.BatchNorm`` that always uses its running statistics (``use_global_stats=True``) and
    whose gamma, beta, running_mean and running_var all have ``grad_req='null'``: a fixed
    per-channel affine ``y = (x - running_mean) / sqrt(running_var + eps) * gamma + beta`` in
    training and in inference, whose statistics never move. Same parameters and names as
    ``nn.BatchNorm`` (``gamma``, ``beta``, ``running_mean``, ``running_var``). Input and output
    ``(N, C, H, W)``.

    Args:
        in_channels: C.
        epsilon: added to the variance.
        prefix, params: as for any Gluon block.
    """

    def __init__(self, in_channels, epsilon=1e-5, prefix=None, params=None):
        super(FrozenBatchNorm, self).__init__(in_channels=in_channels, epsilon=epsilon,
                                              use_global_stats=True, prefix=prefix, params=params)
        for param in (self.gamma, self.beta, self.running_mean, self.running_var):
            param.grad_req = "null"

    def _alias(self):
        # Automatic names ("batchnorm0_") stay those of nn.BatchNorm.
        return "batchnorm"


class GroupNorm(HybridBlock):
    """Group normalisation with a per-channel affine.

    Statistics are taken over each group of ``C // num_groups`` channels and all spatial
    positions of one sample; then ``y = x_hat * gamma[c] + beta[c]`` with gamma, beta of shape
    ``(C,)``.

    Why not ``mx.gluon.nn.GroupNorm``: in MXNet 1.9.1 its gamma and beta have shape
    ``(num_groups,)``, one scale per group instead of per channel, and the ``GroupNorm``
    operator's kernels are slow on CPU. This block takes the per-group statistics with a
    ``LayerNorm`` over each (sample, group) row (checked against numpy and against the operator
    in tests/test_backbone.py) and applies the per-channel affine itself. Inside
    :func:`mxmask.ops.compiled_kernels` (the training graph on CPU) the normalisation and the
    affine are one ``mxmask_group_norm`` operator instead: the same values, with a
    multi-threaded backward (tests/test_ops.py, docs/kernels.md); the affine's two constants
    are then unused, and Gluon's warning about them is silenced.

    Args:
        num_groups: G, which must divide ``in_channels``.
        in_channels: C.
        epsilon: added to the variance.
        prefix, params: as for any Gluon block.
    """

    def __init__(self, num_groups, in_channels, epsilon=1e-5, prefix=None, params=None):
        super(GroupNorm, self).__init__(prefix=prefix, params=params)
        if in_channels % num_groups:
            raise UserError("GroupNorm: %d channels are not divisible into %d groups"
                            % (in_channels, num_groups))
        self._num_groups = num_groups
        self._channels = in_channels
        self._epsilon = epsilon
        self.gamma = self.params.get("gamma", shape=(in_channels,), init="ones")
        self.beta = self.params.get("beta", shape=(in_channels,), init="zeros")
        # The per-channel affine runs as an inference-mode BatchNorm with mean 0 and variance
        # 1 - eps (so that 1 / sqrt(var + eps) is exactly 1): the same result as
        # broadcast_mul + broadcast_add, with a faster backward on CPU, where the broadcast
        # ops' gradient reductions are slow.
        self.affine_mean = self.params.get_constant(
            "affine_mean", np.zeros((in_channels,), np.float32))
        self.affine_var = self.params.get_constant(
            "affine_var", np.full((in_channels,), 1.0 - _AFFINE_EPS, np.float32))

    def hybrid_forward(self, F, x, gamma, beta, affine_mean, affine_var):
        """
        Args:
            x: (N, C, H, W).

        Returns:
            (N, C, H, W) normalised, times gamma plus beta per channel.
        """
        if compiled_kernels_active("group_norm"):
            # the training graph on CPU (mxmask.ops): normalisation and affine in one operator,
            # the same values, faster backward
            return F.mxmask_group_norm(x, gamma, beta, num_groups=self._num_groups,
                                       eps=self._epsilon)[0]
        # Per-group statistics as a LayerNorm over the rows of (N*G, C/G*H*W): the GroupNorm
        # operator's result within float rounding (tests/test_backbone.py), but MXNet's
        # LayerNorm kernels are multi-threaded, forward and backward faster on CPU than the
        # GroupNorm operator's. The unit row affine is built from x, so it lives on x's context.
        rows = F.reshape(F.reshape(x, (0, -4, self._num_groups, -1, -2)), (-3, -1))  # (N*G, L)
        unit = F.ones_like(F.reshape(F.slice_axis(rows, axis=0, begin=0, end=1), (-1,)))  # (L,)
        x_hat = F.reshape_like(F.LayerNorm(rows, F.BlockGrad(unit),
                                           F.BlockGrad(F.zeros_like(unit)), axis=-1,
                                           eps=self._epsilon), x)
        return self._affine(F, x_hat, gamma, beta, affine_mean, affine_var)

    @staticmethod
    def _affine(F, x_hat, gamma, beta, affine_mean, affine_var):
        return F.BatchNorm(x_hat, gamma, beta, affine_mean, affine_var, eps=_AFFINE_EPS,
                           use_global_stats=True, fix_gamma=False)

    def __repr__(self):
        return "%s(%d channels, num_groups=%d, eps=%g)" % (
            self.__class__.__name__, self._channels, self._num_groups, self._epsilon)


def make_norm(kind, channels, gn_groups=32, **kw):
    """A normalisation block over ``channels`` channels.

    Args:
        kind: ``"frozen_bn"``, ``"bn"``, ``"syncbn"`` or ``"gn"`` (the module docstring).
        channels: C.
        gn_groups: the groups of ``gn``.
        kw: ``prefix`` (the Gluon name prefix, e.g. ``"batchnorm0_"``), ``epsilon`` (default
            1e-5), ``num_devices`` (syncbn only: the contexts the batch is split over; default
            1).

    Returns:
        A HybridBlock, input (N, C, H, W) -> output (N, C, H, W). An unknown kind is a
        UserError.
    """
    prefix = kw.pop("prefix", None)
    epsilon = kw.pop("epsilon", 1e-5)
    num_devices = kw.pop("num_devices", None)
    if kw:
        raise TypeError("make_norm: unexpected arguments %s" % ", ".join(sorted(kw)))
    if kind == "frozen_bn":
        return FrozenBatchNorm(in_channels=channels, epsilon=epsilon, prefix=prefix)
    if kind == "bn":
        return nn.BatchNorm(in_channels=channels, epsilon=epsilon, prefix=prefix)
    if kind == "syncbn":
        return mx.gluon.contrib.nn.SyncBatchNorm(in_channels=channels, epsilon=epsilon,
                                                 num_devices=int(num_devices or 1), prefix=prefix)
    if kind == "gn":
        return GroupNorm(num_groups=gn_groups, in_channels=channels, epsilon=epsilon, prefix=prefix)
    raise UserError("unknown norm '%s' (expected one of %s)" % (kind, ", ".join(NORM_KINDS)))
