"""Tests for mxmask.modeling.{norm,backbone,fpn}: norm layers, ResNet-v1b compatibility with
GluonCV (names, features, pretrained files), freezing, FPN shapes and the GluonCV FPN mapping."""

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, nd
from mxnet.gluon import nn

from mxmask.config import get_config
from mxmask.modeling.backbone import (ResNetV1b, load_pretrained_backbone,
                                      load_pretrained_from_config, resolve_pretrained)
from mxmask.modeling.fpn import FPNBackbone, build_backbone, gluoncv_backbone_name_map
from mxmask.modeling.norm import FrozenBatchNorm, GroupNorm, make_norm
from mxmask.utils import UserError
from helpers.numpy_reference import np_group_norm

gluoncv = pytest.importorskip("gluoncv")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _randomize(named_params, seed=0):
    """Give every parameter random values of a sensible scale (BN stats included)."""
    rng = np.random.RandomState(seed)
    for name, p in sorted(named_params.items()):
        shape = p.shape
        if name.endswith(("affine_mean", "affine_var")):
            continue  # GroupNorm's fixed constants, not learnt values
        if name.endswith(("running_var",)):
            value = rng.uniform(0.5, 1.5, shape)
        elif name.endswith("gamma"):
            value = rng.uniform(0.5, 1.5, shape)
        elif name.endswith(("beta", "running_mean", "bias")):
            value = rng.normal(0, 0.2, shape)
        else:  # conv weights: He normal, keeps activations of order one
            fan_in = int(np.prod(shape[1:]))
            value = rng.normal(0, np.sqrt(2.0 / fan_in), shape)
        p.set_data(nd.array(value.astype(np.float32), ctx=p.list_ctx()[0]))


def _gluon_resnet(depth):
    net = getattr(gluoncv.model_zoo, "resnet%d_v1b" % depth)(pretrained=False)
    net.initialize()
    net(nd.zeros((1, 3, 32, 32)))  # finish deferred initialisation
    _randomize(net._collect_params_with_prefix(), seed=depth)
    return net


def _gluon_features(net, x):
    y = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    feats = []
    for s in range(1, 5):
        y = getattr(net, "layer%d" % s)(y)
        feats.append(y)
    return feats


def _assert_close(ours, theirs, rel):
    for a, b in zip(ours, theirs):
        a, b = a.asnumpy(), b.asnumpy()
        assert a.shape == b.shape
        scale = max(1.0, float(np.abs(b).max()))
        assert float(np.abs(a - b).max()) <= rel * scale, float(np.abs(a - b).max()) / scale


def _ours_names(block):
    return set(block._collect_params_with_prefix())


