"""Tests of mxmask.export, the ``mxmask export`` verb and scripts/predict_exported.py.

A random-weight checkpoint of the ``shapes`` preset (the shapes dataset's 5 classes and 7
keypoints, so its graph is the committed symbols/shapes-symbol.json) is exported once per module.
Checked: the files and their contents, SymbolBlock.imports with inputs ``data``/``im_info`` equal
to the Gluon model at three input sizes, the committed preset graph running with exported
weights, the CLI and its user errors, MKLDNN-fused and bfloat16 exports, the AMP workaround, and
the standalone script (same detections as mxmask's Predictor, no mxmask/gluoncv/yaml imported).
"""
import ast
import json
import os
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest

from helpers.export_script import assert_same_entries, run_script
from mxmask.cli import main
from mxmask.config import load_yaml, to_dict
from mxmask.engine.checkpoint import save_config
from mxmask.export import compare_outputs, export_checkpoint, import_exported
from mxmask.graph import bf16_fp32_exclusions, graph_diff, preset_config
from mxmask.modeling.rcnn import build_model
from mxmask.predictor import load_network

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "predict_exported.py")
OUTPUTS = ["ids", "scores", "boxes", "masks", "keypoints", "heatmaps"]
# SymbolBlock.imports warns that the graph inputs have no declared dtype (they are fp32)
pytestmark = pytest.mark.filterwarnings("ignore:Cannot decide type")


def inputs(H, W, valid=None, seed=0):
    rng = np.random.RandomState(seed)
    data = mx.nd.array(rng.randn(1, 3, H, W).astype(np.float32))
    h, w = valid or (H, W)
    return data, mx.nd.array([[h, w, 1.0]])


@pytest.fixture(scope="module")
def shapes_ckpt(tmp_path_factory):
    """Checkpoint folder (config.yaml + model.params) of the shapes preset, random weights."""
    ckpt = str(tmp_path_factory.mktemp("export_ckpt"))
    cfg = preset_config("shapes")
    mx.random.seed(0)
    net = build_model(cfg)
    save_config(cfg, ckpt)
    net.save_parameters(os.path.join(ckpt, "model.params"))
    return ckpt


@pytest.fixture(scope="module")
def gluon_net(shapes_ckpt):
    cfg = load_yaml(os.path.join(shapes_ckpt, "config.yaml"))
    return load_network(cfg, os.path.join(shapes_ckpt, "model.params"), [mx.cpu()])


@pytest.fixture(scope="module")
def exported(shapes_ckpt, tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("export_out") / "shapes")
    result = export_checkpoint(shapes_ckpt, prefix, size=(192, 256))
    return prefix, result


# --------------------------------------------------------------------------------------------
def test_export_files_and_contents(shapes_ckpt, exported):
    prefix, result = exported
    assert result["files"] == [prefix + s for s in ("-symbol.json", "-0000.params",
                                                    "-config.yaml", "-meta.json")]
    assert all(os.path.exists(f) for f in result["files"])
    assert not [n for n in os.listdir(os.path.dirname(prefix)) if n.startswith(".export-")]
    # the built-in check ran on the 192x256 example and found the same outputs
    check = result["check"]
    assert [check[n] for n in OUTPUTS] == [0.0] * 6 and check["matched"] == 1.0
    sym = mx.sym.load(prefix + "-symbol.json")
    assert sym.list_inputs()[:1] == ["data"] and "im_info" in sym.list_inputs()
    assert sym.list_outputs() == [n + "_output" for n in OUTPUTS]
    params = mx.nd.load(prefix + "-0000.params")
    anchors = [k for k in params if k.endswith("_anchors")]
    assert len(anchors) == 5 and all(k.startswith("arg:") for k in anchors)
    assert {k.split(":", 1)[1] for k in params} == set(sym.list_inputs()) - {"data", "im_info"}
    original = load_yaml(os.path.join(shapes_ckpt, "config.yaml"))
    assert to_dict(load_yaml(prefix + "-config.yaml")) == to_dict(original)
    with open(prefix + "-meta.json") as f:
        meta = json.load(f)
    assert meta["inputs"] == ["data", "im_info"] and meta["outputs"] == OUTPUTS
    assert meta["category_ids"] == [1, 2, 5, 6, 9] and meta["class_names"][4] == "figure"
    assert meta["keypoint_category_ids"] == [9] and meta["max_input_size"] == 320
    assert (meta["min_size_test"], meta["max_size_test"], meta["size_divisibility"]) == \
        (192, 320, 32)
    assert meta["pixel_mean"] == original.input.pixel_mean
    assert meta["dtype"] == "float32" and meta["fused"] is False


