"""``mxmask convert torchvision`` and its torch-free reader of ``torch.save`` files.

No torch here (CI has none). Two fixtures stand in for it:

- ``tests/data/tiny_state_dict.pth``: a real torch-written file (torch 2.x, zip format), made
  with /work/tv/bin/python (torch 2.14.1) running::

      import collections, torch
      base = torch.arange(12, dtype=torch.float32)
      sd = collections.OrderedDict()
      sd["contiguous"] = torch.arange(6, dtype=torch.float32).reshape(2, 3)
      sd["transposed"] = sd["contiguous"].t()          # a non-contiguous view of the same storage
      sd["offset"] = base[3:9].reshape(2, 3)           # storage offset 3
      sd["strided"] = base[1::4]                       # offset 1, stride 4, same 12-element storage
      sd["float16"] = torch.tensor([0.5, -1.25, 65504.0], dtype=torch.float16)
      sd["bfloat16"] = torch.tensor([1.0, -2.5, 3.140625], dtype=torch.bfloat16)
      sd["float64"] = torch.tensor([1e300, -0.1], dtype=torch.float64)
      sd["int64"] = torch.tensor([-(2 ** 40), 7])
      sd["int32"] = torch.tensor([[1, -2], [3, 4]], dtype=torch.int32)
      sd["uint8"] = torch.arange(250, 256, dtype=torch.uint8)
      sd["bool"] = torch.tensor([True, False, True])
      sd["scalar"] = torch.tensor(2.5)
      sd["empty"] = torch.zeros(0, 4)
      sd["num_batches_tracked"] = torch.tensor(5)
      sd._metadata = collections.OrderedDict([("", {"version": 1})])   # as Module.state_dict()
      torch.save(sd, "tiny_state_dict.pth")

  The reader is tested on torch's real bytes, and ``tests/helpers/torch_files.py`` (which writes
  the other test files) must reproduce its ``data.pkl`` byte for byte.
- ``tests/data/torchvision_keys.json``: the state_dict keys and shapes of torchvision 0.29.1's
  ``maskrcnn_resnet50_fpn`` and ``keypointrcnn_resnet50_fpn`` (today's key names; the
  ``num_batches_tracked`` buffers of an untrained build left out, as in the published files),
  ``_COCO_CATEGORIES`` and ``_COCO_PERSON_KEYPOINT_NAMES``, dumped once with torchvision.
  :func:`_old_names` turns them into the published v1 files' names (the inverse of the
  ``_load_from_state_dict`` upgrades of torchvision's FPN, RPNHead and MaskRCNNHeads).

The fake state dicts are views of one arange storage, tensor ``i`` starting at element ``i``:
every tensor's values are distinct and known, and a full-size file is ~51 MB.
"""
import collections
import importlib.abc
import json
import os
import re
import sys
import zipfile

import mxnet as mx
import numpy as np
import pytest

from helpers import torch_files as tw
from mxmask import cli
from mxmask.config import load_yaml
from mxmask.convert.torch_file import load_state_dict
from mxmask.convert.torchvision import (KEYPOINT, MASK, convert_torchvision,
                                        convert_torchvision_params, converted_config)
from mxmask.modeling.rcnn import build_model
from mxmask.utils import UserError

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
TINY = os.path.join(DATA, "tiny_state_dict.pth")
with open(os.path.join(DATA, "torchvision_keys.json")) as _f:
    KEYS = json.load(_f)


def _old_names(key):
    """Today's torchvision key -> the name in the published v1 weight files."""
    key = re.sub(r"^backbone\.fpn\.(inner_blocks|layer_blocks)\.(\d+)\.0\.", r"backbone.fpn.\1.\2.",
                 key)
    key = key.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
    return re.sub(r"^roi_heads\.mask_head\.(\d+)\.0\.",
                  lambda m: "roi_heads.mask_head.mask_fcn%d." % (int(m.group(1)) + 1), key)


def _spec(arch, old=False):
    """[(key, shape)] of ``arch`` with today's or the v1 key names."""
    return [(_old_names(k) if old else k, tuple(s)) for k, s in KEYS[arch]]


def _big_storage(spec):
    numel = max(int(np.prod(s)) for _, s in spec) + len(spec)
    return np.arange(numel, dtype=np.float32)


