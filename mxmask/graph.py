"""The inference graph of a network: traced, compared, optimised, and the shipped presets' graphs.

    network_symbol(build_export_net(cfg))            -> mx.sym.Group, inputs data, im_info
    optimized_block(sym, params, data, im_info, fuse=True, dtype="bfloat16")  -> SymbolBlock
    optimized_block(sym, params, data, im_info, dtype="int8", calib=batches, int8=cfg.test.int8)
    graph_diff(old_json, new_json)                   -> readable lines, [] when equal
    write_preset_symbols("symbols/")                 -> symbols/<preset>-symbol.json

In: a :class:`~mxmask.modeling.rcnn.MaskRCNN` (or a config). Out: its graph with inputs ``data``
(B, 3, H, W) normalised RGB and ``im_info`` (B, 3) = (h, w, scale) and outputs named ``ids``,
``scores``, ``boxes`` [, ``masks``] [, ``keypoints``, ``heatmaps``] (DEVELOPING.md, "Network
outputs"). Parameter names never depend on Gluon's name counters (fixed prefix ``mxmask_``);
variable attributes that only matter for training are dropped; operator nodes Gluon names alike
get ``_1``, ``_2``... suffixes, because the AMP pass selects nodes by name.

``optimized_block`` is what ``mxmask export --fuse --dtype``, ``mxmask predict --fuse`` and
``mxmask bench`` run: MKLDNN fusion (``optimize_for(backend="MKLDNN")``) and/or bfloat16
(``amp.convert_hybrid_block`` first, then fusion; DEVELOPING.md, "Measured facts about MXNet
1.9.1 on CPU", has the order and the AMP pass's bug that :func:`bf16_fp32_exclusions` works
around), or int8 (:mod:`mxmask.quantize`). ``python -m mxmask.graph --symbols symbols/``
rewrites the committed preset graphs, ``--check symbols/`` compares them with the code
(tests/test_graph_symbols.py runs the same check).
"""
import argparse
import difflib
import json
import os
import sys
import warnings

from .utils import UserError, atomic_write_text

__all__ = ["EXPORT_PREFIX", "INPUT_NAMES", "DTYPES", "check_dtype", "parse_hw",
           "check_anchors_cover", "build_export_net", "network_symbol", "graph_json_text",
           "preset_config", "preset_symbol", "write_preset_symbols", "graph_diff",
           "bf16_fp32_exclusions", "param_dict", "symbol_block", "optimized_block", "main"]

# the fixed parameter prefix of exported graphs, their inputs, and the values of --dtype
EXPORT_PREFIX = "mxmask_"
INPUT_NAMES = ("data", "im_info")
DTYPES = ("float32", "bfloat16", "int8")
# variable attributes that describe training, not the graph (``__init__`` of a constant holds
# ``id(...)`` of a Python object, so it changes on every build)
_VOLATILE_VAR_ATTRS = ("__init__", "__lr_mult__", "__wd_mult__")


def check_dtype(dtype, ctxs=None, fuse=False):
    """Check a ``--dtype`` (and the contexts of an optimised graph).

    Args:
        dtype: the value.
        ctxs: the contexts it will run on, when known.
        fuse: MKLDNN fusion is asked for too.

    Raises:
        UserError: naming ``--dtype`` unless ``dtype`` is one of :data:`DTYPES`; naming
        ``--ctx`` when the graph is optimised (``fuse`` or a ``dtype`` other than float32) and
        ``ctxs`` is not one CPU context: MKLDNN graphs and oneDNN's int8 kernels run on the CPU.
    """
    if dtype not in DTYPES:
        raise UserError("--dtype %s: expected one of %s" % (dtype, ", ".join(DTYPES)))
    optimised = fuse or dtype != "float32"
    if optimised and ctxs is not None and (len(ctxs) != 1 or ctxs[0].device_type != "cpu"):
        what = ("--dtype int8 runs oneDNN's int8 kernels" if dtype == "int8" else
                "--fuse / --dtype bfloat16 build an MKLDNN graph, which runs")
        raise UserError("%s on one CPU context; got --ctx %s"
                        % (what, ",".join(str(c) for c in ctxs)))


def parse_hw(text):
    """Parse a ``--size``.

    Args:
        text: ``"HxW"`` (case and spaces ignored).

    Returns:
        (H, W) integers, not checked further.

    Raises:
        UserError: naming ``--size`` when it is not two integers.
    """
    parts = str(text).lower().replace(" ", "").split("x")
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise UserError("--size %s: expected HxW, e.g. 800x1344" % text)
    return h, w


