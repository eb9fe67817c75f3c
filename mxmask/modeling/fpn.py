"""Feature Pyramid Network over ResNet C2..C5, and ``build_backbone(cfg)``.

    FPN(in_channels=(c2, c3, c4, c5), out_channels=256, p6="maxpool", norm="", gn_groups=32)
        forward(C2, C3, C4, C5) -> (P2, P3, P4, P5, P6), each (B, out_channels, h_l, w_l)

    build_backbone(cfg) -> FPNBackbone
        forward(data (B, 3, H, W), RGB normalised with the ImageNet mean/std as in DEVELOPING.md)
            -> (P2, P3, P4, P5, P6) at strides (4, 8, 16, 32, 64):
            P_l is (B, cfg.model.fpn.out_channels, ceil(H / 2**l), ceil(W / 2**l))
            (exact for H, W multiples of 32, which the data loader guarantees)

    gluoncv_backbone_name_map(gluon_names) -> {GluonCV parameter name: mxmask name}

The FPN is GluonCV's FPNFeatureExpander as ``mask_rcnn_fpn_resnet50_v1b_coco`` uses it, which is
also Detectron2's FPN, with GluonCV's parameter names (:class:`FPN`).
"""
import mxnet as mx
from mxnet.gluon import nn
from mxnet.gluon.block import HybridBlock

from ..utils import UserError, shorten_names
from .backbone import ResNetV1b
from .norm import make_norm
from .precision import Conv2D

LEVELS = (2, 3, 4, 5)


def _fpn_init():
    return mx.init.Xavier(rnd_type="uniform", factor_type="in", magnitude=1.0)


