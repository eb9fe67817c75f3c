"""Tests of mxmask.predictor and ``mxmask predict`` with a tiny random-init shapes checkpoint:
single image, folder, images of different sizes (entries keyed by file name, RLE at the original
size, keypoints only on the keypoint category, boxes inside the image), ``--vis`` and
``--cutout`` pictures, and unreadable images among good ones.

The model is untrained; a class bias makes one shape class and the keypoint class score highest
(so both kinds of detection come out) and ``--score-thresh 0`` keeps every detection.
"""
import json
import os
import re

import mxnet as mx
import numpy as np
import pycocotools.mask as mask_util
import pytest
from PIL import Image

from mxmask import cli, ops
from mxmask.config import get_config
from mxmask.data.coco import load_coco
from mxmask.engine.checkpoint import save_checkpoint, save_config
from mxmask.modeling.rcnn import build_model
from mxmask.predictor import Predictor, list_images
from mxmask.utils import UserError

# small test-time sizes keep every forward cheap; sizes not multiples of 32 exercise the padding
SETTINGS = ["input.min_size_test=96", "input.max_size_test=160", "test.max_dets=12",
            "model.rpn.post_nms_topk_test=60",
            # the fc-only box head, as in tests/helpers/tiny.py: with the bias below its
            # random-init detections mix both kinds of classes
            "model.box_head.num_conv=0", "model.box_head.num_fc=2",
            # one pass: averaged with the mirror image's logits (the preset's test.flip, tested
            # in test_rcnn) the random-init detections came out of one class only
            "test.flip=false"]
SIZES = {"a.png": (96, 128), "b.png": (75, 140), "c.jpg": (130, 90)}      # (height, width)


@pytest.fixture(scope="module")
def ckpt(shapes_dataset, tmp_path_factory):
    """A random-init shapes checkpoint whose config carries the dataset's categories."""
    ann = os.path.join(shapes_dataset, "annotations", "train.json")
    info = load_coco(ann, os.path.join(shapes_dataset, "images", "train"))[1]
    cfg = get_config("shapes", ["model.num_classes=%d" % info.num_classes,
                                "model.num_keypoints=%d" % info.num_keypoints] + SETTINGS)
    for key, value in info.to_dict().items():
        setattr(cfg.data, key, value)
    assert cfg.data.keypoint_category_ids and cfg.data.category_ids != list(range(1, 6))
    mx.random.seed(7)
    net = build_model(cfg)
    # favour the first shape class and the keypoint class equally, so that detections of both
    # kinds (with and without keypoints) come out of the untrained model
    bias = np.zeros(info.num_classes + 1, np.float32)
    bias[1 + 0] = bias[1 + info.category_ids.index(cfg.data.keypoint_category_ids[0])] = 1.5
    net.box_predictor.cls_score.bias.set_data(mx.nd.array(bias))
    out = str(tmp_path_factory.mktemp("predictor_ckpt"))
    save_config(cfg, out)
    save_checkpoint(out, net, None, 0, 0)
    return out