def check_anchors_cover(text, hw, cfg, remedy="set by input.max_size_train/max_size_test"):
    """Check that the anchor constants of ``cfg`` cover an input size.

    Args:
        text: the ``--size`` text, for the message.
        hw: (H, W).
        cfg: the config (:func:`mxmask.modeling.rpn.anchor_max_size`).
        remedy: what lifts the limit, for the message.

    Raises:
        UserError: naming ``--size text`` when ``max(hw)`` is larger than the anchors cover.
    """
    from .modeling.rpn import anchor_max_size
    biggest = anchor_max_size(cfg)
    if max(hw) > biggest:
        raise UserError("--size %s: larger than %d, the largest input the model's anchors cover "
                        "(%s)" % (text, biggest, remedy))


# --------------------------------------------------------------------------------------------
# The graph
# --------------------------------------------------------------------------------------------
def build_export_net(cfg):
    """The network of ``cfg`` with the fixed prefix ``mxmask_``, so that parameter names never
    depend on Gluon's name counters.

    Args:
        cfg: the config.

    Returns:
        a ``MaskRCNN``, parameters not initialised.
    """
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


def network_symbol(net, kernels="mxnet"):
    """The inference graph of a network, traced in predict mode.

    MXNet's own operators by default, whatever ``net.kernels`` says: an exported graph must run
    without mxmask. Needs no parameter values.

    Args:
        net: a :class:`~mxmask.modeling.rcnn.MaskRCNN` (:func:`build_export_net` for stable
            parameter names).
        kernels: ``"mxnet"``, or ``"mxmask"`` for a graph that runs in this process with the
            compiled RoIAlign and NMS (:meth:`~mxmask.modeling.rcnn.MaskRCNN.use_kernels`;
            the same outputs).

    Returns:
        a Symbol with inputs ``data`` (B, 3, H, W) and ``im_info`` (B, 3) and one output per
        name in ``net.output_names``, each an ``identity`` node of that name
        (``sym.list_outputs()`` gives ``ids_output``, ...); normalised as the module docstring
        says.

    Raises:
        RuntimeError: the network returns a different number of outputs than it names.
    """
    import mxnet as mx
    kernels, net.kernels = net.kernels, kernels      # tracing a Symbol uses no cached graph
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
    """The text of a graph file, one node per line, keys sorted: stable and diff-friendly.

    Args:
        sym_or_json: a Symbol, its json text or the parsed dict.

    Returns:
        the json text (ending with a newline); it loads with ``mx.sym.load``.
    """
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
    """The config a preset's shipped graph is built from.

    Args:
        preset: a preset name.

    Returns:
        the preset's config; ``shapes`` gets the synthetic dataset's classes and keypoints
        (``mxmask.data.shapes.CATEGORIES`` / ``KEYPOINT_NAMES``), which training fills in
        from the data; the other presets are used as they are.
    """
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
    """The inference graph of a preset (:func:`network_symbol` of :func:`preset_config`),
    built from the code; no weights needed."""
    return network_symbol(build_export_net(preset_config(preset)))


def write_preset_symbols(out_dir, presets=None):
    """Write the preset graphs (``symbols/``).

    Args:
        out_dir: the folder, made when missing.
        presets: preset names (default: every preset).

    Returns:
        the paths written, ``<out_dir>/<preset>-symbol.json`` (:func:`graph_json_text`).
    """
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
    """A Symbol, json text or dict -> the graph's dict."""
    if isinstance(g, dict):
        return g
    if hasattr(g, "tojson"):
        return json.loads(g.tojson())
    return json.loads(g)


def _desc(node):
    """What aligns two nodes: (op, variable name or "", sorted attributes)."""
    attrs = tuple(sorted((node.get("attrs") or {}).items()))
    return (node["op"], node["name"] if node["op"] == "null" else "", attrs)


def _label(node):
    """``name (op)`` or ``name (variable)``, for the diff lines."""
    return "%s (%s)" % (node["name"], "variable" if node["op"] == "null" else node["op"])


