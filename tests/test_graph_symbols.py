"""The committed graphs in symbols/ match the code, and the graph comparison is meaningful.

Each preset's graph is rebuilt from the code (symbolic forward on ``mx.sym.var`` inputs, no
weights) and compared with ``symbols/<preset>-symbol.json`` by :func:`mxmask.graph.graph_diff`,
which aligns nodes by operator and attributes, so Gluon's name counters do not matter. When a
graph drifts, the failure lists node, op, attribute, old and new value; regenerate the files with
``scripts/export.sh`` (``python -m mxmask.graph --symbols symbols/``) and review the diff.
"""
import glob
import json
import os

import mxnet as mx
import pytest

from mxmask.config import list_presets
from mxmask.graph import (build_export_net, graph_diff, graph_json_text, network_symbol,
                           preset_config, preset_symbol)
from mxmask.modeling.rcnn import build_model

SYMBOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "symbols")


def committed(preset):
    with open(os.path.join(SYMBOLS, "%s-symbol.json" % preset)) as f:
        return f.read()


def test_one_committed_graph_per_preset():
    files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(SYMBOLS, "*-symbol.json")))
    assert files == sorted("%s-symbol.json" % p for p in list_presets())
    assert os.path.exists(os.path.join(SYMBOLS, "README.md"))


@pytest.mark.parametrize("preset", list_presets())
def test_committed_graph_matches_code(preset):
    lines = graph_diff(committed(preset), preset_symbol(preset))
    assert not lines, ("symbols/%s-symbol.json differs from the graph the code builds; if the "
                       "change is intended, run scripts/export.sh and commit the new file:\n  %s"
                       % (preset, "\n  ".join(lines)))


def test_committed_graph_loads_and_has_the_contract_io():
    sym = mx.sym.load(os.path.join(SYMBOLS, "keypoint_rcnn_r50_fpn-symbol.json"))
    assert sym.list_inputs()[0] == "data" and "im_info" in sym.list_inputs()
    assert sym.list_outputs() == ["ids_output", "scores_output", "boxes_output",
                                  "keypoints_output", "heatmaps_output"]
    # the graph infers its output shapes from the input shapes alone
    _, out_shapes, _ = sym.infer_shape(data=(1, 3, 256, 320), im_info=(1, 3))
    assert out_shapes == [(1, 100), (1, 100), (1, 100, 4), (1, 100, 17, 3),
                          (1, 100, 17, 56, 56)]


def test_graph_does_not_depend_on_name_counters():
    before = graph_json_text(preset_symbol("shapes"))
    # other networks built without a fixed prefix advance Gluon's global counters
    cfg = preset_config("shapes")
    build_model(cfg)
    mx.gluon.nn.Dense(3)
    again = network_symbol(build_export_net(cfg))
    assert graph_json_text(again) == before
    # operator node names are not part of the comparison
    js = json.loads(before)
    for i, node in enumerate(js["nodes"]):
        if node["op"] != "null":
            node["name"] = "renamed_%d" % i
    assert graph_diff(before, js) == []


def test_graph_diff_reports_drift_readably():
    base = json.loads(committed("shapes"))
    # a changed attribute: node name, op, key, old and new value
    changed = json.loads(committed("shapes"))
    conv = next(n for n in changed["nodes"] if n["op"] == "Convolution")
    conv["attrs"]["kernel"] = "(5, 5)"
    lines = graph_diff(base, changed)
    assert lines == ['node %s (Convolution): attr kernel: "(7, 7)" -> "(5, 5)"' % conv["name"]]
    # a config change: one more mask-head conv appears as added nodes, nothing else moves
    cfg = preset_config("shapes")
    cfg.model.mask_head.num_conv += 1                   # a conv, its GroupNorm and ReLU
    lines = graph_diff(base, network_symbol(build_export_net(cfg)))
    added = [line for line in lines if line.startswith("added node")]
    assert any("(Convolution)" in line and "maskhead" in line for line in added), lines
    assert any("_weight (variable)" in line for line in added), lines
    assert all("maskhead" in line for line in lines[:-1]), lines      # nothing else moves
    assert len(lines) < 60, lines
    # a renamed parameter (the params file would no longer load) and a changed output
    renamed = json.loads(committed("shapes"))
    var = next(n for n in renamed["nodes"] if n["name"].endswith("rpn0_head_conv_weight"))
    var["name"] = var["name"].replace("head_conv", "head_conv3x3")
    renamed["heads"] = renamed["heads"][:-1]
    lines = graph_diff(base, renamed)
    assert any("rpn0_head_conv_weight renamed to" in line for line in lines), lines
    assert lines[-1].startswith("outputs were [") and "heatmaps" in lines[-1]
    assert len(graph_diff(base, json.loads(committed("mask_rcnn_r50_fpn")), limit=5)) == 6
