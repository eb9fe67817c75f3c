"""The torchvision presets against torchvision's own networks, on the same weights.

torchvision's ``maskrcnn_resnet50_fpn`` and ``keypointrcnn_resnet50_fpn`` are built with seeded
random weights, random FrozenBatchNorm statistics and prediction layers scaled so that scores
spread out (``mxmask/convert/torchvision_reference.py build``), saved with ``torch.save``, and
converted by ``mxmask convert torchvision``. Both networks then see the same normalised tensor
(480x640: its padded height is an odd multiple of 32, so torchvision's inferred P6 stride, 60,
is exercised), and ``mxmask predict`` and torchvision's own transform see the same image file.

torch never enters this process: the torch side runs in the interpreter named by
``MXMASK_TORCH_PYTHON`` (``dev/check_torchvision.sh`` makes one and runs these tests). Without
it every test here skips with that reason; CI has no torch.

Tolerances (issue 23): FPN features 1e-4 relative to the level's largest value; the top-100
detections: labels equal, scores 1e-4, boxes 0.01 px; mask probabilities 1e-3 on the 28x28 grid;
keypoints 0.1 px after decoding. Through an image file the same, except the pasted masks, which
the two frameworks paste differently (Detectron2's aligned bilinear paste here, torchvision's
paste into the box rounded to whole pixels there; see test_predict_on_an_image_file).
"""
import json

import mxnet as mx
import numpy as np
import pytest
from PIL import Image

from mxmask import cli
from mxmask.config import load_yaml
from mxmask.data.transforms import TestTransform
from mxmask.postprocess import decode_keypoints
from mxmask.predictor import load_network
from helpers.torchvision_side import needs_torch, smooth_image, torch_side

ARCHS = ("maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn")
H, W = 480, 640