# --------------------------------------------------------------------------------------------
# norm layers
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hybridize", [False, True])
def test_group_norm_per_group_statistics_and_per_channel_affine(hybridize):
    rng = np.random.RandomState(1)
    n, c, g = 2, 8, 4
    x = (rng.randn(n, c, 5, 7) * 3 + 1).astype(np.float32)
    gamma = rng.uniform(0.5, 2, c).astype(np.float32)
    beta = rng.randn(c).astype(np.float32)
    layer = make_norm("gn", c, gn_groups=g)
    assert isinstance(layer, GroupNorm)
    layer.initialize()
    assert layer.gamma.shape == (c,) and layer.beta.shape == (c,)
    layer.gamma.set_data(nd.array(gamma))
    layer.beta.set_data(nd.array(beta))
    if hybridize:
        layer.hybridize()
    xs = nd.array(x)
    xs.attach_grad()
    head = rng.randn(*x.shape).astype(np.float32)
    with autograd.record():
        y = layer(xs)
        loss = (y * nd.array(head)).sum()
    loss.backward()

    expected, x_hat = np_group_norm(x, g, gamma, beta)
    np.testing.assert_allclose(y.asnumpy(), expected, atol=2e-5, rtol=1e-5)
    # parameter gradients of a per-channel affine
    np.testing.assert_allclose(layer.gamma.grad().asnumpy(), (head * x_hat).sum(axis=(0, 2, 3)),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.beta.grad().asnumpy(), head.sum(axis=(0, 2, 3)),
                               rtol=1e-4, atol=1e-4)
    # a per-group normalisation: every (sample, group) of x_hat has zero mean and unit variance
    y0 = ((y.asnumpy() - beta[None, :, None, None]) / gamma[None, :, None, None]).reshape(n, g, -1)
    np.testing.assert_allclose(y0.mean(-1), 0, atol=1e-4)
    np.testing.assert_allclose(y0.var(-1), 1, atol=1e-3)
    # the input gradient equals that of MXNet's GroupNorm operator + the same affine
    xo = nd.array(x)
    xo.attach_grad()
    with autograd.record():
        yo = nd.GroupNorm(xo, nd.ones(g), nd.zeros(g), num_groups=g, eps=1e-5)
        yo = yo * nd.array(gamma).reshape((1, c, 1, 1)) + nd.array(beta).reshape((1, c, 1, 1))
        lo = (yo * nd.array(head)).sum()
    lo.backward()
    np.testing.assert_allclose(y.asnumpy(), yo.asnumpy(), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(xs.grad.asnumpy(), xo.grad.asnumpy(), atol=1e-4, rtol=1e-4)
    # and the input gradient agrees with a finite difference
    idx = (1, 3, 2, 4)
    eps = 1e-2
    xp, xm = x.copy(), x.copy()
    xp[idx] += eps
    xm[idx] -= eps
    numeric = ((layer(nd.array(xp)).asnumpy() - layer(nd.array(xm)).asnumpy()) * head).sum() / (2 * eps)
    assert abs(numeric - xs.grad.asnumpy()[idx]) < 2e-2 * max(1.0, abs(numeric))


def test_frozen_bn_is_a_fixed_affine_with_null_grad_req():
    rng = np.random.RandomState(2)
    c = 6
    layer = make_norm("frozen_bn", c)
    assert isinstance(layer, FrozenBatchNorm) and isinstance(layer, nn.BatchNorm)
    layer.initialize()
    names = sorted(layer._collect_params_with_prefix())
    assert names == ["beta", "gamma", "running_mean", "running_var"]
    assert all(p.grad_req == "null" for p in layer.collect_params().values())
    stats = {k: rng.uniform(0.5, 1.5, c).astype(np.float32) for k in ("gamma", "running_var")}
    stats.update({k: rng.randn(c).astype(np.float32) for k in ("beta", "running_mean")})
    for k, v in stats.items():
        getattr(layer, k).set_data(nd.array(v))
    x = (rng.randn(4, c, 3, 5) * 2 + 3).astype(np.float32)
    scale = stats["gamma"] / np.sqrt(stats["running_var"] + 1e-5)
    expected = ((x - stats["running_mean"][None, :, None, None]) * scale[None, :, None, None]
                + stats["beta"][None, :, None, None])
    for hybridize in (False, True):
        if hybridize:
            layer.hybridize()
        xs = nd.array(x)
        xs.attach_grad()
        with autograd.record(train_mode=True):   # training mode: still the running statistics
            y = layer(xs)
        y.backward()
        np.testing.assert_allclose(y.asnumpy(), expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(xs.grad.asnumpy(), np.broadcast_to(scale[None, :, None, None], x.shape),
                                   rtol=1e-5)
        for k, v in stats.items():  # nothing moved
            np.testing.assert_array_equal(getattr(layer, k).data().asnumpy(), v)


def test_make_norm_kinds_and_errors():
    bn = make_norm("bn", 4, prefix="batchnorm3_")
    assert type(bn) is nn.BatchNorm and bn.prefix == "batchnorm3_"
    assert bn.gamma.grad_req == "write"
    sync = make_norm("syncbn", 4, num_devices=1)
    assert isinstance(sync, mx.gluon.contrib.nn.SyncBatchNorm)
    sync.initialize()
    with autograd.record(train_mode=True):
        out = sync(nd.random.normal(2, 3, shape=(2, 4, 3, 3)))
    np.testing.assert_allclose(out.asnumpy().mean(axis=(0, 2, 3)), 0, atol=1e-4)
    with pytest.raises(UserError, match="unknown norm 'layernorm'"):
        make_norm("layernorm", 4)
    with pytest.raises(UserError, match="not divisible"):
        make_norm("gn", 24, gn_groups=16)


# --------------------------------------------------------------------------------------------
# ResNet-v1b against GluonCV
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_loads_gluoncv_params_and_matches_its_features(depth, tmp_path):
    theirs = _gluon_resnet(depth)
    path = str(tmp_path / ("resnet%d_v1b-0000.params" % depth))
    theirs.save_parameters(path)
    ours = ResNetV1b(depth=depth, norm="frozen_bn")
    # the same parameters under the same names, minus the classifier
    gluon_names = set(theirs._collect_params_with_prefix())
    assert {n for n in gluon_names if n.startswith("fc.")} == {"fc.weight", "fc.bias"}
    assert _ours_names(ours) == gluon_names - {"fc.weight", "fc.bias"}
    gluon_prefixed = {p.name for p in theirs.collect_params().values()}
    assert ({p.name for p in ours.collect_params().values()}
            == gluon_prefixed - {"resnetv1b_dense0_weight", "resnetv1b_dense0_bias"})

    ours.initialize()
    assert load_pretrained_backbone(ours, path) == len(gluon_names) - 2
    x = nd.array(np.random.RandomState(3).randn(1, 3, 64, 96).astype(np.float32))
    feats = ours(x)
    assert [f.shape for f in feats] == [
        (1, c, 64 // s, 96 // s) for c, s in zip(ours.out_channels, ours.strides)]
    assert ours.out_channels == [64 * m * (4 if depth == 50 else 1) for m in (1, 2, 4, 8)]
    _assert_close(feats, _gluon_features(theirs, x), 1e-5)


def test_pretrained_file_with_prefixed_names_loads_into_a_nested_backbone(tmp_path):
    theirs = _gluon_resnet(18)
    path = str(tmp_path / "legacy.params")
    theirs.collect_params().save(path)  # old-style names: resnetv1b_layers1_conv0_weight ...
    assert "resnetv1b_layers1_conv0_weight" in mx.nd.load(path)
    cfg = get_config("mask_rcnn_r50_fpn", ["model.backbone.depth=18"])
    ours = build_backbone(cfg)  # the ResNet sits under another prefix, in `bottom_up`
    assert ours.bottom_up.prefix != "resnetv1b_"
    load_pretrained_backbone(ours, path)  # not initialised yet: loading initialises
    ours.fpn.initialize()
    x = nd.array(np.random.RandomState(4).randn(1, 3, 64, 96).astype(np.float32))
    _assert_close(ours.bottom_up(x), _gluon_features(theirs, x), 1e-5)


def test_pretrained_errors_name_the_file_and_the_parameters(tmp_path):
    theirs = _gluon_resnet(18)
    good = str(tmp_path / "r18.params")
    theirs.save_parameters(good)
    arrays = mx.nd.load(good)
    arrays["layer1.0.convX.weight"] = arrays.pop("layer1.0.conv1.weight")   # renamed
    del arrays["layer4.1.bn2.running_var"]                                   # missing
    bad = str(tmp_path / "renamed.params")
    mx.nd.save(bad, arrays)

    ours = ResNetV1b(depth=18, norm="frozen_bn")
    ours.initialize()
    before = ours.conv1.weight.data().asnumpy().copy()
    with pytest.raises(UserError) as err:
        load_pretrained_backbone(ours, bad)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(bad)
    assert "missing 2: layer1.0.conv1.weight, layer4.1.bn2.running_var" in msg
    assert "unexpected 1: layer1.0.convX.weight" in msg
    np.testing.assert_array_equal(ours.conv1.weight.data().asnumpy(), before)  # nothing loaded

    narrow = ResNetV1b(depth=18, width=32, norm="frozen_bn")
    with pytest.raises(UserError, match=r"width 32.*shape mismatch \(file vs model\) 100: bn1\.beta \(64,\) vs \(32,\)"):
        load_pretrained_backbone(narrow, good)
    with pytest.raises(UserError, match="ResNet-50 v1b.*missing"):
        load_pretrained_backbone(ResNetV1b(depth=50), good)

    missing = str(tmp_path / "nope.params")
    with pytest.raises(UserError, match="nope.params: pretrained backbone file not found"):
        load_pretrained_backbone(ours, missing)
    junk = tmp_path / "junk.params"
    junk.write_bytes(b"not a params file")
    with pytest.raises(UserError, match="junk.params: not a readable MXNet"):
        load_pretrained_backbone(ours, str(junk))


def test_resolve_pretrained_names_and_paths(tmp_path, monkeypatch):
    home = tmp_path / "mxhome"
    (home / "models").mkdir(parents=True)
    monkeypatch.setenv("MXNET_HOME", str(home))
    assert resolve_pretrained("") is None
    with pytest.raises(UserError) as err:
        resolve_pretrained("resnet18_v1b")
    assert str(home / "models") in str(err.value) and "resnet18_v1b-*.params" in str(err.value)
    with pytest.raises(UserError, match="file not found: .*/missing.params"):
        resolve_pretrained(str(tmp_path / "missing.params"))

    theirs = _gluon_resnet(18)
    stored = home / "models" / "resnet18_v1b-2d9d980c.params"
    theirs.save_parameters(str(stored))
    assert resolve_pretrained("resnet18_v1b") == str(stored)
    assert resolve_pretrained(str(stored)) == str(stored)

    cfg = get_config("mask_rcnn_r50_fpn", ["model.backbone.depth=18",
                                           "model.backbone.pretrained=resnet18_v1b"])
    ours = build_backbone(cfg)
    ours.initialize()
    assert load_pretrained_from_config(ours, cfg) == str(stored)
    np.testing.assert_array_equal(ours.bottom_up.layer4[1].conv2.weight.data().asnumpy(),
                                  theirs.layer4[1].conv2.weight.data().asnumpy())


# --------------------------------------------------------------------------------------------
# freezing
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("freeze_at", [0, 1, 2, 4, 5])
def test_freeze_at(freeze_at):
    net = ResNetV1b(depth=18, width=32, norm="bn", freeze_at=freeze_at)
    parts = {1: [net.conv1, net.bn1]}
    parts.update({s + 1: [getattr(net, "layer%d" % s)] for s in range(1, 5)})
    for stage, blocks in parts.items():
        frozen = stage <= freeze_at
        for block in blocks:
            for name, p in block._collect_params_with_prefix().items():
                if "running" in name:
                    continue
                assert p.grad_req == ("null" if frozen else "write"), (stage, name)
        norms = [b for block in blocks for b in _walk(block) if isinstance(b, nn.BatchNorm)]
        assert norms
        # the norm layers of frozen stages use their running statistics
        assert all(isinstance(b, FrozenBatchNorm) == frozen for b in norms), stage
    # a training step leaves the frozen part's statistics untouched
    net.initialize()
    x = nd.random.normal(shape=(2, 3, 64, 64))
    x.attach_grad()  # so that there is a graph even when everything is frozen
    with autograd.record(train_mode=True):
        loss = sum(f.sum() for f in net(x))
    loss.backward()
    moved = [s for s in range(1, 6)
             if any(np.any(p.data().asnumpy() != 0) for b in parts[s]
                    for n, p in b._collect_params_with_prefix().items() if n.endswith("running_mean"))]
    assert moved == [s for s in range(1, 6) if s > freeze_at]
    with pytest.raises(UserError, match="freeze_at"):
        ResNetV1b(depth=18, freeze_at=6)


def _walk(block):
    yield block
    for child in block._children.values():
        yield from _walk(child)


# --------------------------------------------------------------------------------------------
# FPN
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p6", ["maxpool", "conv"])
@pytest.mark.parametrize("size", [(64, 96), (72, 100)])
def test_fpn_shapes_strides_and_hybridize(p6, size):
    cfg = get_config("shapes", ["model.fpn.p6=" + p6])
    net = build_backbone(cfg)
    assert isinstance(net, FPNBackbone) and net.strides == (4, 8, 16, 32, 64)
    net.initialize()
    _randomize(net._collect_params_with_prefix(), seed=5)
    h, w = size
    x = nd.array(np.random.RandomState(6).randn(2, 3, h, w).astype(np.float32))
    outs = net(x)
    assert len(outs) == 5
    for out, stride in zip(outs, net.strides):
        assert out.shape == (2, cfg.model.fpn.out_channels, -(-h // stride), -(-w // stride))
    if p6 == "maxpool":
        np.testing.assert_array_equal(outs[4].asnumpy(), outs[3].asnumpy()[:, :, ::2, ::2])
        assert not hasattr(net.fpn, "P6_conv1")
    else:
        c = cfg.model.fpn.out_channels
        assert net.fpn.P6_conv1.weight.shape == (c, c, 3, 3)
    net.hybridize()
    _assert_close(net(x), outs, 1e-5)


def test_fpn_group_norm_layers():
    cfg = get_config("shapes", ["model.fpn.p6=conv"])
    assert cfg.model.fpn.norm == "gn"
    net = build_backbone(cfg)
    names = _ours_names(net)
    for k in (2, 3, 4, 5):
        assert "fpn.P%d_conv_lat.weight" % k in names and "fpn.P%d_conv_lat.bias" not in names
        assert {"fpn.P%d_lat_norm.gamma" % k, "fpn.P%d_norm.beta" % k} <= names
    assert "fpn.P6_norm.gamma" in names
    net.initialize()
    p2 = net(nd.random.normal(shape=(1, 3, 64, 64)))[0].asnumpy()
    groups = p2.reshape(1, cfg.model.backbone.gn_groups, -1)  # gamma 1, beta 0 at init
    np.testing.assert_allclose(groups.mean(-1), 0, atol=1e-4)
    np.testing.assert_allclose(groups.std(-1), 1, atol=1e-2)


def test_fpn_matches_gluoncv_mask_rcnn_features():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gnet = gluoncv.model_zoo.get_model("mask_rcnn_fpn_resnet50_v1b_coco",
                                           pretrained=False, pretrained_base=False)
        gnet.initialize()
        x = nd.array(np.random.RandomState(7).randn(1, 3, 128, 160).astype(np.float32))
        gnet.features(x)  # finish deferred initialisation
    gparams = {k: v for k, v in gnet._collect_params_with_prefix().items()
               if k.startswith("features.")}
    _randomize(gparams, seed=8)
    theirs = gnet.features(x)

    cfg = get_config("gluoncv_mask_rcnn_r50_fpn")
    ours = build_backbone(cfg)
    ours.initialize()
    all_names = list(gnet._collect_params_with_prefix())
    mapping = gluoncv_backbone_name_map(all_names, ours)
    assert set(mapping) == set(gparams)  # every backbone/FPN parameter, nothing else
    assert mapping["features.P6_conv1_weight"] == "fpn.P6_conv1.weight"
    assert mapping["features.P3_conv_lat_bias"] == "fpn.P3_conv_lat.bias"
    assert mapping["features.resnetv1b_layers3_batchnorm7_running_var"] == "bottom_up.layer3.2.bn2.running_var"
    assert mapping["features.resnetv1b_down2_conv0_weight"] == "bottom_up.layer2.0.downsample.0.weight"
    assert mapping == gluoncv_backbone_name_map(all_names)  # the default target is this preset
    target = ours._collect_params_with_prefix()
    assert set(mapping.values()) == set(target)
    for gname, oname in mapping.items():
        target[oname].set_data(gparams[gname].data())
    _assert_close(ours(x), theirs, 1e-4)

    with pytest.raises(UserError, match="no mxmask counterpart.*features.P7_conv1_weight"):
        gluoncv_backbone_name_map(all_names + ["features.P7_conv1_weight"], ours)
