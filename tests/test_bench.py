"""mxmask bench: the table, the JSON record and the chart on tiny inputs; the MAC counter; the
GluonCV reference (RoIAlign workarounds, RPN targets) that ``--against gluoncv`` runs; the
torchvision comparison (``--against torchvision``) with a fake torch interpreter, and with the
real one when ``MXMASK_TORCH_PYTHON`` names it."""
import json
import os
import types

import mxmask  # noqa: F401  (first: it sets OMP_NUM_THREADS before mxnet loads)
import mxnet as mx
import numpy as np
import pytest

from mxmask.cli import main
from mxmask.flops import count_block_macs, count_macs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STAT_KEYS = {"median", "min", "max"}


def _check_stats(s):
    assert set(s) == STAT_KEYS and 0 < s["min"] <= s["median"] <= s["max"], s


def test_bench_writes_stages_and_totals(tmp_path, capsys):
    path = tmp_path / "bench.json"
    code = main(["bench", "--preset", "shapes", "--size", "96x120", "--runs", "2", "--warmup", "1",
                 "--train", "--json", str(path), "--set", "test.max_dets=10", "--set",
                 "solver.amp="])
    assert code == 0
    result = json.loads(path.read_text())
    m = result["mxmask"]
    assert set(m["stages"]) == {"backbone+fpn", "rpn+proposals", "box_head+nms", "mask_head",
                                "keypoint_head", "paste/decode"}
    for s in list(m["stages"].values()) + [m["total_s"], m["network_s"], m["train_step_s"]]:
        _check_stats(s)
    assert m["total_s"]["median"] > m["network_s"]["median"]      # + paste/decode
    assert m["detections_per_image"] == 10          # the raised class bias fills max_dets
    assert result["settings"]["size"] == "96x128"   # rounded up to a multiple of 32
    assert m["peak_rss_mb"] > 0 and m["train_images_per_s"] > 0
    assert result["settings"]["train_amp"] == "float32"
    # the in-process network runs mxmask's compiled RoIAlign / GroupNorm where they load
    assert result["settings"]["kernels"] == ("mxmask" if mxmask.ops.load_ops() else "mxnet")
    # arithmetic: every network stage has its MACs, they add up, and the rate is 2*MAC/time
    assert set(m["gmac_stages"]) == set(m["stages"]) - {"paste/decode"}
    assert all(v > 0 for v in m["gmac_stages"].values())
    assert m["gmac"] == pytest.approx(sum(m["gmac_stages"].values()), rel=1e-9)
    assert m["gflop_per_s"] == pytest.approx(2 * m["gmac"] / m["network_s"]["median"], rel=1e-9)
    # keypoint head on exactly 10 and 100 rois: the head's arithmetic is linear in the rois
    kp = m["keypoint_head_per_rois"]
    assert set(kp) == {"10", "100"}
    for s in kp.values():
        _check_stats(s)
    gmac = m["keypoint_head_gmac_per_rois"]
    assert gmac["100"] == pytest.approx(10 * gmac["10"], rel=1e-9) and gmac["10"] > 0
    out = capsys.readouterr().out
    assert "keypoint_head" in out and "keypoint head 100 rois" in out and "GFLOP/s" in out
    # the shapes preset's test-time flip is in the total, and the table says so
    assert result["settings"]["test_flip"] is True
    assert "test.flip: the total includes the mirror image's" in out


def test_bench_fused_and_bf16_variants(tmp_path):
    for extra in (["--fuse"], ["--fuse", "--dtype", "bfloat16"]):
        path = tmp_path / "bench.json"
        assert main(["bench", "--preset", "shapes", "--size", "96x128", "--runs", "1",
                     "--warmup", "1", "--json", str(path), "--set", "test.max_dets=5"] + extra) == 0
        result = json.loads(path.read_text())
        m = result["mxmask"]
        assert result["settings"]["fuse"] is True
        assert result["settings"]["dtype"] == (extra[-1] if len(extra) > 1 else "float32")
        assert m["total_s"]["median"] > 0 and m["plain_total_s"]["median"] > 0
        assert m["plain_network_s"]["median"] > 0
        # the rate is that of the timed (optimised) graph
        assert m["gflop_per_s"] == pytest.approx(2 * m["gmac"] / m["network_s"]["median"])