class FPN(HybridBlock):
    """Top-down FPN (GluonCV's FPNFeatureExpander as used by mask_rcnn_fpn_resnet50_v1b_coco,
    which is also Detectron2's FPN)::

        L5 = lat5(C5);                  P5 = out5(L5)
        L4 = lat4(C4) + up(L5);         P4 = out4(L4)      up: nearest x2 upsampling, then
        L3 = lat3(C3) + up(L4);         P3 = out3(L3)          slice_like to the lateral's size,
        L2 = lat2(C2) + up(L3);         P2 = out2(L2)          so odd sizes work
        P6 = max-pool(kernel 1, stride 2) of P5          (p6="maxpool", Detectron2)
        P6 = conv 3x3, stride 2, pad 1 on L5             (p6="conv", GluonCV: on the P5 lateral,
                                                           not on P5, and no pooling)

    lat_l are 1x1 convs, out_l 3x3 convs (pad 1), all to ``out_channels`` with bias, no
    activation anywhere, weights initialised Xavier(uniform, fan_in, magnitude 1) and biases
    zero (GluonCV's init). With ``norm="gn"`` every FPN conv (laterals, outputs and the P6 conv)
    has no bias and is followed by a GroupNorm (Detectron2's FPN norm; GluonCV's norm_layer
    sits at the same places).

    The convs carry GluonCV's symbol names as their Gluon prefixes and as their attribute names
    (``P{k}_conv_lat`` for lat_k, ``P{k}_conv1`` for out_k and the P6 conv), so that GluonCV's
    weights map by name (:func:`gluoncv_backbone_name_map`).

    Args:
        in_channels: the channels of C2..C5.
        out_channels: the channels of every P level.
        p6: ``"maxpool"`` (Detectron2) or ``"conv"`` (GluonCV).
        norm: ``""`` or ``"gn"``.
        gn_groups: the GroupNorm groups with ``norm="gn"``.
        prefix, params: as for any Gluon block.
    """

    def __init__(self, in_channels, out_channels=256, p6="maxpool", norm="", gn_groups=32,
                 prefix="", params=None):
        super(FPN, self).__init__(prefix=prefix, params=params)
        if p6 not in ("maxpool", "conv"):
            raise UserError("model.fpn.p6: expected 'maxpool' or 'conv', got %r" % (p6,))
        if norm not in ("", "gn"):
            raise UserError("model.fpn.norm: expected '' or 'gn', got %r" % (norm,))
        if norm == "gn" and out_channels % gn_groups:
            raise UserError("model.backbone.gn_groups=%d does not divide model.fpn.out_channels=%d"
                            % (gn_groups, out_channels))
        if len(in_channels) != len(LEVELS):
            raise ValueError("FPN: expected 4 input channel counts (C2..C5), got %r" % (in_channels,))
        self.out_channels = out_channels
        self.p6 = p6
        self.norm = norm
        use_bias = not norm

        def conv(name, cin, kernel, stride=1):
            block = Conv2D(out_channels, kernel_size=kernel, strides=stride,
                           padding=kernel // 2, use_bias=use_bias, in_channels=cin,
                           weight_initializer=_fpn_init(), bias_initializer="zeros",
                           prefix=name + "_")
            setattr(self, name, block)

        def norm_layer(name):
            setattr(self, name, make_norm(norm, out_channels, gn_groups=gn_groups,
                                          prefix=name + "_") if norm else None)

        with self.name_scope():
            for k, cin in zip(LEVELS, in_channels):
                conv("P%d_conv_lat" % k, cin, 1)
                norm_layer("P%d_lat_norm" % k)
                conv("P%d_conv1" % k, out_channels, 3)
                norm_layer("P%d_norm" % k)
            if p6 == "conv":
                conv("P6_conv1", out_channels, 3, stride=2)
                norm_layer("P6_norm")

    def _apply(self, name, x):
        """The conv ``name`` on x, then its GroupNorm when there is one."""
        x = getattr(self, name)(x)
        norm = getattr(self, name.replace("_conv_lat", "_lat_norm").replace("_conv1", "_norm"))
        return x if norm is None else norm(x)

    def hybrid_forward(self, F, c2, c3, c4, c5):
        """
        Args:
            c2, c3, c4, c5: the ResNet stages, (B, C_l, H_l, W_l) at strides 4..32.

        Returns:
            (P2, P3, P4, P5, P6), each (B, out_channels, H_l, W_l); P_l has C_l's size, P6
            ceil(P5's size / 2).
        """
        feats = {2: c2, 3: c3, 4: c4, 5: c5}
        top = self._apply("P5_conv_lat", c5)
        lateral5 = top
        outputs = {5: self._apply("P5_conv1", top)}
        for k in (4, 3, 2):
            lateral = self._apply("P%d_conv_lat" % k, feats[k])
            up = F.UpSampling(top, scale=2, sample_type="nearest", num_args=1)
            top = lateral + F.slice_like(up, lateral, axes=(2, 3))
            outputs[k] = self._apply("P%d_conv1" % k, top)
        if self.p6 == "conv":
            p6 = self._apply("P6_conv1", lateral5)
        else:
            p6 = F.Pooling(outputs[5], kernel=(1, 1), stride=(2, 2), pool_type="max")
        return outputs[2], outputs[3], outputs[4], outputs[5], p6


class FPNBackbone(HybridBlock):
    """ResNet-v1b (``bottom_up``) + FPN (``fpn``): data (B, 3, H, W) -> (P2, P3, P4, P5, P6).

    Args:
        depth, width, norm, gn_groups, freeze_at, num_devices: the
            :class:`~mxmask.modeling.backbone.ResNetV1b`'s.
        out_channels, p6: the :class:`FPN`'s.
        fpn_norm: the :class:`FPN`'s ``norm``.
        prefix, params: as for any Gluon block.
    """

    def __init__(self, depth=50, width=64, norm="frozen_bn", gn_groups=32, freeze_at=0,
                 out_channels=256, p6="maxpool", fpn_norm="", num_devices=None,
                 prefix=None, params=None):
        super(FPNBackbone, self).__init__(prefix=prefix, params=params)
        with self.name_scope():
            self.bottom_up = ResNetV1b(depth=depth, width=width, norm=norm, gn_groups=gn_groups,
                                       freeze_at=freeze_at, num_devices=num_devices)
            self.fpn = FPN(self.bottom_up.out_channels, out_channels=out_channels, p6=p6,
                           norm=fpn_norm, gn_groups=gn_groups)
        self.out_channels = out_channels
        self.strides = (4, 8, 16, 32, 64)

    def hybrid_forward(self, F, data):
        """
        Args:
            data: (B, 3, H, W) normalised RGB.

        Returns:
            (P2, P3, P4, P5, P6), P_l of (B, out_channels, ceil(H / 2**l), ceil(W / 2**l)).
        """
        return self.fpn(*self.bottom_up(data))


