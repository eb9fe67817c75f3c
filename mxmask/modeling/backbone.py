"""ResNet-v1b bottom-up backbone (GluonCV's layout and parameter names) and pretrained loading.

    ResNetV1b(depth, width=64, norm="frozen_bn", gn_groups=32, freeze_at=0, num_devices=None)
    forward(data (B, 3, H, W)) -> (C2, C3, C4, C5)
        C2 (B, 1*k*width, H/4,  W/4)      k = 1 for depth 18/34 (BasicBlock),
        C3 (B, 2*k*width, H/8,  W/8)      k = 4 for depth 50/101 (Bottleneck)
        C4 (B, 4*k*width, H/16, W/16)     sizes round up: a stride-2 layer maps n -> ceil(n/2)
        C5 (B, 8*k*width, H/32, W/32)

    load_pretrained_from_config(backbone, cfg) -> the path loaded, or None
        resolve_pretrained(cfg.model.backbone.pretrained) -> a GluonCV ImageNet .params file
        load_pretrained_backbone(backbone, path) -> the number of parameters loaded

The parameter names are GluonCV's (:class:`ResNetV1b`), so its ImageNet files load with no
renaming. Nothing is ever downloaded.
"""
import glob
import os

import mxnet as mx
from mxnet.gluon import nn
from mxnet.gluon.block import HybridBlock

from ..utils import UserError, shorten_names
from .norm import make_norm
from .precision import Conv2D

# depth -> (block kind, blocks per stage)
RESNET_SPECS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


def _conv_init():
    # He (MSRA) normal init with fan_out, as Detectron2's c2_msra_fill. Weights loaded from a file
    # replace it; it matters when training from scratch (the `shapes` preset).
    return mx.init.Xavier(rnd_type="gaussian", factor_type="out", magnitude=2.0)


def _conv(channels, in_channels, kernel, stride, prefix):
    return Conv2D(channels, kernel_size=kernel, strides=stride, padding=kernel // 2,
                  use_bias=False, in_channels=in_channels,
                  weight_initializer=_conv_init(), prefix=prefix)


def _norm_prefix(kind, index):
    return ("groupnorm%d_" if kind == "gn" else "batchnorm%d_") % index


