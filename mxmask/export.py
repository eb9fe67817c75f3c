"""Export a checkpoint as a self-contained MXNet graph, and the graphs of the shipped presets.

    export_checkpoint("runs/shapes", "export/shapes")                  # plain fp32 graph
    export_checkpoint("runs/shapes", "export/shapes", fuse=True)       # MKLDNN-fused fp32
    export_checkpoint(ckpt, prefix, fuse=True, dtype="bfloat16")       # bf16, then fused
    write_preset_symbols("symbols/")                    # symbols/<preset>-symbol.json

What goes in: a checkpoint folder (``config.yaml`` + weights, see :mod:`mxmask.engine.checkpoint`).
What comes out, for ``PREFIX``:

    PREFIX-symbol.json    the inference graph; inputs ``data`` (B, 3, H, W) normalised RGB and
                          ``im_info`` (B, 3) = (h, w, scale); outputs named ``ids``, ``scores``,
                          ``boxes`` [, ``masks``] [, ``keypoints``, ``heatmaps``] (DEVELOPING.md,
                          "Network outputs"; ``sym.list_outputs()`` gives ``ids_output``, ...)
    PREFIX-0000.params    every weight plus the anchor constants (``arg:``/``aux:`` keys, as
                          ``HybridBlock.export`` writes them)
    PREFIX-config.yaml    the checkpoint's full config
    PREFIX-meta.json      what a program needs to run the graph without mxmask (stdlib json):
                          input names, output names, resize rule, interpolation and
                          normalisation (``input.resize_rule``, ``resize_interp``,
                          ``normalize``), mean/std, size divisibility,
                          largest input side, class names, COCO category ids, thresholds

It loads with ``mx.gluon.SymbolBlock.imports(PREFIX + "-symbol.json", ["data", "im_info"],
PREFIX + "-0000.params")`` and gives the Gluon model's outputs (the plain export is the same
graph, so they are equal). The graph takes any input size that is a multiple of
``input.size_divisibility`` up to ``max_input_size`` (the anchor constants' extent).

How the graph is made: the network is built with the fixed block prefix ``mxmask_`` and called on
``mx.sym.var("data")`` and ``mx.sym.var("im_info")``, so parameter names never depend on Gluon's
global name counters; each output passes through an ``identity`` node named after it; variable
attributes that only matter for training (``__init__``, which holds a Python object id for
constants, ``__lr_mult__``, ``__wd_mult__``) are dropped; and operator nodes that Gluon names alike
(a block called once per FPN level) get ``_1``, ``_2``... suffixes, because the AMP pass selects
nodes by name.

Optimised exports (DESIGN.md section 6):
- ``fuse``: ``SymbolBlock.optimize_for(x, im_info, backend="MKLDNN")`` (conv + relu / BN fused into
  ``_sg_mkldnn_conv``). The fused graph still takes any input size.
- ``dtype="bfloat16"``: ``mx.contrib.amp.convert_hybrid_block(..., target_dtype="bfloat16",
  cast_optional_params=True)`` first, then (with ``fuse``) ``optimize_for``; in the other order
  nothing runs in bf16. Only ``Convolution``, ``FullyConnected`` (MXNet's AMP lists) and
  ``Deconvolution`` (:func:`_bf16_op_lists`) run in bf16; NMS, RoIAlign, box decoding and the
  heads' post-processing stay fp32.
  MXNet 1.9.1's AMP pass has a bug: an op that runs in either precision (``Pooling``, ``Concat``,
  ``BatchNorm``, ...) whose fp32 input has also been cast to bf16 for another consumer is recorded
  as producing bf16 while it still computes in fp32, so the next convolution gets fp32 data and bf16
  weights ("This layer requires uniform type", seen on the shapes preset's P6 max-pool feeding the
  shared RPN conv). :func:`bf16_fp32_exclusions` predicts each node's precision and pins such ops to
  fp32 through ``excluded_sym_names``, which is what they compute anyway.

The preset graphs: :func:`preset_symbol` builds a preset's graph from the code alone (no weights,
no forward pass, well under a second) and :func:`write_preset_symbols` writes
``symbols/<preset>-symbol.json``; ``python -m mxmask.export --symbols symbols/`` (scripts/export.sh)
regenerates them. :func:`graph_diff` compares two graph jsons node by node (aligned in topological
order by operator and attributes, so an inserted node does not shift every later one) and returns
readable lines: node name, op, attribute key, old and new value.
"""
import argparse
import difflib
import json
import os
import shutil
import sys
import tempfile
import warnings