def _fake_arrays(spec):
    """{key: numpy view} with tensor i = big[i : i + numel] (distinct, known values)."""
    big = _big_storage(spec)
    return collections.OrderedDict(
        (k, big[i:i + int(np.prod(s))].reshape(s)) for i, (k, s) in enumerate(spec))


def _fake_views(spec, storage):
    """The same tensors as helpers.torch_files Views of one storage (for a file)."""
    out = collections.OrderedDict()
    for i, (key, shape) in enumerate(spec):
        stride, step = [], 1
        for n in reversed(shape):
            stride.insert(0, step)
            step *= n
        out[key] = tw.View(storage, i, shape, stride)
    return out


@pytest.fixture(scope="module")
def nets():
    """One network per arch (the converted presets), filled by the tests in turn."""
    return {arch: build_model(converted_config(arch)) for arch in (MASK, KEYPOINT)}


def _value(net, name):
    return net._collect_params_with_prefix()[name].data().asnumpy()


# --------------------------------------------------------------------------------------------
# the reader
# --------------------------------------------------------------------------------------------
TINY_EXPECTED = collections.OrderedDict([
    ("contiguous", np.arange(6, dtype=np.float32).reshape(2, 3)),
    ("transposed", np.arange(6, dtype=np.float32).reshape(2, 3).T),
    ("offset", np.arange(3, 9, dtype=np.float32).reshape(2, 3)),
    ("strided", np.array([1, 5, 9], np.float32)),
    ("float16", np.array([0.5, -1.25, 65504.0], np.float16)),
    ("bfloat16", np.array([1.0, -2.5, 3.140625], np.float32)),
    ("float64", np.array([1e300, -0.1])),
    ("int64", np.array([-(2 ** 40), 7], np.int64)),
    ("int32", np.array([[1, -2], [3, 4]], np.int32)),
    ("uint8", np.arange(250, 256, dtype=np.uint8)),
    ("bool", np.array([True, False, True])),
    ("scalar", np.array(2.5, np.float32)),
    ("empty", np.zeros((0, 4), np.float32)),
    ("num_batches_tracked", np.array(5, np.int64)),
])


def _tiny_for_writer():
    """The tiny fixture's state dict in helpers.torch_files terms (same storages and views)."""
    base = tw.Storage(np.arange(12, dtype=np.float32))
    six = tw.Storage(np.arange(6, dtype=np.float32))
    bf16 = (np.array([1.0, -2.5, 3.140625], np.float32).view(np.uint32) >> 16).astype(np.uint16)
    sd = collections.OrderedDict([
        ("contiguous", tw.View(six, 0, (2, 3), (3, 1))),
        ("transposed", tw.View(six, 0, (3, 2), (1, 3))),
        ("offset", tw.View(base, 3, (2, 3), (3, 1))),
        ("strided", tw.View(base, 1, (3,), (4,))),
        ("float16", np.array([0.5, -1.25, 65504.0], np.float16)),
        ("bfloat16", tw.View(tw.Storage(bf16, "BFloat16Storage"), 0, (3,), (1,))),
        ("float64", np.array([1e300, -0.1])),
        ("int64", np.array([-(2 ** 40), 7], np.int64)),
        ("int32", np.array([[1, -2], [3, 4]], np.int32)),
        ("uint8", np.arange(250, 256, dtype=np.uint8)),
        ("bool", np.array([True, False, True])),
        ("scalar", np.array(2.5, np.float32)),
        ("empty", np.zeros((0, 4), np.float32)),
        ("num_batches_tracked", np.array(5, np.int64)),
    ])
    sd._metadata = collections.OrderedDict([("", {"version": 1})])
    return sd