class BasicBlockV1b(HybridBlock):
    """Two 3x3 convs (stride in the first) plus the identity or a 1x1 downsample projection.

    Input (B, in_channels, H, W) -> (B, planes, ceil(H/stride), ceil(W/stride)).

    The children take their names from the enclosing name scope (the stage's ``layers<s>_``),
    numbered from ``index``, as GluonCV's BasicBlockV1b: ``conv<2i>_``, ``conv<2i+1>_``.

    Args:
        in_channels, planes: input and output channels.
        stride: 1 or 2.
        downsample: the shortcut's projection block, or None for the identity.
        norm: a kind of :func:`mxmask.modeling.norm.make_norm`.
        index: i, the block's index in its stage (for the names).
        gn_groups, num_devices: passed to ``make_norm``.
    """
    expansion = 1

    def __init__(self, in_channels, planes, stride, downsample, norm, index, gn_groups=32,
                 num_devices=None, **kwargs):
        super(BasicBlockV1b, self).__init__(**kwargs)
        nk = dict(gn_groups=gn_groups, num_devices=num_devices)
        first = 2 * index
        self.conv1 = _conv(planes, in_channels, 3, stride, "conv%d_" % first)
        self.bn1 = make_norm(norm, planes, prefix=_norm_prefix(norm, first), **nk)
        self.conv2 = _conv(planes, planes, 3, 1, "conv%d_" % (first + 1))
        self.bn2 = make_norm(norm, planes, prefix=_norm_prefix(norm, first + 1), **nk)
        self.downsample = downsample

    def hybrid_forward(self, F, x):
        out = F.Activation(act_type="relu", data=self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.Activation(act_type="relu", data=out + shortcut)


class BottleneckV1b(HybridBlock):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand to ``4 * planes``, plus the shortcut.

    Input (B, in_channels, H, W) -> (B, 4*planes, ceil(H/stride), ceil(W/stride)).
    Children are named ``conv<3i+j>_`` / ``batchnorm<3i+j>_`` in the enclosing scope, as GluonCV.

    Args:
        in_channels: input channels.
        planes: the 3x3 conv's channels; the output has 4 * planes.
        stride, downsample, norm, index, gn_groups, num_devices: as for
            :class:`BasicBlockV1b`.
    """
    expansion = 4

    def __init__(self, in_channels, planes, stride, downsample, norm, index, gn_groups=32,
                 num_devices=None, **kwargs):
        super(BottleneckV1b, self).__init__(**kwargs)
        nk = dict(gn_groups=gn_groups, num_devices=num_devices)
        first = 3 * index
        self.conv1 = _conv(planes, in_channels, 1, 1, "conv%d_" % first)
        self.bn1 = make_norm(norm, planes, prefix=_norm_prefix(norm, first), **nk)
        self.conv2 = _conv(planes, planes, 3, stride, "conv%d_" % (first + 1))
        self.bn2 = make_norm(norm, planes, prefix=_norm_prefix(norm, first + 1), **nk)
        self.conv3 = _conv(planes * 4, planes, 1, 1, "conv%d_" % (first + 2))
        self.bn3 = make_norm(norm, planes * 4, prefix=_norm_prefix(norm, first + 2), **nk)
        self.downsample = downsample

    def hybrid_forward(self, F, x):
        out = F.Activation(act_type="relu", data=self.bn1(self.conv1(x)))
        out = F.Activation(act_type="relu", data=self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.Activation(act_type="relu", data=out + shortcut)


class ResNetV1b(HybridBlock):
    """ResNet-v1b body returning C2..C5 (shapes in the module docstring).

    ResNet-v1b puts the stride of a stage's first block in its 3x3 conv (conv2 of a
    Bottleneck, conv1 of a BasicBlock) and in the 1x1 downsample conv. The stem is conv 7x7/2
    (``width`` channels), norm, relu, max-pool 3x3/2 (pad 1). ``width`` = 64 is the standard
    ResNet; a smaller width scales every stage (stage channels ``width * (1, 2, 4, 8) * k``).

    Parameter names equal GluonCV's ``ResNetV1b`` (``resnet{18,34,50,101}_v1b``) without its
    ``fc``, both in the structural form written by ``save_parameters`` (``conv1.weight``,
    ``layer1.0.bn1.gamma``, ``layer1.0.downsample.0.weight``, ...) and in the prefixed form of
    ``collect_params()`` (``resnetv1b_conv0_weight``, ``resnetv1b_layers1_batchnorm0_gamma``,
    ``resnetv1b_down1_conv0_weight``, ...; the prefix follows the parent blocks). So a GluonCV
    ImageNet ``.params`` file in either form loads with no renaming
    (:func:`load_pretrained_backbone`). With ``norm="gn"`` the norm layers are named
    ``groupnorm<i>_`` and have only gamma and beta.

    Args:
        depth: 18, 34, 50 or 101.
        width: the stem's channels (64: the standard ResNet).
        norm: a kind of :func:`mxmask.modeling.norm.make_norm`.
        gn_groups: the GroupNorm groups with ``norm="gn"``; must divide every stage's channels.
        freeze_at: 0 trains everything; 1 freezes the stem (conv1, bn1); k >= 2 freezes the
            stem and res2..res<k> (``layer1`` .. ``layer<k-1>``). Frozen parameters get
            ``grad_req='null'``; with ``norm`` bn or syncbn the norm layers of frozen stages
            are built as frozen BN (running statistics, as Detectron2 does), since a frozen
            stage must not change in training either.
        num_devices: for syncbn.
        prefix, params: as for any Gluon block (``resnetv1b_``: GluonCV's prefix).
    """

    def __init__(self, depth=50, width=64, norm="frozen_bn", gn_groups=32, freeze_at=0,
                 num_devices=None, prefix="resnetv1b_", params=None):
        super(ResNetV1b, self).__init__(prefix=prefix, params=params)
        if depth not in RESNET_SPECS:
            raise UserError("model.backbone.depth: expected one of %s, got %r"
                            % (", ".join(str(d) for d in sorted(RESNET_SPECS)), depth))
        if not isinstance(freeze_at, int) or not 0 <= freeze_at <= 5:
            raise UserError("model.backbone.freeze_at: expected 0..5, got %r" % (freeze_at,))
        if int(width) <= 0:
            raise UserError("model.backbone.width: expected a positive integer, got %r" % (width,))
        kind, layers = RESNET_SPECS[depth]
        block = BasicBlockV1b if kind == "basic" else BottleneckV1b
        self.depth, self.width, self.norm = depth, int(width), norm
        self.freeze_at = freeze_at
        if norm == "gn":
            for c in [width] + [width * m * block.expansion for m in (1, 2, 4, 8)]:
                if c % gn_groups:
                    raise UserError("model.backbone.gn_groups=%d does not divide the %d channels "
                                    "of a ResNet-%d of width %d" % (gn_groups, c, depth, width))

        def stage_norm(stage):  # stage 1 = stem, 2..5 = res2..res5
            if stage <= freeze_at and norm in ("bn", "syncbn"):
                return "frozen_bn"
            return norm

        nk = dict(gn_groups=gn_groups, num_devices=num_devices)
        self.out_channels = []
        with self.name_scope():
            self.conv1 = Conv2D(width, kernel_size=7, strides=2, padding=3, use_bias=False,
                                in_channels=3, weight_initializer=_conv_init(), prefix="conv0_")
            self.bn1 = make_norm(stage_norm(1), width, prefix=_norm_prefix(norm, 0), **nk)
            in_channels = width
            for s, num_blocks in enumerate(layers, start=1):
                snorm = stage_norm(s + 1)
                planes = width * 2 ** (s - 1)
                stride = 1 if s == 1 else 2
                out_channels = planes * block.expansion
                downsample = None
                if stride != 1 or in_channels != out_channels:
                    downsample = nn.HybridSequential(prefix="down%d_" % s)
                    with downsample.name_scope():
                        downsample.add(_conv(out_channels, in_channels, 1, stride, "conv0_"))
                        downsample.add(make_norm(snorm, out_channels,
                                                 prefix=_norm_prefix(norm, 0), **nk))
                stage = nn.HybridSequential(prefix="layers%d_" % s)
                with stage.name_scope():
                    for i in range(num_blocks):
                        stage.add(block(in_channels, planes, stride if i == 0 else 1,
                                        downsample if i == 0 else None, snorm, index=i, **nk))
                        in_channels = out_channels
                setattr(self, "layer%d" % s, stage)
                self.out_channels.append(out_channels)
        self.strides = (4, 8, 16, 32)
        self.freeze(freeze_at)

    def freeze(self, freeze_at):
        """Set ``grad_req='null'`` on the stem (freeze_at >= 1) and on res2..res<freeze_at>."""
        parts = [self.conv1, self.bn1] if freeze_at >= 1 else []
        parts += [getattr(self, "layer%d" % s) for s in range(1, min(freeze_at, 5))]
        for part in parts:
            for param in part.collect_params().values():
                param.grad_req = "null"

    def hybrid_forward(self, F, x):
        """
        Args:
            x: (B, 3, H, W) normalised RGB.

        Returns:
            (C2, C3, C4, C5) at strides 4, 8, 16, 32 (shapes in the module docstring).
        """
        x = F.Activation(act_type="relu", data=self.bn1(self.conv1(x)))
        x = F.Pooling(x, kernel=(3, 3), stride=(2, 2), pad=(1, 1), pool_type="max")
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return c2, c3, c4, c5

    def describe(self):
        """One line naming the network, for messages."""
        return "ResNet-%d v1b (width %d, norm %s)" % (self.depth, self.width, self.norm)


# --------------------------------------------------------------------------------------------
# Pretrained ImageNet weights
# --------------------------------------------------------------------------------------------


def _find_resnet(backbone):
    resnet = getattr(backbone, "bottom_up", backbone)
    if not isinstance(resnet, ResNetV1b):
        raise TypeError("load_pretrained_backbone: expected a ResNetV1b or a block with a "
                        "ResNetV1b `bottom_up`, got %s" % type(backbone).__name__)
    return resnet


def _is_classifier(name, structural):
    if structural:
        return name.startswith("fc.")
    return name.startswith("dense") or name.startswith("fc")


def load_pretrained_backbone(backbone, path, ctx=None):
    """Load a GluonCV ImageNet ResNet-v1b ``.params`` file into ``backbone``.

    The file may use structural names (``conv1.weight``, written by ``save_parameters``) or
    prefixed names (``resnetv1b_conv0_weight``, ``arg:``/``aux:`` allowed); the classifier
    (``fc.*`` / ``dense*``) is ignored. Raises UserError naming the file when it is missing,
    unreadable, or when the names or shapes do not match (listing the missing, unexpected and
    mismatched names).

    Args:
        backbone: a :class:`ResNetV1b`, or the block of
            :func:`mxmask.modeling.fpn.build_backbone` (its ``bottom_up`` is used).
        path: the ``.params`` file.
        ctx: where parameters not yet initialised are initialised (default: the current
            context); initialised ones keep their contexts.

    Returns:
        The number of parameters loaded.
    """
    resnet = _find_resnet(backbone)
    if not os.path.isfile(path):
        raise UserError("%s: pretrained backbone file not found" % path)
    try:
        loaded = mx.nd.load(path)
    except Exception as e:  # MXNetError for a corrupt or foreign file
        # its text starts with "Traceback" and the C++ file; the "MXNetError: ..." line says it
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        said = [x[len("MXNetError:"):].strip() for x in lines if x.startswith("MXNetError:")]
        raise UserError("%s: not a readable MXNet .params file, or a damaged one (%s)"
                        % (path, (said or lines or [type(e).__name__])[-1][:300]))
    if not isinstance(loaded, dict) or not loaded:
        raise UserError("%s: expected a dict of named parameters (a .params file)" % path)
    loaded = {(k.split(":", 1)[1] if k.startswith(("arg:", "aux:")) else k): v
              for k, v in loaded.items()}
    structural = any("." in k for k in loaded)
    if structural:
        expected = resnet._collect_params_with_prefix()
    else:
        # Prefixed names: compare the part after the network's own prefix ("resnetv1b_").
        common = os.path.commonprefix(list(loaded))
        common = common[:common.rfind("_") + 1] if len(loaded) > 1 else ""
        loaded = {k[len(common):]: v for k, v in loaded.items()}
        expected = {p.name[len(resnet.prefix):]: p for p in resnet.collect_params().values()}
    loaded = {k: v for k, v in loaded.items() if not _is_classifier(k, structural)}

    missing = set(expected) - set(loaded)
    unexpected = set(loaded) - set(expected)
    mismatched = []
    for name in sorted(set(expected) & set(loaded)):
        want, got = expected[name].shape, loaded[name].shape
        if len(want) != len(got) or any(w and w != g for w, g in zip(want, got)):
            mismatched.append("%s %s vs %s" % (name, tuple(got), tuple(want)))
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append("missing %d: %s" % (len(missing), shorten_names(missing)))
        if unexpected:
            problems.append("unexpected %d: %s" % (len(unexpected), shorten_names(unexpected)))
        if mismatched:
            problems.append("shape mismatch (file vs model) %d: %s"
                            % (len(mismatched), shorten_names(mismatched, 3)))
        raise UserError("%s: does not fit the %s backbone; %s"
                        % (path, resnet.describe(), "; ".join(problems)))

    default_ctx = ctx if ctx is not None else mx.context.current_context()
    default_ctx = default_ctx if isinstance(default_ctx, (list, tuple)) else [default_ctx]
    for name, param in expected.items():
        data = loaded[name].astype(param.dtype, copy=False)
        # Parameter._load_init is what Block.load_parameters uses: set_data when initialised,
        # otherwise initialise from the array on `default_ctx`.
        param._load_init(data, default_ctx)
    return len(expected)


def resolve_pretrained(value, mxnet_home=None):
    """Turn ``cfg.model.backbone.pretrained`` into a file path.

    A missing file is a UserError that says where it looked; nothing is downloaded.

    Args:
        value: "" (none), a path to a GluonCV ImageNet ``.params`` file, or a GluonCV model
            name (``resnet50_v1b``) looked up as ``<MXNET_HOME>/models/<name>-*.params``
            (then ``<name>.params``).
        mxnet_home: MXNET_HOME; default the environment variable, else ``~/.mxnet``.

    Returns:
        The path (the newest match for a name), or None when ``value`` is empty.
    """
    if not value:
        return None
    path = os.path.expanduser(value)
    if os.path.isfile(path):
        return path
    if os.sep in value or "/" in value or value.endswith(".params") or value.startswith("~"):
        raise UserError("model.backbone.pretrained: file not found: %s" % value)
    home = mxnet_home or os.environ.get("MXNET_HOME") or os.path.join("~", ".mxnet")
    root = os.path.join(os.path.expanduser(home), "models")
    found = sorted(glob.glob(os.path.join(glob.escape(root), glob.escape(value) + "-*.params")))
    exact = os.path.join(root, value + ".params")
    if os.path.isfile(exact):
        found.append(exact)
    if not found:
        raise UserError("model.backbone.pretrained=%s: no %s-*.params in %s (mxmask never "
                        "downloads; copy the GluonCV file there, set MXNET_HOME, or give a path)"
                        % (value, value, root))
    return max(found, key=lambda p: (os.path.getmtime(p), p))  # the newest copy


def load_pretrained_from_config(backbone, cfg, ctx=None):
    """Load ``cfg.model.backbone.pretrained`` into ``backbone`` when it is set.

    Args:
        backbone, ctx: as for :func:`load_pretrained_backbone`.
        cfg: the config.

    Returns:
        The path loaded (:func:`resolve_pretrained`), or None.
    """
    path = resolve_pretrained(cfg.model.backbone.pretrained)
    if path is not None:
        load_pretrained_backbone(backbone, path, ctx=ctx)
    return path