def build_backbone(cfg, num_devices=None):
    """The backbone of ``cfg.model`` (ResNet-v1b + FPN).

    Args:
        cfg: the config (``model.backbone``, ``model.fpn``).
        num_devices: for syncbn.

    Returns:
        An :class:`FPNBackbone`, parameters not initialised.
    """
    b, f = cfg.model.backbone, cfg.model.fpn
    return FPNBackbone(depth=b.depth, width=b.width, norm=b.norm, gn_groups=b.gn_groups,
                       freeze_at=b.freeze_at, out_channels=f.out_channels, p6=f.p6,
                       fpn_norm=f.norm, num_devices=num_devices)


def gluoncv_backbone_name_map(gluon_names, backbone=None, strict=True):
    """Map GluonCV ``mask_rcnn_fpn_resnet50_v1b_coco`` parameter names to ``build_backbone`` ones.

    Inside ``FPNBackbone`` (children ``bottom_up``: the ResNetV1b, and ``fpn``)::

        GluonCV mask_rcnn_fpn_resnet50_v1b_coco  -> mxmask build_backbone(cfg), structural
        features.P{k}_conv_lat_{weight,bias}     -> fpn.P{k}_conv_lat.{weight,bias}    k = 2..5
        features.P{k}_conv1_{weight,bias}        -> fpn.P{k}_conv1.{weight,bias}       k = 2..6
        features.resnetv1b_conv0_weight          -> bottom_up.conv1.weight
        features.resnetv1b_batchnorm0_{p}        -> bottom_up.bn1.{p}
        features.resnetv1b_layers{s}_conv{j}_weight
                                -> bottom_up.layer{s}.{j//3}.conv{j%3+1}.weight
        features.resnetv1b_layers{s}_batchnorm{j}_{p}
                                -> bottom_up.layer{s}.{j//3}.bn{j%3+1}.{p}
        features.resnetv1b_down{s}_conv0_weight
                                -> bottom_up.layer{s}.0.downsample.0.weight
        features.resnetv1b_down{s}_batchnorm0_{p}
                                -> bottom_up.layer{s}.0.downsample.1.{p}
        ({p} in gamma, beta, running_mean, running_var; j//3 and j%3 for Bottleneck, /2 for
        BasicBlock)

    Equivalently, the rule applied here: a GluonCV name ``features.X`` maps to the mxmask
    parameter whose prefixed name is ``<FPNBackbone prefix> + X``.

    Args:
        gluon_names: names as in the GluonCV model's ``save_parameters`` file (``features.*``
            are the backbone and FPN; other names are not the backbone's and are skipped).
        backbone: the mxmask block to map onto (default: ResNet-50, width 64, frozen BN, FPN
            256 with p6 conv, i.e. preset ``gluoncv_mask_rcnn_r50_fpn``).
        strict: a ``features.*`` name with no counterpart, or a backbone parameter not
            covered, is a UserError listing them.

    Returns:
        ``{gluon_name: structural name inside the backbone block}``, e.g.
        ``features.P6_conv1_weight -> fpn.P6_conv1.weight``; prefix the result with the
        backbone's attribute name in the full model.
    """
    if backbone is None:
        backbone = FPNBackbone(depth=50, width=64, norm="frozen_bn", out_channels=256, p6="conv")
    by_gluon_name = {}
    for structural, param in backbone._collect_params_with_prefix().items():
        by_gluon_name["features." + param.name[len(backbone.prefix):]] = structural
    mapping, unmapped = {}, []
    for name in gluon_names:
        if not name.startswith("features."):
            continue
        if name in by_gluon_name:
            mapping[name] = by_gluon_name[name]
        else:
            unmapped.append(name)
    if strict:
        uncovered = set(by_gluon_name.values()) - set(mapping.values())
        if unmapped or uncovered:
            parts = []
            if unmapped:
                parts.append("GluonCV parameters with no mxmask counterpart (%d): %s"
                             % (len(unmapped), shorten_names(unmapped)))
            if uncovered:
                parts.append("mxmask backbone parameters not in the GluonCV file (%d): %s"
                             % (len(uncovered), shorten_names(uncovered)))
            raise UserError("GluonCV backbone names do not match: " + "; ".join(parts))
    return mapping