import numpy as np

from .utils import UserError, atomic_write_json, atomic_write_text

__all__ = ["EXPORT_PREFIX", "INPUT_NAMES", "check_dtype", "build_export_net", "network_symbol",
           "preset_config", "preset_symbol", "graph_json_text", "write_preset_symbols", "graph_diff",
           "bf16_fp32_exclusions", "export_checkpoint", "export_meta", "parse_hw", "parse_size",
           "compare_outputs", "main"]

EXPORT_PREFIX = "mxmask_"
INPUT_NAMES = ("data", "im_info")
DTYPES = ("float32", "bfloat16")


def check_dtype(dtype):
    """Raise UserError naming ``--dtype`` unless ``dtype`` is one of :data:`DTYPES`."""
    if dtype not in DTYPES:
        raise UserError("--dtype %s: expected one of %s" % (dtype, ", ".join(DTYPES)))
META_FORMAT = "mxmask-export"
META_VERSION = 1
# variable attributes that describe training, not the graph (``__init__`` of a constant holds
# ``id(...)`` of a Python object, so it changes on every build)
_VOLATILE_VAR_ATTRS = ("__init__", "__lr_mult__", "__wd_mult__")
_CHECK_SIDE_CAP = 512            # the default check input is at most 512 x 512


# --------------------------------------------------------------------------------------------
# The graph
# --------------------------------------------------------------------------------------------
def build_export_net(cfg):
    """The network of ``cfg`` with the fixed prefix ``mxmask_`` (parameters not initialised)."""
    from .modeling.rcnn import MaskRCNN
    return MaskRCNN(cfg, prefix=EXPORT_PREFIX)


def _normalise_graph(js):
    """Graph json dict -> the same graph with volatile variable attributes dropped and operator
    node names made unique (second and later uses of a name get ``_1``, ``_2``, ...)."""
    names = {n["name"] for n in js["nodes"]}
    seen = {}
    for node in js["nodes"]:
        if node["op"] == "null":
            attrs = node.get("attrs")
            if attrs:
                for key in _VOLATILE_VAR_ATTRS:
                    attrs.pop(key, None)
            continue
        name = node["name"]
        count = seen.get(name, 0)
        seen[name] = count + 1
        if count:
            k = count
            while "%s_%d" % (name, k) in names:
                k += 1
            node["name"] = "%s_%d" % (name, k)
            names.add(node["name"])
    return js


def network_symbol(net):
    """The inference graph of a :class:`~mxmask.modeling.rcnn.MaskRCNN` as a Symbol with inputs
    ``data`` and ``im_info`` and one output per name in ``net.output_names`` (normalised, see the
    module docstring). Needs no parameter values. Always MXNet's own operators, whatever
    ``net.kernels`` says: the graph must run without mxmask."""
    import mxnet as mx
    kernels, net.kernels = net.kernels, "mxnet"      # tracing a Symbol uses no cached graph
    try:
        with mx.autograd.predict_mode():
            outs = net(mx.sym.var(INPUT_NAMES[0]), mx.sym.var(INPUT_NAMES[1]))
    finally:
        net.kernels = kernels
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    if len(outs) != len(net.output_names):
        raise RuntimeError("the network returned %d outputs for %d names"
                           % (len(outs), len(net.output_names)))
    group = mx.sym.Group([mx.sym.identity(o, name=n) for o, n in zip(outs, net.output_names)])
    js = _normalise_graph(json.loads(group.tojson()))
    return mx.sym.load_json(json.dumps(js))