pytestmark = needs_torch


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tmp_path_factory):
    """torchvision's randomised network (its weights file and its outputs on one tensor) and
    the converted mxmask network."""
    arch = request.param
    tmp = tmp_path_factory.mktemp(arch)
    pth, ckpt = tmp / "weights.pth", tmp / "ckpt"
    torch_side("build", "--arch", arch, "--seed", 0, "--out", pth)
    assert cli.main(["convert", "torchvision", str(pth), "--out", str(ckpt)]) == 0
    cfg = load_yaml(str(ckpt / "config.yaml"))
    mean = np.array(cfg.input.pixel_mean)
    std = np.array(cfg.input.pixel_std)
    x = ((smooth_image(H, W) - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)
    np.save(tmp / "x.npy", x)
    torch_side("run", "--arch", arch, "--weights", pth, "--input", tmp / "x.npy",
               "--image-size", H, W, "--out", tmp / "ref.npz")
    net = load_network(cfg, str(ckpt / "model.params"), [mx.cpu()])
    outputs = net(mx.nd.array(x), mx.nd.array([[H, W, 1.0]]))
    ours = {name: o.asnumpy()[0] for name, o in zip(net.output_names, outputs)}
    return dict(arch=arch, tmp=tmp, pth=pth, ckpt=ckpt, cfg=cfg, net=net, x=x, ours=ours,
                ref=dict(np.load(tmp / "ref.npz")))


def test_fpn_features(pair):
    features = pair["net"].backbone(mx.nd.array(pair["x"]))
    for level, ours in zip(range(2, 7), features):
        ref = pair["ref"]["p%d" % level]
        assert ours.shape == ref.shape
        assert np.abs(ours.asnumpy() - ref).max() <= 1e-4 * np.abs(ref).max(), level


def matched_detections(pair):
    """Our valid rows and torchvision's, which must be the same number (at most 100)."""
    ours, ref = pair["ours"], pair["ref"]
    n = int((ours["ids"] >= 0).sum())
    assert n == len(ref["scores"]) and n > 50, (n, len(ref["scores"]))
    return ours, ref, n


def test_top_100_detections(pair):
    ours, ref, n = matched_detections(pair)
    # mxmask label l is torchvision's index l + 1 (the background is index 0 there)
    np.testing.assert_array_equal(ours["ids"][:n].astype(np.int64) + 1, ref["labels"])
    np.testing.assert_allclose(ours["scores"][:n], ref["scores"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(ours["boxes"][:n], ref["boxes"], rtol=0, atol=0.01)
    # the scores spread: the comparison is not one of near-equal numbers
    assert ref["scores"].max() - ref["scores"].min() > 0.05


def test_masks_or_keypoints(pair):
    ours, ref, n = matched_detections(pair)
    if "masks" in ours:
        np.testing.assert_allclose(ours["masks"][:n], ref["mask_probs"], rtol=0, atol=1e-3)
        assert np.ptp(ref["mask_probs"]) > 0.5             # probabilities that differ
    else:
        np.testing.assert_allclose(ours["heatmaps"][:n], ref["keypoint_logits"], rtol=0,
                                   atol=1e-3 * np.abs(ref["keypoint_logits"]).max())
        boxes = ours["boxes"][:n]
        kpts = decode_keypoints(ours["heatmaps"][:n], boxes, "torchvision",
                                network_boxes=boxes)
        np.testing.assert_allclose(kpts[..., :2], ref["keypoints"][..., :2], rtol=0, atol=0.1)


def test_predict_on_an_image_file(pair, tmp_path):
    """``mxmask predict`` on a 500x375 PNG against torchvision's transform, network and paste.

    The input tensors agree to 1e-5: both resize the normalised float image bilinearly at the same
    size (mxmask's numpy arithmetic and torch's kernel differ in the last bits). The detections
    then agree as on equal tensors (labels, scores 1e-4), boxes to 0.01 px in the image. Labels
    that torchvision names N/A (its unused COCO ids) are left out of mxmask's results. Masks, both
    pasted by torchvision's rule: at most 0.1% of a mask's pixels differ, for probabilities
    within 1e-3 of 0.5 that round either way. Keypoints to 0.1 px, in COCO's pixel indices as
    torchvision writes them."""
    arch, cfg, tmp = pair["arch"], pair["cfg"], pair["tmp"]
    image = (smooth_image(375, 500, seed=1) * 255).round().astype(np.uint8)
    path = tmp_path / "image.png"
    Image.fromarray(image).save(path)
    torch_side("predict", "--arch", arch, "--weights", pair["pth"], "--image", path,
               "--out", tmp_path / "ref.npz")
    ref = dict(np.load(tmp_path / "ref.npz"))

    data, im_info = TestTransform(cfg).apply_image(image)
    assert tuple(ref["image_size"]) == tuple(int(v) for v in im_info[:2])
    h, w = data.shape[1:]
    np.testing.assert_allclose(data, ref["input"][0, :, :h, :w], rtol=0, atol=1e-5)

    results = tmp_path / "results.json"
    assert cli.main(["predict", str(pair["ckpt"]), str(path), "--out", str(results),
                     "--score-thresh", "0"]) == 0
    entries = sorted(json.loads(results.read_text()), key=lambda e: -e["score"])
    unused = [cid for cid, name in zip(cfg.data.category_ids, cfg.data.class_names)
              if name == "N/A"]
    kept = ~np.isin(ref["labels"], unused)
    assert len(entries) == kept.sum() > 50
    ref = {k: v[kept] for k, v in ref.items() if k not in ("input", "image_size")}
    np.testing.assert_array_equal([e["category_id"] for e in entries], ref["labels"])
    np.testing.assert_allclose([e["score"] for e in entries], ref["scores"], rtol=0, atol=1e-4)
    xywh = np.array([e["bbox"] for e in entries])
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    np.testing.assert_allclose(boxes, ref["boxes"], rtol=0, atol=0.01)
    if "masks" in ref:
        import pycocotools.mask as mask_util
        ours = mask_util.decode([e["segmentation"] for e in entries]).transpose(2, 0, 1) > 0
        theirs = ref["masks"] > 0.5
        differ = (ours != theirs).reshape(len(ours), -1).sum(axis=1)
        assert (differ <= 0.001 * np.maximum(theirs.reshape(len(ours), -1).sum(axis=1), 1)).all()
        assert theirs.any(axis=(1, 2)).mean() > 0.5
    else:
        kpts = np.array([e["keypoints"] for e in entries]).reshape(len(entries), -1, 3)
        np.testing.assert_allclose(kpts[..., :2], ref["keypoints"][..., :2], rtol=0, atol=0.1)