@pytest.mark.parametrize("size,valid", [((128, 160), (128, 150)), ((192, 256), None),
                                        ((320, 224), (300, 200))])
def test_imports_equals_gluon(gluon_net, exported, size, valid):
    prefix, _ = exported
    sb = mx.gluon.SymbolBlock.imports(prefix + "-symbol.json", ["data", "im_info"],
                                      prefix + "-0000.params")
    data, im_info = inputs(*size, valid=valid, seed=size[0])
    ref = [o.asnumpy() for o in gluon_net(data, im_info)]
    got = [o.asnumpy() for o in sb(data, im_info)]
    assert (ref[0] >= 0).sum() > 0
    for name, a, b in zip(OUTPUTS, ref, got):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=name)


def test_committed_preset_graph_runs_with_exported_params(gluon_net, exported):
    """symbols/shapes-symbol.json is the graph `mxmask export` writes for a shapes checkpoint,
    and it runs with the exported parameters."""
    prefix, _ = exported
    committed = os.path.join(ROOT, "symbols", "shapes-symbol.json")
    with open(committed) as a, open(prefix + "-symbol.json") as b:
        assert graph_diff(a.read(), b.read()) == []
    sb = mx.gluon.SymbolBlock.imports(committed, ["data", "im_info"], prefix + "-0000.params")
    data, im_info = inputs(160, 192, seed=3)
    for a, b in zip(gluon_net(data, im_info), sb(data, im_info)):
        np.testing.assert_allclose(b.asnumpy(), a.asnumpy(), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
def test_cli_export_and_user_errors(shapes_ckpt, tmp_path, capsys):
    prefix = str(tmp_path / "cli" / "m")
    assert main(["export", shapes_ckpt, "--out", prefix, "--no-check"]) == 0
    for suffix in ("-symbol.json", "-0000.params", "-config.yaml", "-meta.json"):
        assert os.path.exists(prefix + suffix)
    capsys.readouterr()
    bad = [(["--size", "100x64"], "--size 100x64: height and width must be positive multiples"),
           (["--size", "800x800"], "--size 800x800: larger than 320"),
           (["--size", "big"], "--size big: expected HxW")]
    for extra, message in bad:
        assert main(["export", shapes_ckpt, "--out", str(tmp_path / "x")] + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err
    assert main(["export", shapes_ckpt, "--out", str(tmp_path)]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "config.yaml is missing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["export", shapes_ckpt, "--out", str(tmp_path / "x"), "--dtype", "float16"])
    assert e.value.code == 2
    assert not os.path.exists(str(tmp_path / "x-symbol.json"))


def test_cli_export_rejects_mismatched_weights(shapes_ckpt, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    cfg = load_yaml(os.path.join(shapes_ckpt, "config.yaml"))
    cfg.model.num_classes = 3                      # the weights have 5 classes
    save_config(cfg, str(ckpt))
    os.link(os.path.join(shapes_ckpt, "model.params"), str(ckpt / "model.params"))
    assert main(["export", str(ckpt), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "model.params: does not match the network of its config" in err


# --------------------------------------------------------------------------------------------
def test_fused_export(gluon_net, shapes_ckpt, tmp_path):
    prefix = str(tmp_path / "fused")
    result = export_checkpoint(shapes_ckpt, prefix, size=(192, 256), fuse=True, check=False)
    with open(prefix + "-symbol.json") as f:
        ops = [n["op"] for n in json.load(f)["nodes"]]
    assert ops.count("_sg_mkldnn_conv") >= 40 and "Convolution" not in ops
    with open(prefix + "-meta.json") as f:
        assert json.load(f)["fused"] is True
    sb = import_exported(prefix)
    # the traced size and another one: the fused graph is not tied to one input shape
    for size in [(192, 256), (256, 160)]:
        data, im_info = inputs(*size, seed=size[1])
        report = compare_outputs(gluon_net(data, im_info), sb(data, im_info), OUTPUTS)
        assert report["scores"] <= 1e-4 and report["masks"] <= 1e-4, report
        assert report["matched"] == 1.0 and report["matched_box"] <= 1e-2, report
    assert result["float32_nodes"] == []


def test_bfloat16_fused_export(gluon_net, shapes_ckpt, tmp_path):
    prefix = str(tmp_path / "bf16")
    result = export_checkpoint(shapes_ckpt, prefix, size=(192, 256), fuse=True,
                               dtype="bfloat16", check=False)
    # the P6 max-pool reads fp32 GroupNorm output also cast to bf16 for the RPN conv: pinned
    assert "mxmask_fpnbackbone0_pooling0" in result["float32_nodes"]
    with open(prefix + "-symbol.json") as f:
        ops = [n["op"] for n in json.load(f)["nodes"]]
    assert ops.count("amp_cast") > 10 and ops.count("_sg_mkldnn_conv") >= 40
    params = mx.nd.load(prefix + "-0000.params")
    bf16 = [k for k, v in params.items() if v.dtype == np.dtype([("bfloat16", np.uint16)])]
    assert any(k.endswith("rpn0_head_conv_weight") for k in bf16)
    assert not any(k.endswith("_anchors") for k in bf16)
    sb = import_exported(prefix)
    data, im_info = inputs(192, 256, seed=7)
    got = sb(data, im_info)
    assert all(np.isfinite(g.asnumpy()).all() for g in got)
    report = compare_outputs(gluon_net(data, im_info), got, OUTPUTS)
    # random weights give near-tied scores, so rows reorder; matched detections agree closely
    assert report["matched"] >= 0.8 and report["matched_score"] <= 1e-2, report
    assert report["matched_box"] <= 1.0, report


def test_amp_pass_bug_and_exclusions():
    """MXNet 1.9.1's AMP pass mislabels a Pooling on an fp32 tensor that was also cast to bf16
    for another consumer; pinning the Pooling to fp32 makes the conversion consistent."""
    from mxnet.contrib import amp
    w = mx.sym.var("shared_w", dtype="float32")

    def conv(x, name, weight=None):
        weight = weight if weight is not None else mx.sym.var(name + "_w", dtype="float32")
        return mx.sym.Convolution(x, weight=weight, no_bias=True, kernel=(3, 3), pad=(1, 1),
                                  num_filter=4, name=name)

    a = mx.sym.exp(conv(mx.sym.var("data"), "c1"), name="exp")      # exp: an fp32-only op
    pooled = mx.sym.Pooling(a, kernel=(2, 2), stride=(2, 2), pool_type="max", name="pool")
    sym = mx.sym.Group([conv(a, "h1", w), conv(pooled, "h2", w)])
    with pytest.raises(mx.base.MXNetError, match="uniform type"):
        amp.convert_symbol(sym, "bfloat16", data_names=["data"], cast_optional_params=True)
    pinned = bf16_fp32_exclusions(sym)
    assert pinned == ["pool"]
    converted = amp.convert_symbol(sym, "bfloat16", data_names=["data"],
                                   cast_optional_params=True, excluded_sym_names=pinned)
    _, out_types, _ = converted.infer_type(data="float32")
    assert len(out_types) == 2


# --------------------------------------------------------------------------------------------
def test_predict_exported_script_matches_predictor(exported, shapes_ckpt, shapes_dataset,
                                                   tmp_path):
    from mxmask.predictor import Predictor
    prefix, _ = exported
    val = os.path.join(shapes_dataset, "images", "val")
    image = os.path.join(val, sorted(os.listdir(val))[0])
    mine = run_script(prefix, image, tmp_path)
    theirs = Predictor(shapes_ckpt).predict_image(image)
    with open(prefix + "-meta.json") as f:         # the preset's boxes come from the masks
        assert json.load(f)["mask_box_thresh"] == preset_config("shapes").test.mask_box_thresh > 0
    assert_same_entries(mine, theirs)
    for a in mine:
        np.testing.assert_array_equal(a["bbox"], np.round(a["bbox"]))  # whole pixels


PIPELINES = [("half_up", "linear", "fused"), ("gluoncv", "cubic", "stepwise"),
             ("gluoncv", "linear", "stepwise"), ("torchvision", "bilinear_float", "stepwise"),
             ("torchvision_float32", "bilinear_float", "fused"), ("half_up", "cubic", "fused")]


@pytest.mark.parametrize("rule,interp,normalize", PIPELINES)
def test_predict_exported_script_input_equals_test_transform(exported, rule, interp, normalize):
    """The script's own copy of the test-time pipeline (it cannot import mxmask) gives the
    tensor of mxmask's TestTransform bit for bit, for each input.resize_rule / resize_interp /
    normalize, on sizes whose resize is not a clean multiple."""
    import runpy
    from mxmask.data.transforms import TestTransform, batchify_test
    script = runpy.run_path(SCRIPT)
    prefix, _ = exported
    with open(prefix + "-meta.json") as f:
        meta = json.load(f)
    meta.update(resize_rule=rule, resize_interp=interp, normalize=normalize)
    cfg = preset_config("shapes")
    cfg.input.resize_rule, cfg.input.resize_interp, cfg.input.normalize = rule, interp, normalize
    transform = TestTransform(cfg)
    rng = np.random.RandomState(5)
    for h, w in ((97, 130), (150, 113), (300, 123)):
        image = rng.randint(0, 256, (h, w, 3)).astype(np.uint8)
        data, im_info = script["prepare"](image, meta)
        chw, info = transform.apply_image(image)
        batch = batchify_test([(chw, info, 0, np.array([h, w]))], cfg.input.size_divisibility)
        assert data.dtype == np.float32 and data.shape == batch["data"].shape
        np.testing.assert_array_equal(data, batch["data"])
        np.testing.assert_array_equal(im_info, batch["im_info"])


def random_export(tmp, preset, class_names):
    """(checkpoint, export prefix) of ``preset`` with random weights at a smaller test size
    (320x533, 20 detections, score threshold 0, so that the random network detects)."""
    ckpt = str(tmp / "ckpt")
    cfg = preset_config(preset)
    cfg.input.min_size_test, cfg.input.max_size_test = 320, 533
    cfg.test.max_dets, cfg.test.score_thresh = 20, 0.0
    cfg.data.category_ids = list(range(1, len(class_names) + 1))
    cfg.data.class_names = list(class_names)
    mx.random.seed(2)
    net = build_model(cfg)
    save_config(cfg, ckpt)
    net.save_parameters(os.path.join(ckpt, "model.params"))
    prefix = str(tmp / "out" / preset)
    export_checkpoint(ckpt, prefix, size=(320, 448), check=False)
    return ckpt, prefix


def small_photo(tmp_path):
    """A 150x200 JPEG: resized to 320x427, not a multiple of the input size."""
    from PIL import Image
    rng = np.random.RandomState(3)
    small = rng.randint(0, 256, (15, 20, 3)).astype(np.uint8)
    image = str(tmp_path / "photo.jpg")
    Image.fromarray(small).resize((200, 150), Image.BILINEAR).save(image, quality=90)
    return image


@pytest.fixture(scope="module")
def gluoncv_export(tmp_path_factory):
    """The gluoncv preset: its input pipeline (resize_rule gluoncv, resize_interp cubic,
    normalize stepwise) and box_plus_one: true."""
    cfg = preset_config("gluoncv_mask_rcnn_r50_fpn")
    assert (cfg.input.resize_rule, cfg.input.resize_interp, cfg.input.normalize) == \
        ("gluoncv", "cubic", "stepwise") and cfg.model.box_plus_one
    return random_export(tmp_path_factory.mktemp("export_gluoncv"), "gluoncv_mask_rcnn_r50_fpn",
                         ["c%d" % i for i in range(1, 81)])


def test_predict_exported_script_matches_predictor_gluoncv(gluoncv_export, tmp_path):
    """The gluoncv preset end to end: the export's meta carries its input pipeline, the script
    applies it, and both write the +1-coded boxes the same way (w = x2 - x1, GluonCV's COCO
    instance evaluation), so script and ``mxmask predict`` agree on every entry."""
    from mxmask.predictor import Predictor
    ckpt, prefix = gluoncv_export
    with open(prefix + "-meta.json") as f:
        meta = json.load(f)
    assert (meta["resize_rule"], meta["resize_interp"], meta["normalize"]) == \
        ("gluoncv", "cubic", "stepwise") and meta["box_plus_one"] is True
    image = small_photo(tmp_path)
    mine = run_script(prefix, image, tmp_path)
    theirs = Predictor(ckpt).predict_image(image)
    assert_same_entries(mine, theirs)
    assert any(b["bbox"][2] > 0 for b in theirs)


def test_predict_exported_script_matches_predictor_torchvision(tmp_path_factory, tmp_path):
    """The torchvision mask preset end to end: its input pipeline, torchvision's mask paste and
    its unused label indices (class name N/A: no result) in the meta and the script, so script
    and ``mxmask predict`` agree on every entry."""
    from mxmask.convert.common import coco_names_by_id
    from mxmask.predictor import Predictor
    names = coco_names_by_id()
    names[30] = "N/A"        # id 31, which this random network detects, stands for no class too
    ckpt, prefix = random_export(tmp_path_factory.mktemp("export_torchvision"),
                                 "torchvision_mask_rcnn_r50_fpn", names)
    with open(prefix + "-meta.json") as f:
        meta = json.load(f)
    assert meta["mask_paste"] == "torchvision" and meta["resize_interp"] == "bilinear_float"
    image = small_photo(tmp_path)
    mine = run_script(prefix, image, tmp_path)
    theirs = Predictor(ckpt).predict_image(image)
    assert_same_entries(mine, theirs)
    unused = {i + 1 for i, name in enumerate(names) if name == "N/A"}
    assert not unused & {e["category_id"] for e in theirs}
    # without the rule, results would hold N/A labels
    predictor = Predictor(ckpt)
    predictor.unused_labels = []
    assert unused & {e["category_id"] for e in predictor.predict_image(image)}


def test_predict_exported_script_imports_and_errors(tmp_path):
    with open(SCRIPT) as f:
        tree = ast.parse(f.read())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module.split(".")[0])
    assert modules <= {"argparse", "json", "os", "sys", "warnings", "cv2", "mxnet", "numpy"}
    proc = subprocess.run([sys.executable, SCRIPT, str(tmp_path / "none"), "x.png"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("predict_exported: error: %s-meta.json: not found (written "
                                   "by mxmask export next to the graph)" % (tmp_path / "none"))


@pytest.mark.parametrize("preset", ["mask_rcnn_r50_fpn", "mask_rcnn_r101_fpn",
                                    "keypoint_rcnn_r50_fpn", "gluoncv_mask_rcnn_r50_fpn"])
def test_every_coco_preset_exports_and_matches_gluon(preset, tmp_path):
    """Every shipped preset exports; the imported graph equals the Gluon model at two sizes."""
    ckpt = str(tmp_path / "ckpt")
    cfg = preset_config(preset)
    cfg.test.max_dets = 20                       # keep the heads' work small in the suite
    mx.random.seed(1)
    net = build_model(cfg)
    save_config(cfg, ckpt)
    net.save_parameters(os.path.join(ckpt, "model.params"))
    prefix = str(tmp_path / "out" / preset)
    result = export_checkpoint(ckpt, prefix, size=(128, 160), check=False)
    assert [os.path.basename(f) for f in result["files"]] == \
        [preset + s for s in ("-symbol.json", "-0000.params", "-config.yaml", "-meta.json")]
    imported = import_exported(prefix)
    gluon = load_network(cfg, os.path.join(ckpt, "model.params"), [mx.cpu()])
    for h, w in ((128, 160), (160, 96)):
        rng = np.random.RandomState(h)
        data = mx.nd.array(rng.normal(0, 1, (1, 3, h, w)))
        im_info = mx.nd.array([[h, w, 1.0]])
        for name, a, b in zip(gluon.output_names, gluon(data, im_info), imported(data, im_info)):
            np.testing.assert_allclose(b.asnumpy(), a.asnumpy(), rtol=1e-5, atol=1e-5,
                                       err_msg="%s %s at %dx%d" % (preset, name, h, w))