def test_bench_bfloat16_training_step(tmp_path, capsys):
    """--dtype bfloat16 --train times the training step with solver.amp=bfloat16."""
    path = tmp_path / "bench.json"
    assert main(["bench", "--preset", "shapes", "--size", "96x128", "--runs", "1", "--warmup",
                 "1", "--train", "--dtype", "bfloat16", "--no-fuse", "--json", str(path),
                 "--set", "test.max_dets=5"]) == 0
    result = json.loads(path.read_text())
    assert result["settings"]["train_amp"] == "bfloat16"
    assert result["mxmask"]["train_step_s"]["median"] > 0
    assert "convolutions in bfloat16" in capsys.readouterr().out


def test_bench_against_gluoncv_end_to_end(tmp_path, capsys):
    """``--against gluoncv --train`` through the CLI: JSON schema, ratios, table lines, chart."""
    from PIL import Image
    path, chart = tmp_path / "bench.json", tmp_path / "stages.png"
    assert main(["bench", "--preset", "shapes", "--size", "128x160", "--runs", "1", "--warmup",
                 "0", "--train", "--against", "gluoncv", "--json", str(path), "--chart",
                 str(chart), "--set", "test.max_dets=10"]) == 0
    result = json.loads(path.read_text())
    assert set(result) == {"settings", "mxmask", "gluoncv", "speedup", "network_speedup",
                           "train_speedup", "resnet50"}
    m, g, r = result["mxmask"], result["gluoncv"], result["resnet50"]
    settings = result["settings"]
    assert settings["against"] == "gluoncv" and settings["size"] == "128x160"
    assert settings["test_flip"] is False          # matched: GluonCV has no test-time flip
    assert settings["gluoncv"]["model"] == "mask_rcnn_fpn_resnet50_v1b_coco"
    assert settings["gluoncv"]["max_dets"] == 10 == settings["max_dets"]
    # GluonCV's record
    assert {"total_s", "network_s", "paste_s", "detections_per_image", "gmac", "gmac_stages",
            "gflop_per_s", "train_step_s", "train_images_per_s", "rpn_targets_s"} <= set(g)
    for s in (g["total_s"], g["network_s"], g["paste_s"], g["train_step_s"], g["rpn_targets_s"]):
        _check_stats(s)
    assert g["detections_per_image"] == 10                   # matched max_dets
    assert g["total_s"]["median"] == pytest.approx(g["network_s"]["median"]
                                                   + g["paste_s"]["median"], rel=1e-9)
    assert g["train_step_s"]["median"] > g["rpn_targets_s"]["median"]
    assert set(g["gmac_stages"]) == {"backbone+fpn", "rpn", "box_head", "mask_head"}
    assert g["gmac"] == pytest.approx(sum(g["gmac_stages"].values()), rel=1e-9)
    assert g["gmac"] > 10 * m["gmac"]          # a ResNet-50 network vs the shapes preset's R18/32
    assert g["gflop_per_s"] == pytest.approx(2 * g["gmac"] / g["network_s"]["median"], rel=1e-9)
    # the ratios
    assert result["speedup"] == pytest.approx(g["total_s"]["median"] / m["total_s"]["median"],
                                              rel=1e-12)
    assert result["network_speedup"] == pytest.approx(
        g["network_s"]["median"] / m["network_s"]["median"], rel=1e-12)
    assert result["train_speedup"] == pytest.approx(
        g["train_step_s"]["median"] / m["train_step_s"]["median"], rel=1e-12)
    # the plain ResNet-50 (implied by --against)
    assert r["gmac"] == pytest.approx(4.0892 * 128 * 160 / 224 ** 2, rel=0.02)
    _check_stats(r["plain_s"])
    _check_stats(r["mkldnn_s"])
    assert r["gflop_per_s"]["plain"] == pytest.approx(2 * r["gmac"] / r["plain_s"]["median"])
    out = capsys.readouterr().out
    for line in ("gluoncv total", "gluoncv train step", "speedup (gluoncv / mxmask median)",
                 "resnet50 mkldnn"):
        assert line in out
    # the chart: 6 stages + 2 totals at 0.45 in each, not blank, GluonCV's bar drawn in orange
    image = np.asarray(Image.open(str(chart)).convert("RGB"))
    assert image.shape == (int(round(100 * (1.2 + 0.45 * 8))), 800, 3)
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 20
    orange = (np.abs(image.astype(int) - [0xdd, 0x84, 0x52]).sum(axis=2) < 10).sum()
    assert orange > 1000