def graph_json_text(sym_or_json):
    """Graph json text with one node per line (stable, diff-friendly); loads with mx.sym.load."""
    js = sym_or_json if isinstance(sym_or_json, dict) else json.loads(
        sym_or_json if isinstance(sym_or_json, str) else sym_or_json.tojson())
    dump = lambda v: json.dumps(v, sort_keys=True)      # noqa: E731
    lines = ["{", '  "nodes": [']
    lines.append(",\n".join("    " + dump(n) for n in js["nodes"]))
    lines.append("  ],")
    rest = [k for k in ("arg_nodes", "node_row_ptr", "heads", "attrs") if k in js]
    rest += sorted(k for k in js if k not in rest and k != "nodes")
    for i, key in enumerate(rest):
        lines.append('  "%s": %s%s' % (key, dump(js[key]), "," if i < len(rest) - 1 else ""))
    lines.append("}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------
def preset_config(preset):
    """The config a preset's shipped graph is built from. ``shapes`` gets the synthetic
    dataset's classes and keypoints (``mxmask.data.shapes.CATEGORIES`` / ``KEYPOINT_NAMES``),
    which training fills in from the data; the other presets are used as they are."""
    from .config import get_config
    if preset != "shapes":
        return get_config(preset)
    from .data.shapes import CATEGORIES, KEYPOINT_NAMES
    cfg = get_config("shapes", ["model.num_classes=%d" % len(CATEGORIES),
                                "model.num_keypoints=%d" % len(KEYPOINT_NAMES)])
    cfg.data.class_names = [c["name"] for c in CATEGORIES]
    cfg.data.category_ids = [int(c["id"]) for c in CATEGORIES]
    cfg.data.keypoint_names = list(KEYPOINT_NAMES)
    cfg.data.keypoint_category_ids = [int(c["id"]) for c in CATEGORIES if c.get("keypoints")]
    return cfg


def preset_symbol(preset):
    """The inference graph of a preset, built from the code (no weights needed)."""
    return network_symbol(build_export_net(preset_config(preset)))


def write_preset_symbols(out_dir, presets=None):
    """Write ``<out_dir>/<preset>-symbol.json`` for ``presets`` (default: every preset);
    returns the paths written."""
    from .config import list_presets
    presets = list(presets) if presets else list_presets()
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for preset in presets:
        path = os.path.join(out_dir, "%s-symbol.json" % preset)
        atomic_write_text(path, graph_json_text(preset_symbol(preset)))
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------
# Comparing graphs
# --------------------------------------------------------------------------------------------
def _load_graph(g):
    if isinstance(g, dict):
        return g
    if hasattr(g, "tojson"):
        return json.loads(g.tojson())
    return json.loads(g)


def _desc(node):
    attrs = tuple(sorted((node.get("attrs") or {}).items()))
    return (node["op"], node["name"] if node["op"] == "null" else "", attrs)


def _label(node):
    return "%s (%s)" % (node["name"], "variable" if node["op"] == "null" else node["op"])


def graph_diff(old, new, limit=40):
    """Differences between two graphs (Symbol, json text or dict) as readable lines; [] when
    they are the same graph.

    Nodes are aligned in topological order by (op, variable name, attributes); operator node
    names are not compared (they carry Gluon's counters), variable names are (they must match
    the parameter files). Reported: added and removed nodes, changed attributes (key, old, new),
    inputs that now come from another node, and changed outputs."""
    a, b = _load_graph(old), _load_graph(new)
    na, nb = a["nodes"], b["nodes"]
    da, db = [_desc(n) for n in na], [_desc(n) for n in nb]
    lines = []
    pairs = {}                                       # old index -> new index
    matcher = difflib.SequenceMatcher(None, da, db, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            pairs.update({i1 + k: j1 + k for k in range(i2 - i1)})
            continue
        olds, news = list(range(i1, i2)), list(range(j1, j2))
        if tag == "replace":
            # pair up nodes of the same op in order: those are attribute changes
            matched = difflib.SequenceMatcher(None, [na[i]["op"] for i in olds],
                                              [nb[j]["op"] for j in news], autojunk=False)
            paired_old, paired_new = set(), set()
            for block in matched.get_matching_blocks():
                for k in range(block.size):
                    i, j = olds[block.a + k], news[block.b + k]
                    pairs[i] = j
                    paired_old.add(i)
                    paired_new.add(j)
                    lines.extend(_attr_changes(na[i], nb[j]))
            olds = [i for i in olds if i not in paired_old]
            news = [j for j in news if j not in paired_new]
        for i in olds:
            lines.append("removed node %s" % _label(na[i]))
        for j in news:
            attrs = nb[j].get("attrs") or {}
            lines.append("added node %s%s" % (_label(nb[j]), (" attrs %s" % json.dumps(
                attrs, sort_keys=True)) if attrs else ""))
    # inputs of the aligned nodes
    for i, j in sorted(pairs.items()):
        ins_a, ins_b = na[i].get("inputs", []), nb[j].get("inputs", [])
        if len(ins_a) != len(ins_b):
            lines.append("node %s: %d inputs, was %d" % (_label(nb[j]), len(ins_b), len(ins_a)))
            continue
        for k, (ea, eb) in enumerate(zip(ins_a, ins_b)):
            if pairs.get(ea[0]) != eb[0] or ea[1] != eb[1]:
                lines.append("node %s: input %d was %s[%d], now %s[%d]" % (
                    _label(nb[j]), k, na[ea[0]]["name"], ea[1], nb[eb[0]]["name"], eb[1]))
    heads_a = [(pairs.get(h[0]), h[1]) for h in a.get("heads", [])]
    heads_b = [(h[0], h[1]) for h in b.get("heads", [])]
    if heads_a != heads_b:
        name = lambda nodes, h: "%s[%d]" % (nodes[h[0]]["name"], h[1])  # noqa: E731
        lines.append("outputs were %s, now %s" % (
            [name(na, h) for h in a.get("heads", [])], [name(nb, h) for h in heads_b]))
    if len(lines) > limit:
        lines = lines[:limit] + ["... and %d more differences" % (len(lines) - limit)]
    return lines


def _attr_changes(node_a, node_b):
    aa, ab = node_a.get("attrs") or {}, node_b.get("attrs") or {}
    out = []
    for key in sorted(set(aa) | set(ab)):
        if aa.get(key) != ab.get(key):
            out.append("node %s: attr %s: %s -> %s" % (
                _label(node_b), key, json.dumps(aa.get(key)), json.dumps(ab.get(key))))
    if node_a["op"] == "null" and node_a["name"] != node_b["name"]:
        out.append("variable %s renamed to %s" % (node_a["name"], node_b["name"]))
    return out


# --------------------------------------------------------------------------------------------
# bfloat16
# --------------------------------------------------------------------------------------------
def bf16_fp32_exclusions(sym, excluded=()):
    """Names of the nodes to pin to fp32 so that MXNet 1.9.1's AMP pass converts ``sym``
    consistently (module docstring): the ops of ``amp.list_lp16_fp32_ops`` whose data input will
    be fp32 after the conversion, and the grouped deconvolutions (:func:`_bf16_op_lists`).

    Each node's precision is predicted as the pass decides it: variables fp32; lp16 ops
    (Convolution, FullyConnected, Deconvolution) bf16; fp32 ops, the conditional ones that
    match and ``excluded`` names fp32; widest-type ops bf16 only when all inputs are bf16;
    others follow their first input."""
    from mxnet.contrib import amp
    from mxnet.contrib.amp.amp import bfloat16
    lp16, fp32 = (set(ops) for ops in _bf16_op_lists())
    either = set(amp.list_lp16_fp32_ops(bfloat16))
    widest = set(amp.list_widest_type_cast(bfloat16))
    conditional = {}
    for op, key, values in amp.list_conditional_fp32_ops(bfloat16):
        conditional.setdefault(op, []).append((key, set(values)))
    nodes = _load_graph(sym)["nodes"]
    excluded = set(excluded)
    low = [False] * len(nodes)
    pinned = []
    for i, node in enumerate(nodes):
        op = node["op"]
        if op == "null":
            continue
        attrs = node.get("attrs") or {}
        inputs = [low[e[0]] for e in node.get("inputs", [])]
        if (node["name"] in excluded or op in fp32
                or any(attrs.get(k) in v for k, v in conditional.get(op, []))):
            low[i] = False
        elif op == "Deconvolution" and int(attrs.get("num_group", "1")) > 1:
            low[i] = False              # no bf16 primitive (see _bf16_op_lists)
            pinned.append(node["name"])
        elif op in lp16:
            low[i] = True
        elif op in widest:
            low[i] = bool(inputs) and all(inputs)
        elif op in either:
            low[i] = bool(inputs) and inputs[0]
            if not low[i]:
                pinned.append(node["name"])
        else:
            low[i] = bool(inputs) and inputs[0]
    return pinned


def _bf16_op_lists():
    """(ops converted to bf16, ops kept in fp32): MXNet's AMP lists, with ``Deconvolution``
    moved to bf16. AMP keeps it fp32 because its bf16 *backward* crashes (README, "Mixed
    precision"), but its forward runs on oneDNN's bf16 kernels: the mask head's 2x2/2
    deconvolution of 100 rois takes 52 ms on AMX instead of 135-180 ms in fp32. A grouped
    deconvolution (the keypoint head's fixed bilinear upsample) has no bf16 primitive
    ("could not create a primitive descriptor for a reorder primitive");
    :func:`bf16_fp32_exclusions` pins those to fp32."""
    from mxnet.contrib import amp
    from mxnet.contrib.amp.amp import bfloat16
    moved = ("Deconvolution",)
    lp16 = list(amp.list_lp16_ops(bfloat16)) + list(moved)
    fp32 = [op for op in amp.list_fp32_ops(bfloat16) if op not in moved]
    return lp16, fp32


def _convert_bf16(block, names):
    """convert_hybrid_block to bfloat16 with :func:`_bf16_op_lists` and the exclusions of
    :func:`bf16_fp32_exclusions`."""
    from mxnet.contrib import amp
    import mxnet as mx
    lp16, fp32 = _bf16_op_lists()
    return amp.convert_hybrid_block(block, target_dtype="bfloat16", ctx=mx.cpu(),
                                    target_dtype_ops=lp16, fp32_ops=fp32,
                                    cast_optional_params=True,
                                    excluded_sym_names=list(names))


def optimized_block(sym, params, data, im_info, fuse=False, dtype="float32"):
    """The network graph ``sym`` with ``params`` as a SymbolBlock, converted to bfloat16 (with
    the fp32 exclusions above) and/or MKLDNN-fused, in that order (DESIGN.md section 6), and run
    once on the example inputs. Returns ``(block, names of the nodes kept in fp32)``."""
    pinned = []
    with warnings.catch_warnings():
        # SymbolBlocks warn that the graph inputs have no declared type (they are fp32)
        warnings.filterwarnings("ignore", message="Cannot decide type")
        block = _symbol_block(sym, params)
        if dtype == "bfloat16":
            block.hybridize(static_alloc=False)
            block(data, im_info)
            pinned = bf16_fp32_exclusions(sym)
            block = _convert_bf16(block, pinned)
        if fuse:
            block.optimize_for(data, im_info, backend="MKLDNN")
        else:
            block.hybridize()
        block(data, im_info)
    return block, pinned


# --------------------------------------------------------------------------------------------
# Export of a checkpoint
# --------------------------------------------------------------------------------------------
def parse_hw(text):
    """``"HxW"`` -> (H, W) integers, or UserError naming ``--size``."""
    parts = str(text).lower().replace(" ", "").split("x")
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise UserError("--size %s: expected HxW, e.g. 800x1344" % text)
    return h, w


def parse_size(text, cfg):
    """``"HxW"`` -> (H, W): positive multiples of ``input.size_divisibility`` that the anchor
    constants cover. Raises UserError naming ``--size``."""
    h, w = parse_hw(text)
    div = max(int(cfg.input.size_divisibility), 1)
    if h <= 0 or w <= 0 or h % div or w % div:
        raise UserError("--size %s: height and width must be positive multiples of %d "
                        "(input.size_divisibility)" % (text, div))
    check_anchors_cover(text, (h, w), cfg)
    return h, w


def check_anchors_cover(text, hw, cfg, remedy="set by input.max_size_train/max_size_test"):
    """UserError naming ``--size text`` when the input ``hw`` is larger than the anchor
    constants of ``cfg`` cover; ``remedy`` says what lifts the limit."""
    from .modeling.rpn import anchor_max_size
    biggest = anchor_max_size(cfg)
    if max(hw) > biggest:
        raise UserError("--size %s: larger than %d, the largest input the model's anchors cover "
                        "(%s)" % (text, biggest, remedy))


def _default_check_size(cfg):
    from .modeling.rpn import anchor_max_size
    div = max(int(cfg.input.size_divisibility), 1)
    side = min(int(cfg.input.min_size_test), _CHECK_SIDE_CAP, anchor_max_size(cfg))
    side = max(-(-side // div) * div, div)
    return side, side


def _example_inputs(size, seed=0):
    """Random normalised data (1, 3, H, W) and im_info (1, 3) with the full size valid."""
    import mxnet as mx
    h, w = size
    rng = np.random.RandomState(seed)
    data = mx.nd.array(rng.randn(1, 3, h, w).astype(np.float32))
    return data, mx.nd.array([[h, w, 1.0]])


def export_meta(cfg, output_names, dtype="float32", fused=False, example_size=None):
    """The ``PREFIX-meta.json`` record: everything needed to run the exported graph without
    mxmask (see scripts/predict_exported.py)."""
    from .modeling.rpn import anchor_max_size
    d, i, m, t = cfg.data, cfg.input, cfg.model, cfg.test
    return {
        "format": META_FORMAT, "version": META_VERSION,
        "inputs": list(INPUT_NAMES), "outputs": list(output_names),
        "dtype": dtype, "fused": bool(fused),
        "example_size": list(example_size) if example_size else None,
        "min_size_test": int(i.min_size_test), "max_size_test": int(i.max_size_test),
        "size_divisibility": int(i.size_divisibility), "max_input_size": anchor_max_size(cfg),
        "resize_rule": str(i.resize_rule), "resize_interp": str(i.resize_interp),
        "normalize": str(i.normalize),
        "pixel_mean": [float(v) for v in i.pixel_mean],
        "pixel_std": [float(v) for v in i.pixel_std],
        "num_classes": int(m.num_classes),
        "class_names": list(d.class_names), "category_ids": [int(c) for c in d.category_ids],
        "keypoint_names": list(d.keypoint_names),
        "keypoint_category_ids": [int(c) for c in d.keypoint_category_ids],
        "skeleton": [list(p) for p in d.skeleton],
        "box_plus_one": bool(m.box_plus_one),
        "score_thresh": float(t.score_thresh), "mask_thresh": float(t.mask_thresh),
        "mask_box_thresh": float(t.mask_box_thresh), "mask_paste": str(t.mask_paste),
        "keypoint_offset": float(d.keypoint_offset),
        "max_dets": int(t.max_dets),
    }


def _load_checkpoint(ckpt, overrides=()):
    """(cfg, MaskRCNN with the export prefix and the checkpoint's weights on the CPU)."""
    import mxnet as mx
    from .engine.checkpoint import checkpoint_files, load_checkpoint_config
    cfg = load_checkpoint_config(ckpt, overrides)
    folder = os.path.dirname(ckpt) if ckpt.endswith((".yaml", ".yml")) else ckpt
    params = checkpoint_files(folder)[0]
    net = build_export_net(cfg)
    try:
        net.load_parameters(params, ctx=mx.cpu())
    except (AssertionError, mx.base.MXNetError, OSError) as e:
        raise UserError("%s: does not match the network of its config (%s)"
                        % (params, str(e).strip().splitlines()[0][:300]))
    return cfg, net


def _param_dict(sym, params):
    """``arg:``/``aux:`` dict for ``mx.nd.save`` of the parameters ``sym`` uses."""
    args = set(sym.list_arguments())
    aux = set(sym.list_auxiliary_states())
    out = {}
    for name, param in params.items():
        if name in args:
            out["arg:" + name] = param.data()
        elif name in aux:
            out["aux:" + name] = param.data()
    missing = (args | aux) - set(INPUT_NAMES) - {k.split(":", 1)[1] for k in out}
    if missing:
        raise RuntimeError("the graph needs parameters the network does not have: %s"
                           % ", ".join(sorted(missing)))
    return out


def _symbol_block(sym, params):
    """A SymbolBlock of ``sym`` (inputs data, im_info) holding ``params``' values."""
    import mxnet as mx
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Cannot decide type")
        block = mx.gluon.SymbolBlock(sym, [mx.sym.var(n) for n in INPUT_NAMES])
    values = {k.split(":", 1)[1]: v for k, v in _param_dict(sym, params).items()}
    block.collect_params().load_dict(values, ctx=mx.cpu())
    return block


def import_exported(prefix):
    """``SymbolBlock.imports`` of an export (its warning about input types silenced)."""
    import mxnet as mx
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Cannot decide type")
        return mx.gluon.SymbolBlock.imports(prefix + "-symbol.json", list(INPUT_NAMES),
                                            prefix + "-0000.params", ctx=mx.cpu())


def _iou(a, b):
    """IoU matrix of xyxy boxes a (N, 4) and b (M, 4)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def compare_outputs(ref, got, names, iou=0.9):
    """Compare two lists of network outputs (``names`` as in ``net.output_names``).

    Returns per output name the largest absolute difference, row by row; ``ids_agree``, the
    fraction of detection rows with the same class id; and, because rows swap when scores are
    nearly tied (which moves whole boxes without any real difference), an order-free view:
    ``matched``, the fraction of the reference's detections that have a detection of the same
    class with IoU >= ``iou`` in ``got`` (per image), and over those pairs ``matched_score``
    and ``matched_box``, the largest score and box-coordinate differences."""
    ref = [r.asnumpy() if hasattr(r, "asnumpy") else np.asarray(r) for r in ref]
    got = [g.asnumpy() if hasattr(g, "asnumpy") else np.asarray(g) for g in got]
    report = {}
    for name, r, g in zip(names, ref, got):
        if r.shape != g.shape:
            raise RuntimeError("output %s: shape %s, expected %s" % (name, g.shape, r.shape))
        report[name] = float(np.abs(r.astype(np.float64) - g.astype(np.float64)).max()) \
            if r.size else 0.0
    out = dict(zip(names, zip(ref, got)))
    (ri, gi), (rs, gs), (rb, gb) = out["ids"], out["scores"], out["boxes"]
    report["ids_agree"] = float((ri == gi).mean()) if ri.size else 1.0
    total = found = 0
    score_diff = box_diff = 0.0
    for b in range(ri.shape[0]):
        rv, gv = ri[b] >= 0, gi[b] >= 0
        total += int(rv.sum())
        if not rv.any() or not gv.any():
            continue
        ious = _iou(rb[b][rv].astype(np.float64), gb[b][gv].astype(np.float64))
        ious[ri[b][rv][:, None] != gi[b][gv][None, :]] = -1.0
        best = ious.argmax(axis=1)
        ok = ious[np.arange(len(best)), best] >= iou
        found += int(ok.sum())
        if ok.any():
            score_diff = max(score_diff, float(np.abs(
                rs[b][rv][ok].astype(np.float64) - gs[b][gv][best[ok]]).max()))
            box_diff = max(box_diff, float(np.abs(
                rb[b][rv][ok].astype(np.float64) - gb[b][gv][best[ok]]).max()))
    report["matched"] = float(found) / total if total else 1.0
    report["matched_score"] = score_diff
    report["matched_box"] = box_diff
    return report


def export_checkpoint(ckpt, prefix, size=None, fuse=False, dtype="float32", check=True,
                      overrides=()):
    """Export checkpoint ``ckpt`` to ``PREFIX-{symbol.json,0000.params,config.yaml,meta.json}``.

    ``size`` (H, W): the example input used to trace, partition (``fuse``) and check; default
    a square of ``input.min_size_test`` capped at 512. ``fuse``: MKLDNN subgraph fusion.
    ``dtype``: ``float32`` or ``bfloat16``. With ``check`` the written files are loaded back
    with ``SymbolBlock.imports`` and run against the Gluon model on the example input.
    ``overrides``: ``test.*`` ``key=value`` settings applied to the checkpoint's config.
    Returns ``{"files": [...], "check": compare_outputs report or None, "size": (H, W),
    "bf16_fp32_nodes": [...]}``. The files appear only when everything succeeded.
    """
    import mxnet as mx
    from .config import dump_yaml
    check_dtype(dtype)
    if not os.path.basename(prefix) or os.path.isdir(prefix):
        raise UserError("--out %s: expected a file prefix such as export/model (the files are "
                        "PREFIX-symbol.json, ...), not a folder" % prefix)
    cfg, net = _load_checkpoint(ckpt, overrides)
    size = tuple(size) if size else _default_check_size(cfg)
    sym = network_symbol(net)
    params = net.collect_params()
    data, im_info = _example_inputs(size)
    pinned = []
    out_dir = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=out_dir)
    tmp = os.path.join(staging, "model")
    try:
        if not fuse and dtype == "float32":
            atomic_write_text(tmp + "-symbol.json", graph_json_text(sym))
            mx.nd.save(tmp + "-0000.params", _param_dict(sym, params))
        else:
            block, pinned = optimized_block(sym, params, data, im_info, fuse, dtype)
            block.export(tmp, remove_amp_cast=False)
        dump_yaml(cfg, tmp + "-config.yaml")
        atomic_write_json(tmp + "-meta.json", export_meta(cfg, net.output_names, dtype, fuse,
                                                          size), indent=1)
        report = None
        if check:
            net.hybridize(static_alloc=True)
            ref = net(data, im_info)
            got = import_exported(tmp)(data, im_info)
            report = compare_outputs(ref, got, net.output_names)
        files = []
        for suffix in ("-symbol.json", "-0000.params", "-config.yaml", "-meta.json"):
            os.replace(tmp + suffix, prefix + suffix)
            files.append(prefix + suffix)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"files": files, "check": report, "size": size, "bf16_fp32_nodes": pinned}


# --------------------------------------------------------------------------------------------
# python -m mxmask.export --symbols symbols/
# --------------------------------------------------------------------------------------------
def main(argv=None):
    """``python -m mxmask.export --symbols DIR [--preset P ...]``: write the preset graphs;
    ``--check DIR``: compare the graphs in DIR with the code and print the differences."""
    parser = argparse.ArgumentParser(prog="python -m mxmask.export",
                                     description="Write or check the preset graphs (symbols/).")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--symbols", metavar="DIR", help="write DIR/<preset>-symbol.json")
    group.add_argument("--check", metavar="DIR", help="compare DIR/<preset>-symbol.json with "
                                                      "the code; exit 1 on a difference")
    parser.add_argument("--preset", action="append", help="only this preset (repeatable)")
    args = parser.parse_args(argv)
    if args.symbols:
        for path in write_preset_symbols(args.symbols, args.preset):
            print("wrote %s" % path)
        return 0
    from .config import list_presets
    status = 0
    for preset in args.preset or list_presets():
        path = os.path.join(args.check, "%s-symbol.json" % preset)
        if not os.path.exists(path):
            print("%s: missing" % path)
            status = 1
            continue
        with open(path) as f:
            lines = graph_diff(f.read(), preset_symbol(preset))
        print("%s: %s" % (path, "up to date" if not lines else "differs"))
        for line in lines:
            print("  " + line)
        status = status or int(bool(lines))
    return status


if __name__ == "__main__":
    sys.exit(main())
