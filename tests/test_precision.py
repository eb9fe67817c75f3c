"""Mixed-precision training (mxmask.modeling.precision, solver.amp=bfloat16): bfloat16
convolutions against a numpy reference on bfloat16-rounded operands, float32 everywhere else,
the training graph, the checks, and a short training run."""
import io
import json

import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import nn

from mxmask.bench import build_bench_model, synthetic_train_batch
from mxmask.config import ConfigError, get_config
from mxmask.modeling.precision import Conv2D, check_conv_precision, conv_precision, resolve_amp
from mxmask.modeling.training import RCNNLoss
from mxmask.utils import UserError


def _bf16_error():
    try:
        check_conv_precision("bfloat16", [mx.cpu()])
    except UserError as err:
        return str(err)
    return None


BF16_ERROR = _bf16_error()
needs_bf16 = pytest.mark.skipif(BF16_ERROR is not None,
                                reason="no bfloat16 convolution here: %s" % BF16_ERROR)


def bf16_round(x):
    """float32 -> the nearest bfloat16 (ties to even), returned as float32."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


def np_conv(x, w, b, pad):
    """Direct convolution, stride 1, in float64: x (N, C, H, W), w (O, C, k, k)."""
    n, c, h, wd = x.shape
    o, _, k, _ = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = np.zeros((n, o, h + 2 * pad - k + 1, wd + 2 * pad - k + 1))
    for i in range(k):
        for j in range(k):
            patch = xp[:, :, i:i + out.shape[2], j:j + out.shape[3]]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j].astype(np.float64))
    return out + b.reshape(1, -1, 1, 1)


def _layer(hybridize, in_channels=16):
    rng = np.random.RandomState(0)
    layer = Conv2D(6, 3, padding=1, in_channels=in_channels, activation="relu", prefix="conv_")
    layer.initialize()
    layer.weight.set_data(mx.nd.array(rng.randn(6, in_channels, 3, 3) * 0.3))
    layer.bias.set_data(mx.nd.array(rng.randn(6)))
    if hybridize:
        layer.hybridize()
    x = rng.randn(2, in_channels, 7, 8).astype(np.float32) * 2
    return layer, x


@pytest.mark.parametrize("hybridize", [False, True])
def test_outside_the_context_conv2d_is_nn_conv2d(hybridize):
    layer, x = _layer(hybridize)
    ref = nn.Conv2D(6, 3, padding=1, in_channels=16, activation="relu", prefix="conv_")
    ref.initialize()
    assert sorted(layer.collect_params()) == sorted(ref.collect_params())
    ref.weight.set_data(layer.weight.data())
    ref.bias.set_data(layer.bias.data())
    np.testing.assert_array_equal(layer(mx.nd.array(x)).asnumpy(), ref(mx.nd.array(x)).asnumpy())
    sym = layer(mx.sym.var("data"))
    assert [n["op"] for n in json.loads(sym.tojson())["nodes"]] == \
        ["null", "null", "null", "Convolution", "Activation"]


@needs_bf16
@pytest.mark.parametrize("hybridize", [False, True])
def test_bfloat16_convolution_equals_the_convolution_of_rounded_operands(hybridize):
    layer, x = _layer(hybridize)
    w, b = layer.weight.data().asnumpy(), layer.bias.data().asnumpy()
    xs = mx.nd.array(x)
    xs.attach_grad()
    head = np.random.RandomState(1).randn(2, 6, 7, 8).astype(np.float32)
    with conv_precision("bfloat16"), mx.autograd.record():
        y = layer(xs)
        (y * mx.nd.array(head)).sum().backward()
    got = y.asnumpy()
    assert y.dtype == np.float32 and layer.weight.grad().dtype == np.float32
    pre = np_conv(bf16_round(x), bf16_round(w), bf16_round(b), 1)
    want = np.maximum(bf16_round(pre.astype(np.float32)), 0)
    scale = np.abs(want).max()
    # oneDNN accumulates in float32 and rounds the output to bfloat16 once: within one bf16
    # step (2^-8 relative) of the reference, and visibly not the float32 result
    np.testing.assert_allclose(got, want, atol=scale * 2 ** -8)
    exact = np.maximum(np_conv(x, w, b, 1), 0)
    assert np.abs(got - exact).max() > scale * 1e-5
    # the weight gradient: float32, within bf16 precision of the float32 gradient through the
    # same ReLU mask (the bf16 output's)
    g = layer.weight.grad().asnumpy()
    mask = (got > 0) * head
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    g_ref = np.stack([np.stack([np.einsum("nohw,nchw->oc", mask, xp[:, :, i:i + 7, j:j + 8])
                                for j in range(3)], -1) for i in range(3)], -2)
    np.testing.assert_allclose(g, g_ref, atol=np.abs(g_ref).max() * 2e-2)


@pytest.mark.parametrize("in_channels", [3, 15])
def test_a_convolution_of_few_input_channels_stays_float32(in_channels):
    """The stem (3 input channels): bfloat16 gains nothing there, so inside the context the
    layer is the float32 convolution, bit for bit, with no cast in its graph."""
    layer, x = _layer(False, in_channels)
    want = layer(mx.nd.array(x)).asnumpy()
    with conv_precision("bfloat16"):
        got = layer(mx.nd.array(x)).asnumpy()
        sym = layer(mx.sym.var("data"))
    np.testing.assert_array_equal(got, want)
    assert "amp_cast" not in sym.tojson()


@needs_bf16
def test_the_training_graph_in_bfloat16_keeps_losses_and_float32_gradients():
    batch_np = None
    results = {}
    for amp in ("", "bfloat16"):
        cfg, net = build_bench_model("shapes", overrides=["solver.amp=" + amp])
        if batch_np is None:
            batch_np = synthetic_train_batch(cfg, (128, 160), 2, objects=3)
        keys = ["data", "im_info", "gt_boxes", "gt_labels", "gt_crowd", "gt_masks",
                "gt_keypoints"]
        batch = {k: mx.nd.array(batch_np[k]) for k in keys}
        loss_net = RCNNLoss(net, cfg, kernels="mxnet")
        loss_net.hybridize(static_alloc=True)
        mx.random.seed(3)
        with mx.autograd.record():
            losses = loss_net(**batch)
            mx.nd.add_n(*losses.values()).backward()
        params = [p for p in net.collect_params().values() if p.grad_req != "null"]
        assert all(p.data().dtype == np.float32 and p.grad().dtype == np.float32 for p in params)
        assert all(np.isfinite(p.grad().asnumpy()).all() for p in params)
        nodes = loss_net.box_stage._cached_graph[1].get_internals().list_outputs()
        assert any("amp_cast" in n for n in nodes) == (amp == "bfloat16")
        results[amp] = {k: float(v.asscalar()) for k, v in losses.items()}
    for name, value in results[""].items():
        assert results["bfloat16"][name] == pytest.approx(value, rel=2e-2, abs=1e-3), name


def test_checks_refuse_gpus_unknown_values_and_keep_float32_alone():
    check_conv_precision("", [mx.gpu(0)])                     # off: nothing to check
    with pytest.raises(UserError, match="CPUs only.*gpu\\(0\\)"):
        check_conv_precision("bfloat16", [mx.cpu(0), mx.gpu(0)])
    with pytest.raises(UserError, match="solver.amp"):
        check_conv_precision("float16", [mx.cpu(0)])
    with pytest.raises(ConfigError, match="solver.amp: expected one of '', 'bfloat16'"):
        get_config("shapes", ["solver.amp=float16"])
    with pytest.raises(ValueError):
        with conv_precision("float16"):
            pass


def test_auto_is_bfloat16_on_cpus_with_amx_only(monkeypatch):
    import mxmask
    monkeypatch.setitem(mxmask._AMX, "on", True)
    assert resolve_amp("auto", [mx.cpu(0), mx.cpu(1)]) == "bfloat16"
    assert resolve_amp("auto", [mx.cpu(0), mx.gpu(0)]) == ""
    monkeypatch.setitem(mxmask._AMX, "on", False)
    assert resolve_amp("auto", [mx.cpu(0)]) == ""
    assert resolve_amp("bfloat16", [mx.cpu(0)]) == "bfloat16"
    assert resolve_amp("", [mx.cpu(0)]) == ""
    assert get_config("shapes").solver.amp == "auto"


@needs_bf16
def test_a_short_bfloat16_training_run_checkpoints_and_evaluates(shapes_dataset, tmp_path):
    from mxmask.engine import checkpoint as ck
    from mxmask.train import run_training
    from helpers.tiny import load_tiny_params, tiny_cfg
    cfg = tiny_cfg(shapes_dataset, tmp_path / "run", "solver.max_iter=3",
                   "solver.checkpoint_period=3", "solver.amp=bfloat16")
    log = io.StringIO()
    out_dir, metrics = run_training(cfg, [mx.cpu()], out=log)
    assert "3 iterations, convolutions in bfloat16" in log.getvalue()
    saved = ck.load_checkpoint_config(out_dir)
    assert saved.solver.amp == "bfloat16"
    values = load_tiny_params(saved, ck.checkpoint_files(out_dir)[0])
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in values.values())
    assert metrics is not None and "bbox" in metrics