def test_chart_of_an_optimised_run_draws_both_totals(tmp_path):
    """With --fuse / --dtype the stages are the plain graph's: the plain total and the
    optimised total get a bar each (the darkest blue is the optimised one)."""
    from PIL import Image
    from mxmask.bench import write_chart
    stat = lambda v: {"median": v, "min": v * 0.9, "max": v * 1.1}       # noqa: E731
    result = {"mxmask": {"stages": {"backbone+fpn": stat(2.0), "mask_head": stat(0.8)},
                         "total_s": stat(1.5), "plain_total_s": stat(4.0)},
              "gluoncv": {"total_s": stat(6.0)}}
    settings = {"preset": "p", "size": "64x64", "batch": 1, "runs": 3, "dtype": "bfloat16",
                "fuse": True}
    path = tmp_path / "chart.png"
    write_chart(str(path), result, settings)
    image = np.asarray(Image.open(str(path)).convert("RGB"))
    assert image.shape == (int(round(100 * (1.2 + 0.45 * 5))), 800, 3)
    darkest = (np.abs(image.astype(int) - [0x0b, 0x1d, 0x33]).sum(axis=2) < 10).sum()
    assert darkest > 1000


def test_against_needs_batch_one(capsys):
    assert main(["bench", "--preset", "shapes", "--size", "64x64", "--batch", "2", "--against",
                 "gluoncv"]) == 2
    assert "--batch 1" in capsys.readouterr().err


def test_bench_size_is_rounded_up_or_a_one_line_error(capsys):
    from mxmask.bench import bench_input_size
    assert bench_input_size("800x1333") == (800, 1344) and bench_input_size("64X70") == (64, 96)
    for text, message in (("0x64", "--size 0x64: height and width must be positive"),
                          ("big", "--size big: expected HxW")):
        assert main(["bench", "--preset", "shapes", "--size", text]) == 2
        assert message in capsys.readouterr().err
    # larger than the anchor constants cover (shapes: 320): the size and the setting to change
    assert main(["bench", "--preset", "shapes", "--size", "256x352"]) == 2
    err = capsys.readouterr().err
    assert "--size 256x352: larger than 320" in err and "input.max_size_test=352" in err
    assert len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------
