"""Tests of mxmask.modeling.anchors.AnchorGenerator: (1, H*W*A, 4) xyxy anchors, (h, w, a) order.

Detectron2 style against hand-computed values; GluonCV style against GluonCV's own
RPNAnchorGenerator with the arguments of mask_rcnn_fpn_resnet50_v1b_coco.
"""
import math

import numpy as np
import mxnet as mx
import pytest

from mxmask.modeling.anchors import AnchorGenerator

nd = mx.nd


def _anchors(gen, h, w, hybridize=False):
    gen.initialize()
    if hybridize:
        gen.hybridize()
    return gen(nd.zeros((2, 3, h, w))).asnumpy()


def test_detectron2_hand_values():
    gen = AnchorGenerator(16, 32, (0.5, 1.0, 2.0))
    a = _anchors(gen, 2, 3)
    assert a.shape == (1, 2 * 3 * 3, 4)
    s = math.sqrt(32 * 32 / 0.5)                       # ratio 0.5: w = 45.25, h = 22.63
    np.testing.assert_allclose(a[0, 0], [-s / 2, -s * 0.25, s / 2, s * 0.25], rtol=1e-6)
    np.testing.assert_allclose(a[0, 1], [-16, -16, 16, 16], rtol=1e-6)
    np.testing.assert_allclose(a[0, 2], [-s * 0.25, -s / 2, s * 0.25, s / 2], rtol=1e-6)
    # (h, w, a) row-major: row (i*W + j)*A + a is centred at (j*16, i*16)
    for i in range(2):
        for j in range(3):
            for k in range(3):
                box = a[0, (i * 3 + j) * 3 + k]
                np.testing.assert_allclose([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2],
                                           [j * 16, i * 16], atol=1e-5)
                np.testing.assert_allclose(box, a[0, k] + [j * 16, i * 16, j * 16, i * 16],
                                           atol=1e-5)
    # height / width is the aspect ratio and the area is size^2
    w, h = a[0, :3, 2] - a[0, :3, 0], a[0, :3, 3] - a[0, :3, 1]
    np.testing.assert_allclose(h / w, [0.5, 1.0, 2.0], rtol=1e-6)
    np.testing.assert_allclose(w * h, [1024.0] * 3, rtol=1e-5)


def test_detectron2_offset_and_several_sizes():
    gen = AnchorGenerator(8, (16, 32), (1.0,), offset=0.5)
    a = _anchors(gen, 1, 2)
    # sizes outer, ratios inner: cell (0,0) centred at (4, 4)
    np.testing.assert_allclose(a[0], [[-4, -4, 12, 12], [-12, -12, 20, 20],
                                      [4, -4, 20, 12], [-4, -12, 28, 20]], atol=1e-6)
    assert gen.num_anchors == 2


def test_gluoncv_hand_values():
    # stride 16, size 128, ratio 1: base box (0,0,15,15), centre 7.5, width 16*8 = 128, "+1" size
    gen = AnchorGenerator(16, 128, (1.0,), style="gluoncv")
    a = _anchors(gen, 1, 2)
    np.testing.assert_array_equal(a[0], [[-56, -56, 71, 71], [-40, -56, 87, 71]])
    # stride 4, ratio 0.5: ws = round(sqrt(32)) = 6, hs = round(3) = 3, scaled by 32/4 = 8
    gen = AnchorGenerator(4, 32, (0.5,), style="gluoncv")
    np.testing.assert_array_equal(_anchors(gen, 1, 1)[0], [[-22, -10, 25, 13]])