@pytest.fixture(scope="module")
def predictor(ckpt):
    return Predictor(ckpt, score_thresh=0.0)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder with three images of different sizes (smooth random colours, one JPEG) and a
    non-image file that the folder expansion must ignore."""
    folder = tmp_path_factory.mktemp("predict_images")
    rng = np.random.RandomState(0)
    for name, (h, w) in SIZES.items():
        small = rng.randint(0, 256, (max(h // 8, 2), max(w // 8, 2), 3)).astype(np.uint8)
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(str(folder / name))
    (folder / "notes.txt").write_text("not an image")
    return str(folder)


def check_entries(entries, name, size, cfg):
    """Entries of one image: keyed by file name, known categories, RLE at the original size,
    keypoints exactly on the keypoint category, boxes inside the image."""
    h, w = size
    cats = set(cfg.data.category_ids)
    kp_cats = set(cfg.data.keypoint_category_ids)
    K = len(cfg.data.keypoint_names)
    assert entries, name
    for e in entries:
        assert e["file_name"] == name and "image_id" not in e
        assert e["category_id"] in cats
        assert 0.0 <= e["score"] <= 1.0
        x, y, bw, bh = e["bbox"]
        assert bw >= 0 and bh >= 0
        assert -1e-3 <= x and x + bw <= w + 1e-3 and -1e-3 <= y and y + bh <= h + 1e-3
        assert e["segmentation"]["size"] == [h, w]
        assert mask_util.decode(e["segmentation"]).shape == (h, w)
        if e["category_id"] in kp_cats:
            kp = np.array(e["keypoints"]).reshape(K, 3)
            assert (kp[:, 2] == 2).all()
            # COCO pixel indices of points inside the box (continuous x - 0.5)
            assert (kp[:, 0] >= x - 0.5 - 1e-3).all() and (kp[:, 0] <= x + bw - 0.5 + 1e-3).all()
        else:
            assert "keypoints" not in e
    scores = [e["score"] for e in entries]
    assert scores == sorted(scores, reverse=True)


# --------------------------------------------------------------------------------------------
def test_predict_image_and_array(predictor, images):
    path = os.path.join(images, "a.png")
    entries = predictor.predict_image(path)
    check_entries(entries, "a.png", SIZES["a.png"], predictor.cfg)
    assert len(entries) == predictor.cfg.test.max_dets
    found = {e["category_id"] for e in entries}
    assert found & set(predictor.cfg.data.keypoint_category_ids)      # both kinds present
    assert found - set(predictor.cfg.data.keypoint_category_ids)
    image = np.asarray(Image.open(path).convert("RGB"))
    again = predictor.predict_array(image, image_id=42)
    assert [e["image_id"] for e in again] == [42] * len(again)
    assert [e["bbox"] for e in again] == [e["bbox"] for e in entries]
    assert [e["segmentation"] for e in again] == [e["segmentation"] for e in entries]


def test_score_thresh_filters(ckpt, images):
    path = os.path.join(images, "a.png")
    everything = Predictor(ckpt, score_thresh=0.0).predict_image(path)
    cut = sorted(e["score"] for e in everything)[len(everything) // 2]
    kept = Predictor(ckpt, score_thresh=cut).predict_image(path)
    assert 0 < len(kept) < len(everything)
    assert all(e["score"] >= cut for e in kept)


def test_predict_paths_folder_of_different_sizes(predictor, images):
    results, failures = predictor.predict_paths([images])
    assert failures == []
    assert list_images([images]) == [os.path.join(images, n) for n in sorted(SIZES)]
    by_name = {}
    for e in results:
        by_name.setdefault(e["file_name"], []).append(e)
    assert set(by_name) == set(SIZES)
    for name, entries in by_name.items():
        check_entries(entries, name, SIZES[name], predictor.cfg)
    # the portrait image's masks really are pasted at its own size
    tall = [e for e in by_name["c.jpg"] if mask_util.area(e["segmentation"]) > 0]
    assert tall


def test_cli_predict_single_image_vis_and_cutouts(ckpt, predictor, images, tmp_path, capsys):
    path = os.path.join(images, "b.png")
    out = str(tmp_path / "results.json")
    vis, cut = str(tmp_path / "vis"), str(tmp_path / "cut")
    code = cli.main(["predict", ckpt, path, "--out", out, "--vis", vis, "--cutout", cut,
                     "--score-thresh", "0"])
    assert code == 0
    assert "b.png: 12 detections" in capsys.readouterr().out
    with open(out) as f:
        results = json.load(f)
    check_entries(results, "b.png", SIZES["b.png"], predictor.cfg)
    assert [e["bbox"] for e in results] == [e["bbox"] for e in predictor.predict_image(path)]

    h, w = SIZES["b.png"]
    drawn = Image.open(os.path.join(vis, "b.png"))
    assert drawn.size == (w, h)
    drawn = np.asarray(drawn.convert("RGB")).astype(int)
    original = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert drawn.std() > 5 and np.abs(drawn - original).mean() > 1     # something was drawn

    cutouts = sorted(os.listdir(cut))
    assert len(cutouts) == len(results)
    alpha_seen = False
    for i, name in enumerate(cutouts):
        assert name.startswith("b_%03d_c" % i) and name.endswith(".png")
        im = Image.open(os.path.join(cut, name))
        assert im.mode == "RGBA"
        x, y, bw, bh = results[i]["bbox"]
        cw = min(int(np.ceil(x + bw)), w) - max(int(np.floor(x)), 0)
        ch = min(int(np.ceil(y + bh)), h) - max(int(np.floor(y)), 0)
        assert im.size == (cw, ch)
        rgba = np.asarray(im)
        assert rgba[:, :, :3].std() > 0
        alpha_seen |= bool(rgba[:, :, 3].max() == 255)
        # alpha is the pasted mask cropped to the box
        mask = mask_util.decode(results[i]["segmentation"])
        x0, y0 = max(int(np.floor(x)), 0), max(int(np.floor(y)), 0)
        np.testing.assert_array_equal(rgba[:, :, 3], mask[y0:y0 + ch, x0:x0 + cw] * 255)
    assert alpha_seen


def test_cli_unreadable_image_is_skipped_and_reported(ckpt, images, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("a.png", "c.jpg"):
        with open(os.path.join(images, name), "rb") as src:
            (folder / name).write_bytes(src.read())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    missing = str(tmp_path / "missing.jpg")
    out = str(tmp_path / "results.json")
    code = cli.main(["predict", ckpt, str(folder), missing, "--out", out, "--score-thresh", "0"])
    captured = capsys.readouterr()
    assert code == 1
    err = captured.err.strip().splitlines()
    broken = str(folder / "broken.png")
    skipped = [line for line in err if line.startswith("mxmask: skipped")]
    assert len(skipped) == 2
    assert any(broken in line for line in skipped) and any(missing in line for line in skipped)
    assert err[-1].startswith("mxmask: error: 2 of 4 images could not be read")
    assert broken in err[-1] and missing in err[-1]
    assert len(err) == 3
    # the good images were processed and written
    assert "a.png: 12 detections" in captured.out and "c.jpg: 12 detections" in captured.out
    with open(out) as f:
        results = json.load(f)
    assert {e["file_name"] for e in results} == {"a.png", "c.jpg"}


def test_cli_predict_without_images_is_exit_2(ckpt, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["predict", ckpt, str(empty), "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(empty) in err[0]


def test_predictor_refuses_a_config_without_category_ids(ckpt, tmp_path):
    from mxmask.config import load_yaml
    cfg = load_yaml(os.path.join(ckpt, "config.yaml"))
    cfg.data.category_ids = []
    with pytest.raises(UserError, match="data.category_ids"):
        Predictor(ckpt, cfg=cfg)


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_predictor_refuses_a_mask_box_thresh_outside_0_1(ckpt, value):
    from mxmask.config import load_yaml
    cfg = load_yaml(os.path.join(ckpt, "config.yaml"))
    cfg.test.mask_box_thresh = value
    with pytest.raises(UserError, match=r"test.mask_box_thresh: expected a probability in \[0, 1\)"):
        Predictor(ckpt, cfg=cfg)


# --------------------------------------------------------------------------------------------
# the exported graph's variants (mxmask export --fuse --dtype) as predictors
# --------------------------------------------------------------------------------------------
def test_fused_predictor_gives_the_plain_results(ckpt, predictor, images):
    """MKLDNN fusion of fp32 (export's stated tolerance: scores 1e-4, boxes 1e-2 px); the graph
    was traced on one size and runs on images of other sizes."""
    fused = Predictor(ckpt, score_thresh=0.0, fuse=True)
    assert type(fused.net).__name__ == "SymbolBlock"
    for name in sorted(SIZES):
        path = os.path.join(images, name)
        plain, got = predictor.predict_image(path), fused.predict_image(path)
        check_entries(got, name, SIZES[name], fused.cfg)
        assert len(got) == len(plain)
        for a, b in zip(plain, got):
            assert a["category_id"] == b["category_id"]
            assert abs(a["score"] - b["score"]) < 1e-4
            np.testing.assert_allclose(a["bbox"], b["bbox"], atol=1e-2)


def test_bfloat16_predictor_runs_the_bf16_graph(ckpt, predictor, images):
    bf16 = Predictor(ckpt, score_thresh=0.0, fuse=True, dtype="bfloat16")
    dtypes = [str(np.dtype(p.dtype)) for p in bf16.net.collect_params().values()]
    assert "[('bfloat16', '<u2')]" in dtypes          # weights cast for the bf16 layers
    path = os.path.join(images, "a.png")
    plain, got = predictor.predict_image(path), bf16.predict_image(path)
    check_entries(got, "a.png", SIZES["a.png"], bf16.cfg)
    assert len(got) == len(plain)
    # bf16 keeps 8 bits of mantissa: the same top detection, its score within 2%
    assert got[0]["category_id"] == plain[0]["category_id"]
    assert abs(got[0]["score"] - plain[0]["score"]) < 0.02 * plain[0]["score"]


def test_optimized_graphs_need_one_cpu_context(ckpt, images, capsys):
    with pytest.raises(UserError, match="one CPU context"):
        Predictor(ckpt, ctx=[mx.cpu(0), mx.cpu(1)], fuse=True)
    code = cli.main(["predict", ckpt, os.path.join(images, "a.png"), "--ctx", "cpu:2",
                     "--dtype", "bfloat16", "--fuse"])
    assert code == 2
    assert "one CPU context" in capsys.readouterr().err


def test_predictor_runs_the_compiled_kernels_with_the_stock_results(ckpt, predictor, images):
    """On CPUs the in-process network pools with mxmask's compiled RoIAlign from the compiled
    channels-last level canvas and runs its compiled NMS (mxmask.ops), which repeat the stock
    canvas, contrib.ROIAlign's arithmetic and contrib.box_nms's rows: the same entries,
    exactly, as the network with MXNet's operators, whose graph is also what export writes."""
    if not ops.load_ops():
        pytest.skip("the compiled operators could not be built here")
    from mxmask.graph import network_symbol
    stock = Predictor(ckpt, score_thresh=0.0)
    assert predictor.net.kernels == "mxmask" and stock.net.use_kernels("mxnet") == "mxnet"
    for name in sorted(SIZES):
        path = os.path.join(images, name)
        assert predictor.predict_image(path) == stock.predict_image(path), name
    compiled = predictor.net._cached_graph[1].tojson()
    assert '"mxmask_roi_align"' in compiled and '"_contrib_ROIAlign"' not in compiled
    assert '"mxmask_box_nms"' in compiled and '"_contrib_box_nms"' not in compiled
    assert '"mxmask_group_norm"' not in compiled          # GroupNorm stays MXNet's
    # every head pools from one channels-last canvas, built once
    assert compiled.count('"mxmask_level_canvas"') == 1
    assert not re.search(r'"name": "[^"]*multilevelroialign\d+_pad\d+"', compiled)
    for graph in (stock.net._cached_graph[1].tojson(), network_symbol(predictor.net).tojson()):
        assert '"mxmask_roi_align"' not in graph and '"_contrib_ROIAlign"' in graph
        assert '"mxmask_box_nms"' not in graph and '"_contrib_box_nms"' in graph
        assert '"mxmask_level_canvas"' not in graph
        assert re.search(r'"name": "[^"]*multilevelroialign\d+_pad\d+"', graph)
    assert predictor.net.kernels == "mxmask"        # network_symbol leaves the choice as it was