# MAC counting
# --------------------------------------------------------------------------------------------
def test_count_macs_by_hand():
    """A grouped convolution, a grouped deconvolution and a fully connected layer."""
    x = mx.sym.var("data")
    conv = mx.sym.Convolution(x, kernel=(3, 3), num_filter=8, num_group=2, pad=(1, 1),
                              stride=(2, 2), name="head_conv")
    deconv = mx.sym.Deconvolution(conv, kernel=(4, 4), num_filter=6, num_group=2, stride=(2, 2),
                                  pad=(1, 1), name="head_deconv")
    fc = mx.sym.FullyConnected(mx.sym.relu(deconv), num_hidden=10, name="fc")
    macs = count_macs(fc, {"data": (2, 4, 10, 12)}, groups={"head": ["head_"]})
    # conv: output (2, 8, 5, 6), each output value sums (4 / 2 groups) * 3 * 3 products
    conv_macs = 2 * 8 * 5 * 6 * (4 // 2) * 3 * 3
    # deconv: input (2, 8, 5, 6), each input value meets (6 / 2 groups) * 4 * 4 weights;
    # output (2, 6, 10, 12)
    deconv_macs = 2 * 8 * 5 * 6 * (6 // 2) * 4 * 4
    # fc: input flattened to 6 * 10 * 12 = 720 features, 2 rows, 10 outputs
    fc_macs = 2 * 10 * 6 * 10 * 12
    assert (conv_macs, deconv_macs, fc_macs) == (8640, 23040, 14400)
    assert macs["by_op"] == {"Convolution": conv_macs, "Deconvolution": deconv_macs,
                             "FullyConnected": fc_macs}
    assert macs["total"] == conv_macs + deconv_macs + fc_macs
    assert macs["by_group"] == {"head": conv_macs + deconv_macs, "other": fc_macs}
    assert [layer[0] for layer in macs["layers"]] == ["head_conv", "head_deconv", "fc"]
    # FullyConnected(flatten=False) on (2, 3, 7) rows: 2 * 3 rows of 7 inputs
    flat = count_macs(mx.sym.FullyConnected(x, num_hidden=5, flatten=False, name="f"),
                      {"data": (2, 3, 7)})
    assert flat["total"] == 2 * 3 * 5 * 7
    # a name shared by several nodes (a block called once per level) is counted per node
    w = mx.sym.var("shared_weight")
    a = mx.sym.Convolution(x, w, kernel=(1, 1), num_filter=4, no_bias=True, name="same")
    b = mx.sym.Convolution(mx.sym.Pooling(x, kernel=(2, 2), stride=(2, 2), pool_type="max"), w,
                           kernel=(1, 1), num_filter=4, no_bias=True, name="same")
    shared = count_macs(mx.sym.Group([a, b]), {"data": (1, 3, 8, 8)},
                        groups={"by_weight": ["shared_"]})
    assert shared["total"] == 4 * 3 * (8 * 8 + 4 * 4) == shared["by_group"]["by_weight"]
    with pytest.raises(ValueError, match="could not be inferred"):
        count_macs(fc, {})


def test_count_macs_resnet50():
    """GluonCV resnet50_v1b at 224x224: 4,089,184,256 MACs here (4,087,136,256 in convolutions
    + 2,048,000 in the classifier), the usual "4.1 GMAC" of ResNet-50."""
    from gluoncv.model_zoo import resnet50_v1b
    macs = count_block_macs(resnet50_v1b(pretrained=False), {"data": (1, 3, 224, 224)})
    assert macs["total"] == pytest.approx(4.1e9, rel=0.01)
    assert macs["by_op"]["FullyConnected"] == 2048 * 1000
    assert len(macs["layers"]) == 53 + 1          # 53 convolutions (incl. 4 downsamples) + fc
    assert macs["total"] == 4089184256


# --------------------------------------------------------------------------------------------
# The GluonCV reference
# --------------------------------------------------------------------------------------------
def _rois_and_features(rng, n=300, channels=8):
    features = [mx.nd.array(rng.randn(1, channels, s, s)) for s in (64, 32, 16, 8)]
    xy = rng.uniform(0, 200, (n, 2))
    wh = rng.uniform(2, 250, (n, 2))
    rois = mx.nd.array(np.concatenate([np.zeros((n, 1)), xy, xy + wh], axis=1))
    return features, rois


def test_roi_feats_workarounds_agree_and_gluoncv_own_is_corrupted():
    """The three workarounds give the same pooled features bit for bit (the masked one also as a
    symbol); GluonCV's own version on the same input does not (the CPU bug they work around)."""
    from gluoncv.model_zoo.rcnn.faster_rcnn.faster_rcnn import FasterRCNN
    from mxmask.convert.gluoncv_reference import ROI_FEATS
    features, rois = _rois_and_features(np.random.RandomState(0))
    args = ((14, 14), (4, 8, 16, 32))
    ref = ROI_FEATS["gathered"](None, mx.nd, features, rois, *args).asnumpy()
    assert ref.shape == (300, 8, 14, 14) and np.abs(ref).min(axis=(1, 2, 3)).max() > 0
    for name in ("masked", "every_level"):
        np.testing.assert_array_equal(ROI_FEATS[name](None, mx.nd, features, rois, *args)
                                      .asnumpy(), ref)
    feats_sym = [mx.sym.var("f%d" % i) for i in range(4)]
    sym = ROI_FEATS["masked"](None, mx.sym, feats_sym, mx.sym.var("rois"), *args)
    bound = {"f%d" % i: f for i, f in enumerate(features)}
    bound["rois"] = rois
    np.testing.assert_array_equal(sym.bind(mx.cpu(), bound).forward()[0].asnumpy(), ref)
    owner = types.SimpleNamespace(_min_stage=2, _max_stage=6)
    theirs = FasterRCNN._pyramid_roi_feats(owner, mx.nd, features, rois, *args).asnumpy()
    assert not np.array_equal(theirs, ref)


def test_gluoncv_rpn_targets_equal_its_data_loader(monkeypatch):
    """GluonCVRPNTargets gives what GluonCV's MaskRCNNDefaultTrainTransform + MaskRCNNTrainBatchify
    give for the same image and boxes (flip disabled, same numpy seed for the sampling)."""
    import warnings
    from gluoncv.data.batchify import MaskRCNNTrainBatchify
    from gluoncv.data.transforms import image as timage
    from gluoncv.data.transforms.presets.rcnn import MaskRCNNDefaultTrainTransform
    from mxmask.bench import synthetic_train_batch
    from mxmask.config import get_config
    from mxmask.convert.gluoncv_reference import GluonCVRPNTargets, build_gluoncv_mask_rcnn
    h, w = 128, 160
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = build_gluoncv_mask_rcnn(max_dets=10)
        batch = synthetic_train_batch(get_config("shapes"), (h, w), 1)
        boxes = batch["gt_boxes"][0]
        np.random.seed(5)
        ours = [x.asnumpy() for x in GluonCVRPNTargets(net)(batch["gt_boxes"], h, w)]
        monkeypatch.setattr(timage, "random_flip", lambda img, px=0, py=0: (img, (False, False)))
        transform = MaskRCNNDefaultTrainTransform(h, w, net, ashape=net.ashape, multi_stage=True)
        label = np.concatenate([boxes, np.zeros((len(boxes), 1))], axis=1)
        polygons = [[np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]])]
                    for x1, y1, x2, y2 in boxes]
        image = mx.nd.array(np.zeros((h, w, 3)), dtype=np.uint8)
        np.random.seed(5)
        sample = transform(image, label, polygons)
        _, _, _, cls_t, box_t, mask_t = MaskRCNNTrainBatchify(net)([sample])
    theirs = [cls_t[0].asnumpy(), box_t[0].asnumpy(), mask_t[0].asnumpy()]
    n_anchors = 3 * sum((h // s) * (w // s) for s in (4, 8, 16, 32)) + 3 * 2 * 3
    assert ours[0].shape == (1, n_anchors) and ours[1].shape == (1, n_anchors, 4)
    assert (ours[0] == 1).sum() > 0 and (ours[0] == 0).sum() > 0     # positives and negatives
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)


def test_bench_train_steps_times_real_batches(ckpt, shapes_dataset, tmp_path, capsys):
    """dev/bench_train_steps.py: blocks of real training steps from a checkpoint's weights,
    or from a preset with random init; a bad checkpoint is a one-line error."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "bench_train_steps", os.path.join(ROOT, "dev", "bench_train_steps.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    report = tmp_path / "steps.json"
    assert script.main(["--ckpt", ckpt, "--steps", "2", "--repeat", "2", "--warmup", "1",
                        "--set", "solver.amp=", "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert len(result["ms_per_step"]) == 2 and all(v > 0 for v in result["ms_per_step"])
    assert result["median_ms"] == pytest.approx(sum(result["ms_per_step"]) / 2)
    assert result["images_per_step"] == 2 and result["overrides"] == ["solver.amp="]
    assert "ms per step (2 steps of 2 images per block, after 1)" in capsys.readouterr().out
    train = os.path.join(shapes_dataset, "annotations", "train.json")
    images = os.path.join(shapes_dataset, "images", "train")
    assert script.main(["--set", "data.train_ann=" + train, "data.train_images=" + images,
                        "input.min_size_train=[96]", "input.max_size_train=128",
                        "--steps", "1", "--warmup", "0"]) == 0
    assert script.main(["--ckpt", str(tmp_path / "none")]) == 2
    assert "config.yaml is missing" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# The torchvision comparison (--against torchvision): a fake torch interpreter for the plumbing,
# the real one when MXMASK_TORCH_PYTHON names it
# --------------------------------------------------------------------------------------------
FAKE_TORCH_PYTHON = r'''#!%(python)s
"""A stand-in for a torch interpreter: answers the version probe, and for
``torchvision_reference.py time ...`` keeps its arguments and inputs in %(log)r and prints the
record the real verb would, with made-up figures."""
import json, os, shutil, sys
log = %(log)r
args = sys.argv[1:]
if args[0] == "-c":
    if %(no_torch)r:
        sys.exit("ModuleNotFoundError: No module named 'torch'")
    print(json.dumps({"torch": "9.9.9", "torchvision": "8.8.8"}))
    sys.exit(0)
if %(garbage)r:
    print("not a record")
    sys.exit(0)
if %(fail)r:
    sys.stderr.write("Traceback (most recent call last):\n  ...\nRuntimeError: out of memory\n")
    sys.exit(1)
os.makedirs(log, exist_ok=True)
with open(os.path.join(log, "argv.json"), "w") as f:
    json.dump(args, f)
opt = {args[i]: args[i + 1] for i in range(2, len(args) - 1) if args[i].startswith("--")}
shutil.copy(opt["--inputs"], os.path.join(log, "inputs.npz"))
stat = lambda v: {"median": v, "min": v * 0.9, "max": v * 1.2}
record = {"network_s": stat(3.0), "paste_s": stat(0.5), "total_s": stat(3.5),
          "detections_per_image": 100.0, "gmac": 300.0,
          "gmac_stages": {"backbone+fpn": 200.0, "rpn": 20.0, "box_head": 30.0, "mask_head": 50.0}}
if opt["--arch"] == "keypointrcnn_resnet50_fpn":
    record["keypoint_head_per_rois"] = {"10": stat(0.4), "100": stat(3.5)}
    record["keypoint_head_gmac_per_rois"] = {"10": 35.0, "100": 350.0}
if "--train" in args:
    record.update(train_step_s=stat(8.0), train_images_per_s=0.125)
record["settings"] = {"arch": opt["--arch"], "torch": "9.9.9", "torchvision": "8.8.8",
                      "threads": int(opt["--threads"]), "dtype": opt["--dtype"],
                      "autocast": "bfloat16" if opt["--dtype"] == "bfloat16" else None,
                      "box_detections_per_img": int(opt["--detections"]),
                      "train_dtype": opt.get("--train-dtype")}
sys.stderr.write("UserWarning: torch noise on stderr\n")
print(json.dumps(record))
'''


def _fake_torch_python(tmp_path, name="python", no_torch=False, fail=False, garbage=False):
    """An executable script in ``tmp_path`` playing the torch interpreter (FAKE_TORCH_PYTHON):
    without torch (``no_torch``), failing (``fail``) or printing no record (``garbage``); its
    log folder is ``tmp_path / "log"``."""
    import sys
    path = tmp_path / name
    path.write_text(FAKE_TORCH_PYTHON % {"python": sys.executable, "log": str(tmp_path / "log"),
                                         "no_torch": no_torch, "fail": fail,
                                         "garbage": garbage})
    path.chmod(0o755)
    return str(path)


def _inputs_and_args(tmp_path):
    """What the fake interpreter was given: (argv after the interpreter, {option: value},
    {name: array} of the inputs file)."""
    argv = json.loads((tmp_path / "log" / "argv.json").read_text())
    assert argv[0].endswith(os.path.join("mxmask", "convert", "torchvision_reference.py"))
    assert os.path.isfile(argv[0]) and argv[1] == "time"
    opt = {argv[i]: argv[i + 1] for i in range(2, len(argv) - 1) if argv[i].startswith("--")}
    with np.load(str(tmp_path / "log" / "inputs.npz")) as f:
        arrays = {k: f[k] for k in f.files}
    return argv, opt, arrays


def test_bench_against_torchvision_with_a_fake_interpreter(tmp_path, capsys, monkeypatch):
    """A mask preset with --train: the torch side gets mxmask's own input, training batch, runs,
    warm-up, threads and max_dets; its record, the ratios, the table lines and the chart."""
    import sys
    from PIL import Image
    from mxmask.bench import bench_input, synthetic_train_batch
    from mxmask.config import get_config
    monkeypatch.delenv("MXMASK_TORCH_PYTHON", raising=False)
    fake = _fake_torch_python(tmp_path)
    path, chart = tmp_path / "bench.json", tmp_path / "stages.png"
    assert main(["bench", "--preset", "shapes", "--size", "96x128", "--runs", "1", "--warmup",
                 "0", "--train", "--against", "torchvision", "--torch-python", fake, "--json",
                 str(path), "--chart", str(chart), "--set", "test.max_dets=10"]) == 0
    argv, opt, arrays = _inputs_and_args(tmp_path)
    assert opt["--arch"] == "maskrcnn_resnet50_fpn"             # shapes has masks
    assert (opt["--dtype"], opt["--runs"], opt["--warmup"]) == ("float32", "1", "0")
    assert opt["--detections"] == "10" and float(opt["--score-thresh"]) == 0.0
    assert opt["--threads"] == os.environ["OMP_NUM_THREADS"] and "--train" in argv
    # the training step in the precision mxmask's resolved to (shapes: solver.amp auto)
    assert opt["--train-dtype"] == json.loads(path.read_text())["settings"]["train_amp"]
    # the same arrays mxmask was timed on
    np.testing.assert_array_equal(arrays["data"], bench_input((96, 128))[0].asnumpy())
    cfg = get_config("shapes")
    cfg.model.num_keypoints = 7                       # as build_bench_model sets it
    batch = synthetic_train_batch(cfg, (96, 128), 1)
    np.testing.assert_array_equal(arrays["train_data"], batch["data"])
    for key in ("gt_boxes", "gt_labels", "gt_masks", "gt_keypoints"):
        np.testing.assert_array_equal(arrays[key], batch[key])
    assert not any(k.startswith("keypoint_boxes") for k in arrays)
    result = json.loads(path.read_text())
    assert set(result) == {"settings", "mxmask", "torchvision", "speedup", "network_speedup",
                           "train_speedup"}                  # no GluonCV ResNet-50 here
    m, t, settings = result["mxmask"], result["torchvision"], result["settings"]
    assert settings["against"] == "torchvision" and settings["test_flip"] is False
    ts = settings["torchvision"]
    assert ts["model"] == "maskrcnn_resnet50_fpn" and ts["python"] == fake
    assert (ts["torch"], ts["threads"], ts["max_dets"]) == ("9.9.9", int(opt["--threads"]), 10)
    assert t["network_s"] == pytest.approx({"median": 3.0, "min": 2.7, "max": 3.6})
    assert t["gflop_per_s"] == pytest.approx(2 * 300.0 / 3.0)
    assert result["speedup"] == pytest.approx(3.5 / m["total_s"]["median"], rel=1e-12)
    assert result["network_speedup"] == pytest.approx(3.0 / m["network_s"]["median"], rel=1e-12)
    assert result["train_speedup"] == pytest.approx(8.0 / m["train_step_s"]["median"], rel=1e-12)
    out = capsys.readouterr().out
    for line in ("torchvision maskrcnn_resnet50_fpn: torch=9.9.9", "torchvision network",
                 "torchvision postprocess", "torchvision total", "torchvision detections/image 100",
                 "torchvision network 300.00 GMAC (backbone+fpn 200.00, rpn 20.00, box_head "
                 "30.00, mask_head 50.00): 200.0 GFLOP/s",
                 "torchvision train step", "(0.12 images/s)",
                 "speedup (torchvision / mxmask median): inference %.2fx (networks alone %.2fx), "
                 "train step %.2fx" % (result["speedup"], result["network_speedup"],
                                       result["train_speedup"])):
        assert line in out, line
    assert "resnet50 fp32" not in out and "gluoncv" not in out
    assert "torch" not in sys.modules                # mxmask's process never imports torch
    # the chart draws torchvision's total in the peer's colour
    image = np.asarray(Image.open(str(chart)).convert("RGB"))
    assert (np.abs(image.astype(int) - [0xdd, 0x84, 0x52]).sum(axis=2) < 10).sum() > 1000


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_bench_against_torchvision_keypoints(dtype, tmp_path, capsys, monkeypatch):
    """A keypoint config (17 keypoints) through MXMASK_TORCH_PYTHON: the keypoint arch, the
    dtype, the keypoint-head boxes mxmask times, and their speedups (only in float32: mxmask's
    heads on 10 / 100 rois are timed in the plain fp32 network)."""
    from mxmask.bench import keypoint_head_boxes
    monkeypatch.setenv("MXMASK_TORCH_PYTHON", _fake_torch_python(tmp_path))
    path = tmp_path / "bench.json"
    assert main(["bench", "--preset", "shapes", "--size", "64x96", "--runs", "1", "--warmup",
                 "0", "--dtype", dtype, "--against", "torchvision", "--json", str(path),
                 "--set", "test.max_dets=10", "--set", "model.mask_on=false", "--set",
                 "model.num_keypoints=17"]) == 0
    argv, opt, arrays = _inputs_and_args(tmp_path)
    assert opt["--arch"] == "keypointrcnn_resnet50_fpn" and opt["--dtype"] == dtype
    assert "--train" not in argv and set(arrays) == {"data", "keypoint_boxes_10",
                                                     "keypoint_boxes_100"}
    for count, boxes in keypoint_head_boxes((64, 96)).items():
        np.testing.assert_array_equal(arrays["keypoint_boxes_%d" % count], boxes)
    result = json.loads(path.read_text())
    m = result["mxmask"]
    assert "train_speedup" not in result
    out = capsys.readouterr().out
    assert "torchvision keypoint 100 rois" in out and "350.00 GMAC, 200.0 GFLOP/s" in out
    if dtype == "bfloat16":
        assert result["settings"]["torchvision"]["autocast"] == "bfloat16"
        assert "keypoint_head_speedup" not in result and ", keypoint head 10 rois" not in out
        return
    assert result["keypoint_head_speedup"] == pytest.approx(
        {"10": 0.4 / m["keypoint_head_per_rois"]["10"]["median"],
         "100": 3.5 / m["keypoint_head_per_rois"]["100"]["median"]}, rel=1e-12)
    assert ", keypoint head 10 rois %.2fx" % result["keypoint_head_speedup"]["10"] in out


def test_against_torchvision_errors_are_one_line(tmp_path, capsys, monkeypatch):
    """No interpreter, a missing file, one without torch, a keypoint config without 17
    keypoints, a failing or silent torch program: one line each, exit code 2."""
    from mxmask.convert.torch_python import run_reference_json
    from mxmask.utils import UserError
    monkeypatch.delenv("MXMASK_TORCH_PYTHON", raising=False)
    base = ["bench", "--preset", "shapes", "--size", "64x64", "--runs", "1", "--warmup", "0",
            "--against", "torchvision"]
    how = "python3 -m venv tv && tv/bin/pip install torch torchvision"

    def error(args):
        assert main(base + args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err
    err = error([])
    assert "--against torchvision runs torchvision in a separate Python" in err
    assert "--torch-python PATH or set MXMASK_TORCH_PYTHON" in err and how in err
    missing = str(tmp_path / "nowhere" / "python")
    err = error(["--torch-python", missing])
    assert "--torch-python %s: no such file" % missing in err and how in err
    monkeypatch.setenv("MXMASK_TORCH_PYTHON", missing)
    assert "MXMASK_TORCH_PYTHON=%s: no such file" % missing in error([])
    no_torch = _fake_torch_python(tmp_path, "no_torch", no_torch=True)
    err = error(["--torch-python", no_torch])
    assert ("--torch-python %s: cannot import torch and torchvision (ModuleNotFoundError: No "
            "module named 'torch')" % no_torch) in err and how in err
    fake = _fake_torch_python(tmp_path)
    assert ("keypointrcnn_resnet50_fpn has 17 keypoints, model.num_keypoints is 7"
            in error(["--torch-python", fake, "--set", "model.mask_on=false"]))
    # the torch program fails, or prints no record
    failing = _fake_torch_python(tmp_path, "failing", fail=True)
    with pytest.raises(UserError, match=r"^torchvision_reference.py time failed \(exit 1, .*"
                                        r"failing\): RuntimeError: out of memory$"):
        run_reference_json(failing, "time", ["--arch", "maskrcnn_resnet50_fpn"])
    garbage = _fake_torch_python(tmp_path, "garbage", garbage=True)
    with pytest.raises(UserError, match=r"^torchvision's timing printed no JSON object \(.*"
                                        r"garbage\): 'not a record'$"):
        run_reference_json(garbage, "time", [], what="torchvision's timing")


@pytest.mark.parametrize("case", ["mask_fp32_through_bench", "keypoint_bf16_own_inputs"])
def test_torchvision_time_verb_real(case, tmp_path):
    """The real ``torchvision_reference.py time`` at a tiny size, one run: the mask arch in fp32
    through :func:`bench_torchvision` (mxmask's arrays), and the keypoint arch in bf16 autocast
    with channels_last on the verb's own inputs; both with a training step."""
    python = os.environ.get("MXMASK_TORCH_PYTHON")
    if not python:
        pytest.skip("MXMASK_TORCH_PYTHON is not set: no torch interpreter to run "
                    "torchvision_reference.py time with (a Python with torch and torchvision)")
    from mxmask.bench.peers import bench_torchvision, torch_threads
    from mxmask.config import get_config
    from mxmask.convert.torch_python import find_torch_python, run_reference_json
    python, versions = find_torch_python(python)
    if case == "mask_fp32_through_bench":
        arch = "maskrcnn_resnet50_fpn"
        record, settings = bench_torchvision(python, arch,
                                             get_config("torchvision_mask_rcnn_r50_fpn"),
                                             (64, 96), runs=1, warmup=0, train=True)
        assert settings["model"] == arch and settings["dtype"] == "float32"
        assert settings["memory_format"] == "contiguous" and "autocast" not in settings
        assert settings["threads"] == torch_threads() and settings["max_dets"] == 100
        assert record["gflop_per_s"] == pytest.approx(2 * record["gmac"]
                                                      / record["network_s"]["median"])
        stages = {"backbone+fpn", "rpn", "box_head", "mask_head"}
    else:
        arch = "keypointrcnn_resnet50_fpn"
        record = run_reference_json(python, "time", [
            "--arch", arch, "--size", 64, 96, "--train", "--train-size", 64, 64, "--runs", 1,
            "--warmup", 0, "--dtype", "bfloat16", "--threads", 1])
        settings = record.pop("settings")
        assert (settings["autocast"], settings["memory_format"]) == ("bfloat16", "channels_last")
        assert settings["threads"] == 1 and settings["train_size"] == "64x64"
        stages = {"backbone+fpn", "rpn", "box_head", "keypoint_head"}
        for count in ("10", "100"):
            _check_stats(record["keypoint_head_per_rois"][count])
        gmac = record["keypoint_head_gmac_per_rois"]
        assert gmac["100"] == pytest.approx(10 * gmac["10"], rel=1e-9)
    assert settings["torchvision"] == versions["torchvision"]
    for key in ("network_s", "paste_s", "total_s", "train_step_s"):
        _check_stats(record[key])
    assert record["total_s"]["median"] == pytest.approx(record["network_s"]["median"]
                                                        + record["paste_s"]["median"])
    assert 0 < record["detections_per_image"] <= 100 and record["train_images_per_s"] > 0
    assert set(record["gmac_stages"]) == stages
    assert record["gmac"] == pytest.approx(sum(record["gmac_stages"].values()), rel=1e-9)