@pytest.mark.parametrize("hybridize", [False, True])
def test_gluoncv_style_equals_gluoncv_rpn_anchor_generator(hybridize):
    """mask_rcnn_fpn_resnet50_v1b_coco: strides (4..64), base_size 16, scales (2..32),
    ratios (0.5, 1, 2), alloc_size (384, 384) halved per level (min 16)."""
    import warnings
    from gluoncv.model_zoo.rcnn.rpn.anchor import RPNAnchorGenerator
    alloc = 384
    for stride, scale in zip((4, 8, 16, 32, 64), (2, 4, 8, 16, 32)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # np.float deprecation inside GluonCV
            ref_gen = RPNAnchorGenerator(stride, 16, (0.5, 1, 2), scale, (alloc, alloc))
        ref_gen.initialize()
        gen = AnchorGenerator(stride, 16 * scale, (0.5, 1.0, 2.0), style="gluoncv", max_size=1600)
        gen.initialize()
        if hybridize:
            gen.hybridize()
        for h, w in [(1, 1), (3, 5), (13, 21), (24, 17)]:
            if max(h, w) > alloc:
                continue
            x = nd.zeros((1, 4, h, w))
            ref = ref_gen(x).asnumpy()
            out = gen(x).asnumpy()
            assert out.shape == ref.shape == (1, h * w * 3, 4)
            np.testing.assert_array_equal(out, ref)
        alloc = max(alloc // 2, 16)


@pytest.mark.parametrize("style", ["detectron2", "gluoncv"])
def test_hybridized_equals_imperative_and_max_size(style):
    gen = AnchorGenerator(32, 256, (0.5, 1.0, 2.0), style=style, max_size=1344)
    gen.initialize()
    big = nd.zeros((1, 1, 42, 42))                   # ceil(1344 / 32) = 42 cells: covered
    imp = gen(big).asnumpy()
    gen.hybridize()
    hyb = gen(big).asnumpy()
    np.testing.assert_array_equal(imp, hyb)
    np.testing.assert_array_equal(gen(nd.zeros((1, 1, 7, 9))).asnumpy(),
                                  imp.reshape(42, 42, 3, 4)[:7, :9].reshape(1, -1, 4))
    with pytest.raises(mx.base.MXNetError):
        gen(nd.zeros((1, 1, 43, 10))).wait_to_read()


def test_anchors_are_a_saved_constant(tmp_path):
    gen = AnchorGenerator(16, 64, (1.0,), prefix="ag_")
    gen.initialize()
    params = gen.collect_params()
    assert list(params.keys()) == ["ag_anchors"]
    assert params["ag_anchors"].grad_req == "null"
    path = str(tmp_path / "a.params")
    gen.save_parameters(path)
    other = AnchorGenerator(16, 64, (1.0,), prefix="ag_")
    other.load_parameters(path)
    x = nd.zeros((1, 1, 5, 6))
    np.testing.assert_array_equal(other(x).asnumpy(), gen(x).asnumpy())


def test_bad_arguments():
    with pytest.raises(ValueError):
        AnchorGenerator(16, 32, style="gluoncv", offset=0.5)
    with pytest.raises(ValueError):
        AnchorGenerator(16, 32, style="yolo")


# ------------------------------------------------------------------------------------------
# torchvision style: AnchorGenerator's rounded base anchors and its inferred strides
def np_torchvision_anchors(size, ratios, image_hw, feature_hw):
    """torchvision's AnchorGenerator for one level, written out in numpy (float32 cells,
    rounded half to even; stride = padded image size // feature size per axis)."""
    h_ratios = np.sqrt(np.array(ratios, np.float32))
    ws = (np.float32(1) / h_ratios) * np.float32(size)
    hs = h_ratios * np.float32(size)
    cell = np.round(np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2))
    sy, sx = image_hw[0] // feature_hw[0], image_hw[1] // feature_hw[1]
    ys, xs = np.meshgrid(np.arange(feature_hw[0]) * sy, np.arange(feature_hw[1]) * sx,
                         indexing="ij")
    shifts = np.stack([xs, ys, xs, ys], axis=-1).reshape(-1, 1, 4)
    return (shifts + cell[None]).reshape(-1, 4)


def test_torchvision_hand_values():
    a = _anchors(AnchorGenerator(4, 32, (0.5, 1.0, 2.0), style="torchvision"), 2, 2)
    # 32 / sqrt(.5) / 2 = 22.63 -> 23 and 32 * sqrt(.5) / 2 = 11.31 -> 11
    np.testing.assert_array_equal(a[0, :3], [[-23, -11, 23, 11], [-16, -16, 16, 16],
                                             [-11, -23, 11, 23]])
    np.testing.assert_array_equal(a[0, 3], [-19, -11, 27, 11])          # next column: +4 in x


@pytest.mark.parametrize("image_hw", [(800, 1344), (480, 640), (1344, 800), (64, 64)])
@pytest.mark.parametrize("hybridize", [False, True])
def test_torchvision_runtime_stride(image_hw, hybridize):
    """P6 of a padded input whose side / 32 is odd has fewer than side / 64 cells: torchvision's
    stride is then side // cells (61 for 800), and so is mxmask's."""
    H, W = image_hw
    feature_hw = (-(-H // 64), -(-W // 64))                 # P6: max-pool 1x1/2 of P5
    gen = AnchorGenerator(64, 512, (0.5, 1.0, 2.0), style="torchvision", runtime_stride=True,
                          reference_stride=4)
    gen.initialize()
    if hybridize:
        gen.hybridize()
    got = gen(nd.zeros((1, 2) + feature_hw), nd.zeros((1, 2, H // 4, W // 4))).asnumpy()[0]
    np.testing.assert_array_equal(got, np_torchvision_anchors(512, (0.5, 1.0, 2.0), image_hw,
                                                              feature_hw))
    # where the stride is exact, the result is the stored table
    exact = AnchorGenerator(64, 512, (0.5, 1.0, 2.0), style="torchvision")
    if H % 64 == 0 and W % 64 == 0:
        np.testing.assert_array_equal(got, _anchors(exact, *feature_hw)[0])


def test_torchvision_style_takes_no_offset():
    with pytest.raises(ValueError, match="offset"):
        AnchorGenerator(16, 32, style="torchvision", offset=0.5)