def _check_tiny(arrays):
    assert list(arrays) == list(TINY_EXPECTED)
    for name, want in TINY_EXPECTED.items():
        got = arrays[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert got.flags["C_CONTIGUOUS"] and got.flags["WRITEABLE"], name
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_reads_torchs_own_bytes():
    arrays, wrapper = load_state_dict(TINY)
    assert wrapper is None
    _check_tiny(arrays)


def test_writer_reproduces_torch_save(tmp_path):
    """The test writer's pickle and records equal torch's (the serialization id is random)."""
    path = str(tmp_path / "tiny_state_dict.pth")
    tw.save(_tiny_for_writer(), path)
    with zipfile.ZipFile(TINY) as real, zipfile.ZipFile(path) as mine:
        assert [i.filename for i in mine.infolist()] == [i.filename for i in real.infolist()]
        for name in real.namelist():
            if not name.endswith("serialization_id"):
                assert mine.read(name) == real.read(name), name
    _check_tiny(load_state_dict(path)[0])


@pytest.mark.parametrize("byteorder", ["little", "big", None])
def test_round_trip_dtypes_strides_offsets(tmp_path, byteorder):
    rng = np.random.RandomState(0)
    shared = tw.Storage(rng.randn(40).astype(np.float32))
    ints = tw.Storage(np.arange(-10, 14, dtype=np.int64))
    bf = rng.randn(5).astype(np.float32).view(np.uint32) >> 16 << 16   # exact in bfloat16
    sd = collections.OrderedDict([
        ("f32", rng.randn(3, 4, 2).astype(np.float32)),
        ("f16", rng.randn(7).astype(np.float16)),
        ("f64", rng.randn(2, 2)),
        ("i32", rng.randint(-5, 5, (3, 3)).astype(np.int32)),
        ("u8", rng.randint(0, 256, 9).astype(np.uint8)),
        ("b", rng.rand(4) > 0.5),
        ("bf16", tw.View(tw.Storage((bf >> 16).astype(np.uint16), "BFloat16Storage"), 0, (5,),
                         (1,))),
        # views of one storage: offset, transposed, strided 3-d, broadcast (stride 0)
        ("v_offset", tw.View(shared, 7, (3, 5), (5, 1))),
        ("v_transposed", tw.View(shared, 2, (4, 3), (1, 4))),
        ("v_3d", tw.View(shared, 1, (2, 3, 2), (18, 5, 2))),
        ("v_broadcast", tw.View(shared, 39, (2, 3), (0, 0))),
        ("i64_view", tw.View(ints, 4, (2, 5), (1, 2))),
        ("param", tw.View(tw.Storage(np.arange(4, dtype=np.float32)), 0, (4,), (1,),
                          parameter=True)),
    ])
    path = str(tmp_path / "round.pth")
    tw.save(sd, path, byteorder=byteorder)
    arrays, _ = load_state_dict(path)
    s = shared.data
    expected = {
        "bf16": bf.view(np.float32),
        "v_offset": s[7:22].reshape(3, 5),
        "v_transposed": np.lib.stride_tricks.as_strided(s[2:], (4, 3), (4, 16)),
        "v_3d": np.lib.stride_tricks.as_strided(s[1:], (2, 3, 2), (72, 20, 8)),
        "v_broadcast": np.full((2, 3), s[39], np.float32),
        "i64_view": np.arange(-6, 4).reshape(5, 2).T,
        "param": np.arange(4, dtype=np.float32),
    }
    for name, value in sd.items():
        want = expected.get(name, value)
        got = arrays[name]
        assert got.dtype == np.asarray(want).dtype and got.shape == np.shape(want), name
        assert got.dtype.isnative and got.flags["C_CONTIGUOUS"], name
        np.testing.assert_array_equal(got, want, err_msg=name)


class _Payload(object):
    """Pickles as ``os.system("touch <marker>")``: what a malicious file would hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (tw.torch_global("os", "system"), ("touch %s" % self.marker,))


def _namespace(**fields):
    """An ``argparse.Namespace`` as pickle writes one (protocol 2: GLOBAL, NEWOBJ, BUILD)."""
    ns = tw.torch_global("argparse", "Namespace")()
    ns.__dict__.update(fields)
    return ns


@pytest.mark.parametrize("key", ["model", "state_dict"])
def test_checkpoint_wrapper_with_foreign_objects(tmp_path, key):
    """A training checkpoint: the state dict under ``key`` beside objects of other classes,
    which stay inert placeholders (the os.system payload never runs)."""
    marker = tmp_path / "payload_ran"
    wrapped = {key: _tiny_for_writer(), "args": _namespace(lr=0.02, epochs=26),
               "optimizer": {"state": {0: {"momentum_buffer": np.ones(3, np.float32)}}},
               "lr_scheduler": {"milestones": _Payload(marker)}, "epoch": 3}
    path = str(tmp_path / "checkpoint.pth")
    tw.save(wrapped, path)
    arrays, wrapper = load_state_dict(path)
    assert wrapper == key
    _check_tiny(arrays)
    assert not marker.exists()


def _refusal(path, *parts):
    with pytest.raises(UserError) as e:
        load_state_dict(str(path))
    line = str(e.value)
    assert "\n" not in line and line.startswith("%s: " % path), line
    for part in parts:
        assert part in line, line
    return line


def _write_zip(path, records):
    with zipfile.ZipFile(str(path), "w") as zf:
        for name, data in records.items():
            zf.writestr(name, data)


def test_refuses_what_is_not_a_state_dict(tmp_path):
    head = "not a torch state_dict file ("
    _refusal(tmp_path / "nope.pth", "torch file not found")
    _refusal(tmp_path, "is a folder")
    text = tmp_path / "text.pth"
    text.write_text("hello")
    _refusal(text, head, "not a zip archive")
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02M\xe9\x03.")
    _refusal(legacy, head, "legacy pre-1.6 format")
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(b"\x80\x02}q\x00.")
    _refusal(plain, head, "a plain pickle")

    good = str(tmp_path / "good.pth")
    tw.save(_tiny_for_writer(), good)
    data = open(good, "rb").read()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[:len(data) // 2])
    _refusal(truncated, head, "not a zip archive")

    with zipfile.ZipFile(good) as zf:
        records = {n: zf.read(n) for n in zf.namelist()}
    no_pickle = tmp_path / "no_pickle.pth"
    _write_zip(no_pickle, {"a/b.txt": b"x"})
    _refusal(no_pickle, head, "without <folder>/data.pkl")
    script = tmp_path / "script.pt"
    _write_zip(script, dict(records, **{"good/constants.pkl": b"", "good/code/m.py": b""}))
    _refusal(script, head, "TorchScript")
    missing = tmp_path / "missing_storage.pth"
    _write_zip(missing, {k: v for k, v in records.items() if k != "good/data/3"})
    _refusal(missing, head, "good/data/3 is missing")
    short = tmp_path / "short_storage.pth"
    _write_zip(short, dict(records, **{"good/data/0": b"\0" * 8}))
    _refusal(short, head, "data/0 holds 8 bytes, expected 24")
    broken = tmp_path / "broken_pickle.pth"
    _write_zip(broken, dict(records, **{"good/data.pkl": records["good/data.pkl"][:300]}))
    _refusal(broken, head)


@pytest.mark.parametrize("obj, reason", [
    (lambda: _Payload("/nonexistent/never"), "holds a pickled os.system object, not a state_dict"),
    (lambda: np.zeros(3, np.float32), "holds a single tensor"),
    (lambda: {"epoch": 3, "args": _namespace(lr=1)}, "without a 'model' or 'state_dict'"),
    (lambda: {"model": _namespace(a=1)}, "'model' entry is a pickled argparse.Namespace object"),
    (lambda: {"a.weight": np.zeros(2, np.float32), "extra": _Payload("/nonexistent/never")},
     "entries that are not tensors: extra (a pickled os.system object)"),
    (lambda: collections.OrderedDict(), "an empty dict"),
    (lambda: {"a": tw.View(tw.Storage(np.zeros(2, np.float32), "ComplexFloatStorage"), 0, (1,),
                           (1,))}, "unsupported tensor type torch.ComplexFloatStorage"),
    (lambda: {"a": tw.View(tw.Storage(np.zeros(6, np.float32)), 2, (2, 3), (3, 1))},
     "reaches past its storage of 6 elements"),
    (lambda: {"a": tw.View(tw.Storage(np.zeros(6, np.float32)), 0, (2, 3), (-3, 1))},
     "negative size, stride or offset"),
    (lambda: {"a": tw._Reduced((tw.REBUILD_TENSOR, (tw.Storage(np.zeros(2, np.float32)), 0, (2,),
                                                    (1,), False, collections.OrderedDict()),
                                {"offset": -5}))}, "the pickle sets the state of a Tensor"),
])
def test_refuses_other_contents(tmp_path, obj, reason):
    path = str(tmp_path / "other.pth")
    tw.save(obj(), path)
    _refusal(path, "not a torch state_dict file (", reason)


# --------------------------------------------------------------------------------------------
# the key mapping
# --------------------------------------------------------------------------------------------
# (torchvision key of today, mxmask name, leading rows dropped): written out by hand so that
# the converter's own table is checked against something independent
COMMON_PAIRS = [
    ("backbone.body.conv1.weight", "backbone.bottom_up.conv1.weight", 0),
    ("backbone.body.bn1.weight", "backbone.bottom_up.bn1.gamma", 0),
    ("backbone.body.bn1.bias", "backbone.bottom_up.bn1.beta", 0),
    ("backbone.body.layer1.0.conv2.weight", "backbone.bottom_up.layer1.0.conv2.weight", 0),
    ("backbone.body.layer2.0.downsample.0.weight",
     "backbone.bottom_up.layer2.0.downsample.0.weight", 0),
    ("backbone.body.layer2.0.downsample.1.bias", "backbone.bottom_up.layer2.0.downsample.1.beta",
     0),
    ("backbone.body.layer3.5.bn2.running_mean", "backbone.bottom_up.layer3.5.bn2.running_mean",
     0),
    ("backbone.body.layer4.2.bn3.running_var", "backbone.bottom_up.layer4.2.bn3.running_var", 0),
    ("backbone.fpn.inner_blocks.0.0.weight", "backbone.fpn.P2_conv_lat.weight", 0),
    ("backbone.fpn.inner_blocks.3.0.bias", "backbone.fpn.P5_conv_lat.bias", 0),
    ("backbone.fpn.layer_blocks.0.0.bias", "backbone.fpn.P2_conv1.bias", 0),
    ("backbone.fpn.layer_blocks.2.0.weight", "backbone.fpn.P4_conv1.weight", 0),
    ("rpn.head.conv.0.0.weight", "rpn.head.conv.weight", 0),
    ("rpn.head.cls_logits.bias", "rpn.head.logits.bias", 0),
    ("rpn.head.bbox_pred.weight", "rpn.head.deltas.weight", 0),
    ("roi_heads.box_head.fc6.weight", "box_head.fcs.0.weight", 0),
    ("roi_heads.box_head.fc7.bias", "box_head.fcs.1.bias", 0),
    ("roi_heads.box_predictor.cls_score.weight", "box_predictor.cls_score.weight", 0),
    ("roi_heads.box_predictor.cls_score.bias", "box_predictor.cls_score.bias", 0),
    ("roi_heads.box_predictor.bbox_pred.weight", "box_predictor.bbox_pred.weight", 4),
    ("roi_heads.box_predictor.bbox_pred.bias", "box_predictor.bbox_pred.bias", 4),
]
PAIRS = {
    MASK: COMMON_PAIRS + [
        ("roi_heads.mask_head.0.0.weight", "mask_head.convs.0.weight", 0),
        ("roi_heads.mask_head.3.0.bias", "mask_head.convs.3.bias", 0),
        ("roi_heads.mask_predictor.conv5_mask.weight", "mask_head.deconv.weight", 0),
        ("roi_heads.mask_predictor.conv5_mask.bias", "mask_head.deconv.bias", 0),
        ("roi_heads.mask_predictor.mask_fcn_logits.weight", "mask_head.predictor.weight", 1),
        ("roi_heads.mask_predictor.mask_fcn_logits.bias", "mask_head.predictor.bias", 1),
    ],
    KEYPOINT: COMMON_PAIRS + [
        ("roi_heads.keypoint_head.0.weight", "keypoint_head.convs.0.weight", 0),
        ("roi_heads.keypoint_head.6.bias", "keypoint_head.convs.3.bias", 0),
        ("roi_heads.keypoint_head.14.weight", "keypoint_head.convs.7.weight", 0),
        ("roi_heads.keypoint_predictor.kps_score_lowres.weight", "keypoint_head.deconv.weight", 0),
        ("roi_heads.keypoint_predictor.kps_score_lowres.bias", "keypoint_head.deconv.bias", 0),
    ],
}


def _check_values(net, arch, arrays, old=False):
    """The hand-written pairs hold the right (cut) tensors, and the mxmask parameters but the
    anchors hold the torchvision tensors one each (their first values, a tensor's index in the
    fake state dict, are the same multiset)."""
    cuts = {}
    for theirs, ours, drop in PAIRS[arch]:
        key = _old_names(theirs) if old else theirs
        np.testing.assert_array_equal(_value(net, ours), arrays[key][drop:], err_msg=ours)
        cuts[key] = drop
    want = collections.Counter(float(a[cuts.get(k, 0):].ravel()[0]) for k, a in arrays.items())
    got = collections.Counter(
        float(p.data().asnumpy().ravel()[0]) for name, p in
        net._collect_params_with_prefix().items() if not name.startswith("rpn.anchor_generators."))
    assert got == want


@pytest.mark.parametrize("arch", [MASK, KEYPOINT])
@pytest.mark.parametrize("old", [False, True], ids=["new_names", "v1_names"])
def test_mapping_fills_every_parameter(nets, arch, old):
    arrays = _fake_arrays(_spec(arch, old))
    assert convert_torchvision_params(arrays, nets[arch], arch) == len(arrays)
    _check_values(nets[arch], arch, arrays, old)


def test_mapping_ignores_num_batches_tracked_and_takes_mixed_names(nets):
    spec = _spec(MASK)
    # the FPN with v1 names, the rest with today's, plus BatchNorm counters
    spec = [(_old_names(k) if k.startswith("backbone.fpn.") else k, s) for k, s in spec]
    arrays = _fake_arrays(spec)
    arrays["backbone.body.bn1.num_batches_tracked"] = np.array(7, np.int64)
    assert convert_torchvision_params(arrays, nets[MASK], MASK) == len(arrays) - 1


def _mapping_error(nets, arch, arrays, *parts):
    with pytest.raises(UserError) as e:
        convert_torchvision_params(arrays, nets[arch], arch, source="W.pth")
    line = str(e.value)
    assert "\n" not in line and line.startswith("W.pth: not torchvision %s weights (" % arch)
    for part in parts:
        assert part in line, line
    return line


def test_mapping_errors_name_the_keys(nets):
    arrays = _fake_arrays(_spec(MASK))
    del arrays["roi_heads.mask_head.2.0.bias"]
    arrays["roi_heads.mask_head.4.0.weight"] = np.zeros((256, 256, 3, 3), np.float32)
    arrays["roi_heads.box_predictor.cls_score.weight"] = np.zeros((81, 1024), np.float32)
    _mapping_error(nets, MASK, arrays, "missing 1: roi_heads.mask_head.2.0.bias",
                   "unexpected 1: roi_heads.mask_head.4.0.weight",
                   "wrong shape 1: roi_heads.box_predictor.cls_score.weight (81, 1024) "
                   "(expected (91, 1024))")
    # a v1 file names its missing keys the v1 way
    arrays = _fake_arrays(_spec(MASK, old=True))
    del arrays["roi_heads.mask_head.mask_fcn3.weight"]
    _mapping_error(nets, MASK, arrays, "missing 1: roi_heads.mask_head.mask_fcn3.weight")
    # one tensor under its old and its new name
    arrays = _fake_arrays(_spec(MASK))
    arrays["rpn.head.conv.weight"] = arrays["rpn.head.conv.0.0.weight"]
    _mapping_error(nets, MASK, arrays,
                   "duplicate 1: rpn.head.conv.0.0.weight and rpn.head.conv.weight")
    # the background's rows are part of the expected shape
    arrays = _fake_arrays(_spec(MASK))
    arrays["roi_heads.box_predictor.bbox_pred.weight"] = np.zeros((360, 1024), np.float32)
    _mapping_error(nets, MASK, arrays, "roi_heads.box_predictor.bbox_pred.weight (360, 1024) "
                                       "(expected (364, 1024))")


def test_wrong_architecture(nets):
    line = _mapping_error(nets, KEYPOINT, _fake_arrays(_spec(MASK)),
                          "the keys are maskrcnn_resnet50_fpn's",
                          "missing 18: roi_heads.keypoint_head.0.bias",
                          "unexpected 12: roi_heads.mask_head.0.0.bias",
                          "roi_heads.box_predictor.cls_score.weight (91, 1024) (expected (2, "
                          "1024))")
    assert len(line) < 1500
    faster = _fake_arrays([(k, s) for k, s in _spec(MASK) if ".mask_" not in k])
    _mapping_error(nets, MASK, faster, "no mask or keypoint predictor keys (a Faster R-CNN "
                                       "file?)", "missing 12: roi_heads.mask_head.0.0.bias")


# --------------------------------------------------------------------------------------------
# the checkpoint, through the CLI
# --------------------------------------------------------------------------------------------
def _write_fake_file(path, arch, old=False, wrap=None):
    spec = _spec(arch, old)
    storage = tw.Storage(_big_storage(spec))
    sd = _fake_views(spec, storage)
    tw.save({wrap: sd, "epoch": 25, "args": _namespace(lr=0.02)} if wrap else sd, path)
    return _fake_arrays(spec)


def _load_converted(ckpt):
    from mxmask.predictor import load_network
    cfg = load_yaml(os.path.join(ckpt, "config.yaml"))
    return cfg, load_network(cfg, os.path.join(ckpt, "model.params"), [mx.cpu()],
                             hybridize=False)


def test_convert_mask_v1_file(tmp_path, capsys):
    src = str(tmp_path / "maskrcnn_resnet50_fpn_coco.pth")
    arrays = _write_fake_file(src, MASK, old=True)
    ckpt = str(tmp_path / "ckpt")
    assert cli.main(["convert", "torchvision", src, "--out", ckpt]) == 0
    out = capsys.readouterr().out
    assert "converted 307 torchvision maskrcnn_resnet50_fpn arrays" in out
    assert "preset torchvision_mask_rcnn_r50_fpn" in out
    with open(os.path.join(ckpt, "progress.json")) as f:
        progress = json.load(f)
    assert progress["iter"] == 0 and progress["max_iter"] == 0
    assert progress["source"] == os.path.abspath(src)
    cfg, net = _load_converted(ckpt)
    _check_values(net, MASK, arrays, old=True)
    # the classes: torchvision's label i is COCO category id i, "N/A" where COCO has none
    assert cfg.model.num_classes == 90
    assert cfg.data.category_ids == list(range(1, 91))
    assert cfg.data.class_names == KEYS["coco_categories"][1:]
    assert [i for i, n in zip(cfg.data.category_ids, cfg.data.class_names) if n == "N/A"] == \
        [12, 26, 29, 30, 45, 66, 68, 69, 71, 83]
    assert cfg.data.val_ann == "datasets/coco/annotations/instances_val2017.json"
    assert not cfg.model.keypoint_on and cfg.model.mask_on
    # converting again into the same folder is allowed (an earlier conversion)
    assert cli.main(["convert", "torchvision", src, "--out", ckpt]) == 0


def test_convert_keypoint_checkpoint_dict(tmp_path, capsys):
    src = str(tmp_path / "checkpoint.pth")
    arrays = _write_fake_file(src, KEYPOINT, wrap="model")
    ckpt = str(tmp_path / "ckpt")
    assert cli.main(["convert", "torchvision", src, "--out", ckpt]) == 0
    assert "(the state dict under 'model')" in capsys.readouterr().out
    cfg, net = _load_converted(ckpt)
    _check_values(net, KEYPOINT, arrays)
    d = cfg.data
    assert cfg.model.num_classes == 1 and d.class_names == ["person"] and d.category_ids == [1]
    assert d.keypoint_names == KEYS["keypoint_names"] and d.keypoint_category_ids == [1]
    names = d.keypoint_names
    for i, j in enumerate(d.keypoint_flip_map):
        assert names[j] == names[i].replace("left", "@").replace("right", "left").replace(
            "@", "right")
    assert len(d.skeleton) == 19 and [15, 13] in d.skeleton and [0, 1] in d.skeleton
    assert all(0 <= a < 17 and 0 <= b < 17 for a, b in d.skeleton)
    assert d.val_ann == "datasets/coco/annotations/person_keypoints_val2017.json"
    assert cfg.model.keypoint_on and cfg.model.num_keypoints == 17


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_cli_errors_exit_2(tmp_path, capsys):
    out = str(tmp_path / "out")
    text = tmp_path / "weights.pth"
    text.write_text("not torch")
    assert cli.main(["convert", "torchvision", str(text), "--out", out]) == 2
    assert _error_line(capsys) == ("mxmask: error: %s: not a torch state_dict file (not a zip "
                                   "archive)" % text)
    src = str(tmp_path / "tiny.pth")
    tw.save(_tiny_for_writer(), src)
    assert cli.main(["convert", "torchvision", src, "--out", out, "--arch", KEYPOINT]) == 2
    line = _error_line(capsys)
    assert line.startswith("mxmask: error: %s: not torchvision %s weights (no torchvision "
                           "detection model keys; missing " % (src, KEYPOINT))
    assert "unexpected 14: bfloat16, bool, contiguous" in line
    assert not os.path.exists(os.path.join(out, "model.params"))
    with pytest.raises(SystemExit) as e:
        cli.main(["convert", "torchvision", src, "--out", out, "--arch", "fasterrcnn"])
    assert e.value.code == 2
    capsys.readouterr()
    run = tmp_path / "run"
    run.mkdir()
    (run / "progress.json").write_text(json.dumps({"iter": 10, "max_iter": 100}))
    assert cli.main(["convert", "torchvision", src, "--out", str(run)]) == 2
    assert "already holds a checkpoint that is not a conversion" in _error_line(capsys)
    with pytest.raises(UserError, match="--arch resnet50: expected one of"):
        convert_torchvision(src, out, arch="resnet50")


# --------------------------------------------------------------------------------------------
# torch beside mxmask: neither torch nor GluonCV is imported where they are not needed
# --------------------------------------------------------------------------------------------
# what GluonCV 0.10.5's check.py raises at `import gluoncv` when torch >= 2 is importable
GLUONCV_TORCH_ERROR = ("Legacy torch==2.14.1 detected, some modules may not work properly. "
                       "torch>=1.4.0,<2.0.0 is required. You can use pip or conda to upgrade")


class _Refuse(importlib.abc.MetaPathFinder):
    """Make ``import <name>`` (and its submodules) raise ``error``."""

    def __init__(self, names, error):
        self.names, self.error = names, error

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            raise self.error
        return None


@pytest.fixture
def gluoncv_beside_torch(monkeypatch):
    """``import gluoncv`` raises as it does beside torch >= 2; ``import torch`` raises too, so
    that any use of either shows."""
    for name in list(sys.modules):
        if name.split(".")[0] in ("gluoncv", "torch"):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_Refuse(("gluoncv",),
                                                   RuntimeError(GLUONCV_TORCH_ERROR)),
                                           _Refuse(("torch",), ImportError("no torch here"))]
                        + sys.meta_path)


def test_gluoncv_imports_only_in_gluoncv_features():
    """Source check: ``gluoncv`` is imported inside functions of the GluonCV features only
    (predict, eval, export, train and the converters never reach them)."""
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mxmask")
    found = []
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path) as f:
                    for line in f:
                        if re.match(r"\s*(import gluoncv|from gluoncv[ .])", line):
                            found.append((os.path.relpath(path, root), line[:len(line) -
                                                                            len(line.lstrip())]))
    files = {p for p, _ in found}
    assert files <= {"bench/peers.py", "convert/gluoncv_reference.py", "convert/common.py"}, files
    assert all(indent for _, indent in found), "a module-level gluoncv import"


def test_runs_beside_torch_without_gluoncv(tmp_path, capsys, gluoncv_beside_torch, ckpt,
                                           shapes_dataset):
    """With gluoncv refusing to import (and no torch), convert torchvision, predict and export
    work; the GluonCV features fail with one line."""
    src = str(tmp_path / "tiny.pth")
    tw.save(_tiny_for_writer(), src)
    assert load_state_dict(src)[1] is None
    image = os.path.join(shapes_dataset, "images", "val")
    assert cli.main(["predict", ckpt, image, "--out", str(tmp_path / "r.json")]) == 0
    assert cli.main(["export", ckpt, "--out", str(tmp_path / "exported")]) == 0
    capsys.readouterr()
    for extra in (["--against", "gluoncv"], ["--resnet50"]):
        assert cli.main(["bench", "--preset", "shapes", "--size", "64x64"] + extra) == 2
        line = _error_line(capsys)
        assert line.startswith("mxmask: error: mxmask bench %s needs GluonCV, whose import "
                               "fails here (Legacy torch==2.14.1 detected" % " ".join(extra))
        assert "run it in an environment without torch >= 2" in line
    assert "gluoncv" not in sys.modules and "torch" not in sys.modules