def graph_diff(old, new, limit=40):
    """Differences between two graphs as readable lines (the diff of
    tests/test_graph_symbols.py).

    Nodes are aligned in topological order by (op, variable name, attributes); operator node
    names are not compared (they carry Gluon's counters), variable names are (they must match
    the parameter files).

    Args:
        old, new: the graphs (Symbol, json text or dict).
        limit: the most lines returned; the rest are counted in a last line.

    Returns:
        list of str: added and removed nodes, changed attributes (key, old, new), inputs that
        now come from another node, and changed outputs; [] when they are the same graph.
    """
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
    """The diff lines of two aligned nodes: changed attributes, a renamed variable."""
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
    """The nodes to pin to fp32 so that MXNet 1.9.1's AMP pass converts ``sym`` consistently.

    An operator that runs in either precision, whose fp32 input was also cast to bf16 for
    another consumer, is recorded as producing bf16 while it still computes fp32, and the next
    convolution fails (DEVELOPING.md, "Measured facts about MXNet 1.9.1 on CPU"). Each node's
    precision is predicted as the pass decides it: variables fp32; lp16 ops (Convolution,
    FullyConnected, Deconvolution) bf16; fp32 ops, the conditional ones that match and
    ``excluded`` names fp32; widest-type ops bf16 only when all inputs are bf16; others follow
    their first input.

    Args:
        sym: the graph (Symbol, json text or dict).
        excluded: node names already kept in fp32.

    Returns:
        the names of the ops of ``amp.list_lp16_fp32_ops`` whose data input will be fp32 after
        the conversion, and of the grouped deconvolutions (:func:`_bf16_op_lists`).
    """
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
    moved to bf16. AMP keeps it fp32 because its bf16 *backward* crashes (DEVELOPING.md,
    "Measured facts about MXNet 1.9.1 on CPU"; docs/training.md, "Mixed precision"), but an
    inference graph has no backward, and its forward runs on oneDNN's bf16 kernels. A grouped
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


def param_dict(sym, params):
    """The parameter file's content for a graph.

    Args:
        sym: the graph.
        params: a ``ParameterDict`` holding (at least) every parameter ``sym`` uses.

    Returns:
        ``{"arg:<name>" or "aux:<name>": NDArray}`` for ``mx.nd.save``, the parameters
        ``sym`` uses.

    Raises:
        RuntimeError: the graph needs a parameter ``params`` lacks.
    """
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


def symbol_block(sym, params):
    """The graph as a block that runs.

    Args:
        sym: the graph, inputs ``data`` and ``im_info``.
        params: a ``ParameterDict`` with the values (:func:`param_dict`).

    Returns:
        a ``SymbolBlock`` on the CPU holding the values.
    """
    import mxnet as mx
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Cannot decide type")
        block = mx.gluon.SymbolBlock(sym, [mx.sym.var(n) for n in INPUT_NAMES])
    values = {k.split(":", 1)[1]: v for k, v in param_dict(sym, params).items()}
    block.collect_params().load_dict(values, ctx=mx.cpu())
    return block


def optimized_block(sym, params, data, im_info, fuse=False, dtype="float32", calib=None,
                    int8=None):
    """The network graph as ``mxmask export --fuse --dtype`` writes it, ready to run.

    bfloat16: converted (with :func:`bf16_fp32_exclusions`) and/or MKLDNN-fused, in that order:
    in the other order nothing runs in bfloat16 (DEVELOPING.md, "Measured facts about MXNet
    1.9.1 on CPU"). int8: quantized, calibrated and fused by :mod:`mxmask.quantize` (``fuse``
    is implied). Runs once on the example inputs, which trace the graph; the block takes other
    sizes afterwards.

    Args:
        sym: the network graph (:func:`network_symbol`).
        params: a ``ParameterDict`` with its values.
        data, im_info: example inputs, (B, 3, H, W) and (B, 3) NDArrays on the CPU.
        fuse: MKLDNN fusion (``optimize_for(backend="MKLDNN")``).
        dtype: one of :data:`DTYPES`.
        calib: int8: the calibration inputs (:func:`mxmask.quantize.calibration_batches`).
        int8: int8: the settings (``cfg.test.int8``).

    Returns:
        ``(block, record)``: ``record["float32_nodes"]`` names the nodes kept in float32 (bf16:
        :func:`bf16_fp32_exclusions`; int8: ``test.int8.exclude``'s), and for int8 the rest of
        :func:`mxmask.quantize.quantize_symbol`'s record.
    """
    if dtype == "int8":
        from .quantize import quantized_block
        block, record = quantized_block(sym, params, calib, int8)
        block(data, im_info)
        return block, dict(record, float32_nodes=record["excluded"])
    pinned = []
    with warnings.catch_warnings():
        # SymbolBlocks warn that the graph inputs have no declared type (they are fp32)
        warnings.filterwarnings("ignore", message="Cannot decide type")
        block = symbol_block(sym, params)
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
    return block, {"float32_nodes": pinned}


# --------------------------------------------------------------------------------------------
# python -m mxmask.graph --symbols symbols/
# --------------------------------------------------------------------------------------------
def main(argv=None):
    """``python -m mxmask.graph --symbols DIR [--preset P ...]``: write the preset graphs;
    ``--check DIR``: compare the graphs in DIR with the code and print the differences.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        the exit code: 1 when ``--check`` finds a missing or differing graph, else 0.
    """
    parser = argparse.ArgumentParser(prog="python -m mxmask.graph",
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
