"""INT8 inference: the network graph quantized by MXNet's oneDNN backend, calibrated on images.

    batches = calibration_batches(cfg)                     # [(data, im_info)], test-time inputs
    qsym, qparams, record = quantize_symbol(sym, params, batches, cfg.test.int8)
    block = quantized_block(sym, params, batches, cfg.test.int8)     # a SymbolBlock that runs

In: the float32 inference graph (:func:`mxmask.graph.network_symbol`), its parameters, and
calibration inputs: images of ``test.int8.calib_images`` (default the config's
``data.val_images``), ``calib_num`` of them drawn with ``calib_seed``, resized and normalised
as at test time. Out: a graph whose convolutions and fully connected layers (with the batch
norms, activations and sums oneDNN fuses into them) run in int8 with scales fixed by
calibration (``calib_mode`` naive: the ranges seen; entropy: KL-optimal ranges). The inputs,
outputs and output meaning are the float32 graph's.

What stays float32: the proposal generator (box decoding, top-k and NMS; its padding constant
is -inf, whose calibration range would be infinite), RoIAlign, the detection post-processing,
the deconvolutions (MXNet 1.9.1 has no int8 Deconvolution) but the mask head's, which
:func:`subpixel_deconvolutions` turns into convolutions first, and the nodes named by
``test.int8.exclude`` (fnmatch patterns; the presets say which and why). MXNet's "smart" mode
quantizes only where the int8 data stays int8 between layers.

Calibration is deterministic: the same images, seed and mode give the same graph.
docs/int8.md is the user's page.
"""
import ast
import collections
import contextlib
import fnmatch
import json
import os
import sys
import tempfile
import warnings

import numpy as np

from .utils import UserError

__all__ = ["ALWAYS_FLOAT32", "calibration_images", "calibration_batches", "int8_exclusions",
           "subpixel_deconvolutions", "quantize_symbol", "quantized_block"]

# the graph inputs, in the order of a calibration batch (an image classifier has only "data")
INPUT_NAMES = ("data", "im_info")
# node-name patterns that always stay float32: the proposal generator (see the docstring)
ALWAYS_FLOAT32 = ("*proposalgenerator*",)


# --------------------------------------------------------------------------------------------
# Calibration inputs
# --------------------------------------------------------------------------------------------
def calibration_images(cfg):
    """The calibration image files of a config.

    Args:
        cfg: the config: ``test.int8.calib_images`` (or ``data.val_images`` when empty),
            ``calib_num`` and ``calib_seed``.

    Returns:
        list of paths, sorted: all image files of the folder when it holds at most
        ``calib_num``, else ``calib_num`` of them drawn without replacement with
        ``calib_seed``.

    Raises:
        UserError: the folder is missing or holds no image file.
    """
    from .data.images import list_images
    q = cfg.test.int8
    folder = q.calib_images or cfg.data.val_images
    option = "--calib-images" if q.calib_images else "data.val_images (the calibration default)"
    if not os.path.isdir(folder):
        raise UserError("%s %s: not a folder; pass --calib-images DIR, a folder of images like "
                        "the ones the model will see" % (option, folder))
    paths = list_images([folder])
    if not paths:
        raise UserError("%s %s: holds no image file; pass --calib-images DIR" % (option, folder))
    if len(paths) > q.calib_num:
        rng = np.random.RandomState(q.calib_seed)
        paths = [paths[i] for i in sorted(rng.choice(len(paths), q.calib_num, replace=False))]
    return paths


def calibration_batches(cfg, paths=None):
    """Calibration inputs, one image per batch, as :class:`mxmask.predictor.Predictor` feeds
    the network.

    Args:
        cfg: the config (its test-time input pipeline).
        paths: image files (default :func:`calibration_images`).

    Returns:
        list of ``(data (1, 3, Hp, Wp), im_info (1, 3))`` NDArrays on the CPU; unreadable files
        are skipped.

    Raises:
        UserError: none of the files is a readable image.
    """
    import mxnet as mx
    from .data.images import read_image
    from .data.transforms import TestTransform, batchify_test
    paths = calibration_images(cfg) if paths is None else list(paths)
    transform = TestTransform(cfg)
    batches, problems = [], []
    for path in paths:
        try:
            image = read_image(path)
        except UserError as e:
            problems.append(str(e))
            continue
        data, im_info = transform.apply_image(image)
        b = batchify_test([(data, im_info, 0, np.array(image.shape[:2], np.int64))],
                          cfg.input.size_divisibility)
        batches.append((mx.nd.array(b["data"]), mx.nd.array(b["im_info"])))
    if not batches:
        folder = os.path.dirname(paths[0]) if paths else "(none)"
        raise UserError("%s: none of its %d calibration files is a readable image (%s)"
                        % (folder, len(paths), problems[0] if problems else "no files"))
    return batches


# --------------------------------------------------------------------------------------------
# Quantization
# --------------------------------------------------------------------------------------------
def _inner_nodes(node):
    """The nodes a node of a fused graph stands for: itself, and for a oneDNN subgraph node
    (``_sg_mkldnn_conv``, ...) the operator nodes inside it, those of the float32 graph."""
    nodes = [node]
    for sub in node.get("subgraphs") or ():
        for inner in sub["nodes"]:
            if inner["op"] != "null":
                nodes.extend(_inner_nodes(inner))
    return nodes


def _inner_names(node):
    """The names of :func:`_inner_nodes`."""
    return [n["name"] for n in _inner_nodes(node)]


def _matches(name, pattern):
    """fnmatch of an operator name, whole or without its first part (the network's prefix:
    ``mxmask_`` in exported graphs, Gluon's ``maskrcnn0_`` in this process)."""
    return (fnmatch.fnmatchcase(name, pattern)
            or fnmatch.fnmatchcase(name.split("_", 1)[-1], pattern))


def int8_exclusions(fsym, patterns=()):
    """The nodes of a fused graph kept in float32.

    Args:
        fsym: the graph after ``get_backend_symbol("MKLDNN_QUANTIZE")``.
        patterns: fnmatch patterns of operator names of the float32 graph (those of
            ``symbols/<preset>-symbol.json``, whole or without the network prefix before the
            first ``_``; ``test.int8.exclude``), besides :data:`ALWAYS_FLOAT32`. A fused node
            is kept when any operator inside it matches.

    Returns:
        ``(node names of fsym to exclude, the float32 graph's names they stand for)``.

    Raises:
        UserError: a pattern of ``patterns`` matches no operator (a typo would quietly
        quantize).
    """
    nodes = [n for n in json.loads(fsym.tojson())["nodes"] if n["op"] != "null"]
    every = tuple(ALWAYS_FLOAT32) + tuple(patterns)
    inner = {n["name"]: _inner_names(n) for n in nodes}
    for pattern in patterns:
        if not any(_matches(name, pattern) for names in inner.values() for name in names):
            raise UserError("test.int8.exclude: %r matches no operator of the graph (names "
                            "as in symbols/<preset>-symbol.json, with or without their first "
                            "part, e.g. keypointhead0_score_lowres_fwd)" % pattern)
    excluded, originals = [], []
    for node in nodes:
        hits = [name for name in inner[node["name"]] if any(_matches(name, p) for p in every)]
        if hits:
            excluded.append(node["name"])
            originals.extend(hits)
    return excluded, originals


# --------------------------------------------------------------------------------------------
# Sub-pixel deconvolutions
# --------------------------------------------------------------------------------------------
def _attr(node, key, default):
    """A node attribute as a Python value (``"(2, 2)"`` -> (2, 2), ``"True"`` -> True)."""
    value = (node.get("attrs") or {}).get(key)
    return default if value is None else ast.literal_eval(value)


def _conv1x1(node):
    """Whether ``node`` is a 1x1, stride-1, unpadded, undilated NCHW Convolution."""
    return (node["op"] == "Convolution" and tuple(_attr(node, "kernel", ())) == (1, 1)
            and tuple(_attr(node, "stride", (1, 1))) == (1, 1)
            and tuple(_attr(node, "pad", (0, 0))) == (0, 0)
            and tuple(_attr(node, "dilate", (1, 1))) == (1, 1)
            and (node.get("attrs") or {}).get("layout", "NCHW") == "NCHW")


# node ids of one chain deconvolution [-> bias conv] -> ReLU -> predictor -> class pick; bias: the
# bias variable or None; dropped: the bias conv and its unit-weight nodes, gone after the rewrite
_SubpixelChain = collections.namedtuple("_SubpixelChain",
                                        "deconv bias dropped predictor gather")


def _subpixel_matches(nodes, consumers):
    """The chains deconvolution 2x2/2 [-> bias conv] -> ReLU -> 1x1 predictor -> gather_nd (the
    class pick of :func:`~mxmask.modeling.roi_heads.select_class_masks`) of a graph, as
    :data:`_SubpixelChain` s."""
    def sole(i):
        return consumers[i][0] if len(consumers[i]) == 1 else None

    def var(i):
        return i if nodes[i]["op"] == "null" else None

    found = []
    for i, n in enumerate(nodes):
        if n["op"] != "Deconvolution" or not (
                tuple(_attr(n, "kernel", ())) == (2, 2)
                and tuple(_attr(n, "stride", ())) == (2, 2)
                and tuple(_attr(n, "pad", (0, 0))) == (0, 0)
                and tuple(_attr(n, "adj", (0, 0))) == (0, 0)
                and tuple(_attr(n, "dilate", (1, 1))) == (1, 1)
                and tuple(_attr(n, "target_shape", ())) in ((), (0, 0))
                and _attr(n, "num_group", 1) == 1
                and n.get("attrs", {}).get("layout", "NCHW") == "NCHW"
                and var(n["inputs"][1][0]) is not None):
            continue
        bias = None if _attr(n, "no_bias", False) else var(n["inputs"][2][0])
        dropped, j = [], sole(i)
        if j is None:
            continue
        # Deconv2D's bias: a depthwise 1x1 conv, unit weights BlockGrad(ones_like(Reshape(b)))
        if bias is None and _conv1x1(nodes[j]) and len(nodes[j]["inputs"]) == 3 and \
                _attr(nodes[j], "num_group", 1) == _attr(nodes[j], "num_filter", 0):
            chain, k = [], nodes[j]["inputs"][1][0]
            for op in ("BlockGrad", "ones_like", "Reshape"):
                chain.append(k)
                k = nodes[k]["inputs"][0][0] if nodes[k]["op"] == op else None
                if k is None:
                    break
            if k is not None and var(k) == nodes[j]["inputs"][2][0]:
                bias, dropped = k, [j] + chain
                j = sole(j)
        if j is None or nodes[j]["op"] != "Activation" or \
                (nodes[j].get("attrs") or {}).get("act_type") != "relu":
            continue
        k = sole(j)
        if k is None or not _conv1x1(nodes[k]) or _attr(nodes[k], "num_group", 1) != 1 or \
                nodes[k]["inputs"][0][0] != j or var(nodes[k]["inputs"][1][0]) is None:
            continue
        q = sole(k)
        if q is None or nodes[q]["op"] != "gather_nd" or nodes[q]["inputs"][0][0] != k:
            continue
        found.append(_SubpixelChain(i, bias, dropped, k, q))
    return found


def _pick_subpixels(num_classes, name):
    """The class pick of a sub-pixel predictor output: ``(__z (N, 4K, P, P), __idx (2, N)
    [row, class]) -> (N, 2P, 2P)``, the class's four sub-pixel planes gathered (channels
    ``g*K + class``, g = 0..3) and put in place by ``depth_to_space``."""
    import mxnet as mx
    z, idx = mx.sym.var("__z"), mx.sym.var("__idx")
    step = mx.sym.reshape(mx.sym.arange(start=0, stop=4, name=name + "_group") * num_classes,
                          shape=(1, 1, 4))                                        # (1, 1, 4)
    offsets = mx.sym.concat(mx.sym.zeros_like(step), step, dim=0)               # (2, 1, 4)
    idx4 = mx.sym.broadcast_add(mx.sym.expand_dims(idx, axis=2), offsets)       # (2, N, 4)
    picked = mx.sym.gather_nd(z, idx4, name=name)                               # (N, 4, P, P)
    return mx.sym.reshape(mx.sym.depth_to_space(picked, block_size=2, name=name + "_d2s"),
                          shape=(-3, 0, 0), name=name + "_subpixel")             # (N, 2P, 2P)


def subpixel_deconvolutions(sym, values):
    """The same graph with each ``Deconvolution`` 2x2/stride 2 (the mask head's), followed by a
    ReLU, a 1x1 convolution (the mask predictor) and the pick of each roi's class
    (``gather_nd``), as a 1x1 convolution to 4C channels, the ReLU, the predictor as a grouped
    1x1 convolution over the 4 sub-pixel positions, the pick of the class's four planes and
    ``depth_to_space``: the same function, with every weight layer quantizable (MXNet 1.9.1
    has no int8 ``Deconvolution``), and no float32 map larger than the picked masks.

    A 2x2/2 deconvolution writes each input pixel's four output pixels on its own:
    ``y[o, 2i+a, 2j+b] = sum_c x[c, i, j] W[c, o, a, b]``, so channel ``(2a+b)*C + o`` of the
    1x1 convolution with weights ``W.transpose(2, 3, 1, 0)`` is that pixel, and ``depth_to_space``
    (MXNet's order: channel ``(a*2 + b)*K + k`` -> output channel k, offset (a, b)) puts it
    back. The rewritten nodes keep their names (``test.int8.exclude`` still matches them).
    Other deconvolutions (the keypoint head's 4x4, a mask head whose deconvolution feeds
    something else) are left alone.

    Args:
        sym: a float32 graph.
        values: ``name -> NDArray`` of its parameters.

    Returns:
        ``(sym, values)``: the graph and its parameters (new ``*_subpixel_*`` ones for the
        rewritten layers); the same objects when there is no such chain.
    """
    import mxnet as mx
    graph = json.loads(sym.tojson())
    nodes = graph["nodes"]
    consumers = [[] for _ in nodes]
    for i, n in enumerate(nodes):
        for e in n["inputs"]:
            consumers[e[0]].append(i)
    for e in graph["heads"]:
        consumers[e[0]].append(-1)
    matches = _subpixel_matches(nodes, consumers)
    if not matches:
        return sym, values
    values = dict(values)
    at = {m.deconv: m for m in matches}
    predictors = {m.predictor for m in matches}
    gathers = {m.gather: m for m in matches}
    skipped = {d for m in matches for d in m.dropped}
    new, index, made = [], {}, {}

    def add(node):
        new.append(node)
        return len(new) - 1

    def param(name, array):
        # one variable per name: a head traced twice (the same weights) uses it twice
        if name not in made:
            values[name] = mx.nd.array(array, dtype="float32")
            attrs = {"__shape__": str(tuple(array.shape)), "__dtype__": "0"}
            made[name] = add({"op": "null", "name": name, "inputs": [], "attrs": attrs})
        return made[name]

    def remap(inputs):
        return [[index[e[0]], e[1], 0] for e in inputs]

    def conv1x1(n, x, w, b, groups):
        base = nodes[n["inputs"][1][0]]["name"][:-len("weight")]
        attrs = {"kernel": "(1, 1)", "num_filter": str(w.shape[0]), "no_bias": "False"}
        if groups > 1:
            attrs["num_group"] = str(groups)
        return add({"op": "Convolution", "name": n["name"], "attrs": attrs,
                    "inputs": x + [[param(base + "subpixel_weight", w), 0, 0],
                                   [param(base + "subpixel_bias", b), 0, 0]]})

    for i, n in enumerate(nodes):
        if i in skipped:
            continue
        if i in at:                       # the deconvolution -> 1x1 conv to 4C channels
            bias = at[i].bias
            w = values[nodes[n["inputs"][1][0]]["name"]].asnumpy()     # (Cin, C, 2, 2)
            cin, c = w.shape[:2]
            b = values[nodes[bias]["name"]].asnumpy() if bias is not None else np.zeros(c)
            index[i] = conv1x1(n, remap(n["inputs"][:1]),
                               w.transpose(2, 3, 1, 0).reshape(4 * c, cin, 1, 1),
                               np.tile(b, 4), 1)
            for d in at[i].dropped:
                index[d] = index[i]
        elif i in predictors:             # the predictor -> grouped over the 4 positions
            w = values[nodes[n["inputs"][1][0]]["name"]].asnumpy()     # (K, C, 1, 1)
            b = (values[nodes[n["inputs"][2][0]]["name"]].asnumpy()
                 if not _attr(n, "no_bias", False) else np.zeros(w.shape[0]))
            index[i] = conv1x1(n, remap(n["inputs"][:1]), np.tile(w, (4, 1, 1, 1)),
                               np.tile(b, 4), 4)
        elif i in gathers:                # the class pick -> four planes + depth_to_space
            k = nodes[gathers[i].predictor]
            num_classes = values[nodes[k["inputs"][1][0]]["name"]].shape[0]
            sub = json.loads(_pick_subpixels(num_classes, n["name"]).tojson())
            local = {}
            for si, sn in enumerate(sub["nodes"]):
                if sn["op"] == "null":
                    source = n["inputs"][0] if sn["name"] == "__z" else n["inputs"][1]
                    local[si] = (index[source[0]], source[1])
                    continue
                sn = dict(sn, inputs=[[local[e[0]][0], local[e[0]][1] + e[1], 0]
                                      for e in sn["inputs"]])
                local[si] = (add(sn), 0)
            index[i] = local[sub["heads"][0][0]][0]
        else:
            index[i] = add(dict(n, inputs=remap(n["inputs"])))
    graph = {"nodes": new, "arg_nodes": [i for i, n in enumerate(new) if n["op"] == "null"],
             "heads": [[index[e[0]], e[1], 0] for e in graph["heads"]],
             "attrs": graph.get("attrs", {})}
    out = mx.sym.load_json(json.dumps(graph))
    used = set(out.list_arguments()) | set(out.list_auxiliary_states())
    return out, {k: v for k, v in values.items() if k in used}


def _collect(fsym, args, auxs, batches, collector, input_names):
    """Run the float32 graph on every batch with ``collector`` watching every node output."""
    import mxnet as mx
    for batch in batches:
        values = dict(args)
        values.update(zip(input_names, batch))
        exe = fsym.bind(mx.cpu(), args=values, aux_states=auxs, grad_req="null")
        exe.set_monitor_callback(collector.collect, monitor_all=True)
        exe.forward(is_train=False)
        for out in exe.outputs:
            out.wait_to_read()
        del exe


def _check_ranges(fsym, ranges):
    """UserError naming the first node whose calibrated range is not finite, and the layers
    that take its output (those are what would be quantized with it: keep them float32)."""
    nodes = json.loads(fsym.tojson())["nodes"]
    index = {n["name"]: i for i, n in enumerate(nodes)}
    for key, value in ranges.items():
        low, high = float(value[0]), float(value[1])
        if np.isfinite(low) and np.isfinite(high):
            continue
        node = key[:-len("_output")] if key.endswith("_output") else key
        op = nodes[index[node]]["op"] if node in index else "?"
        users = [_inner_nodes(n)[-1]["name"] for n in nodes
                 if any(e[0] == index.get(node) for e in n.get("inputs", []))]
        if not users and node in index:           # a graph output: the node itself
            users = [_inner_nodes(nodes[index[node]])[-1]["name"]]
        raise UserError("the graph cannot be quantized: node %s (operator %s) has the "
                        "calibration range [%g, %g]; keep the layers that take it float32: "
                        "--set 'test.int8.exclude=[%s]'"
                        % (_display(node, nodes[index[node]] if node in index else None),
                           op, low, high, ", ".join(users or [node])))


def _display(name, node):
    """A fused node's name for a message: the float32 graph's operators inside it."""
    if node is None or not node.get("subgraphs"):
        return name
    return "%s (%s)" % (name, ", ".join(_inner_names(node)[1:]))


def quantize_symbol(sym, params, batches, settings, input_names=INPUT_NAMES):
    """Quantize and calibrate a graph.

    Args:
        sym: the float32 graph, inputs ``data`` (B, 3, H, W) and ``im_info`` (B, 3) (or only
            ``data``, for a classifier).
        params: a ``ParameterDict`` or a dict ``name -> NDArray`` with its values.
        batches: calibration inputs, tuples in the order of ``input_names``
            (:func:`calibration_batches`).
        settings: ``test.int8`` (``calib_mode``, ``exclude``).
        input_names: the graph's inputs (default :data:`INPUT_NAMES`; a part of the network,
            as ``mxmask bench`` times int8 stages, has others).

    Returns:
        ``(qsym, {"arg:NAME" / "aux:NAME": NDArray}, record)``: the calibrated int8 graph, its
        parameter file's content, and ``record`` with ``excluded`` (nodes kept float32),
        ``quantized`` (names of the int8 operator nodes), ``calib_mode``, ``calib_num`` and
        ``granularity``.

    Raises:
        UserError: MXNet cannot quantize the graph, or a layer's range is not finite; the
        message names the operator.
    """
    import mxnet as mx
    from mxnet.contrib import quantization as q
    arg_names, aux_names = set(sym.list_arguments()), set(sym.list_auxiliary_states())
    values = {k: (v if isinstance(v, mx.nd.NDArray) else v.data())
              for k, v in params.items() if k in arg_names or k in aux_names}
    sym, values = subpixel_deconvolutions(sym, values)
    arg_names = set(sym.list_arguments())
    args = {k: v for k, v in values.items() if k in arg_names}
    auxs = {k: v for k, v in values.items() if k in aux_names}
    fsym = sym.get_backend_symbol("MKLDNN_QUANTIZE")
    excluded, excluded_names = int8_exclusions(fsym, settings.exclude)
    log = []
    try:
        with warnings.catch_warnings(), _native_log(log):
            warnings.simplefilter("ignore")
            qsym, _, _, collector = q.quantize_graph(
                sym=fsym, arg_params=args, aux_params=auxs, ctx=mx.cpu(),
                excluded_sym_names=excluded, calib_mode=settings.calib_mode,
                quantized_dtype="auto", quantize_mode="smart",
                quantize_granularity=settings.granularity)
            _collect(fsym, args, auxs, batches, collector, input_names)
    except mx.base.MXNetError as err:
        raise UserError("the graph cannot be quantized: %s"
                        % _mxnet_reason(err)) from None
    ranges = collector.min_max_dict if settings.calib_mode == "naive" else {
        k: (v[2], v[3]) for k, v in collector.hist_dict.items()}
    # entropy: np.histogram refuses a non-finite range, and MXNet's monitor callback swallows
    # the error, so such a layer has no histogram at all (and would quietly go uncalibrated)
    ranges = dict(ranges, **{k: (np.nan, np.nan) for k in collector.include_layer
                             if k not in ranges})
    _check_ranges(fsym, ranges)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qsym, qargs, qauxs = q.calib_graph(qsym, args, auxs, collector,
                                           calib_mode=settings.calib_mode,
                                           quantized_dtype="auto", logger=None)
    with _native_log(log):
        qsym = qsym.get_backend_symbol("MKLDNN_QUANTIZE")
    quantized = []
    for node in json.loads(qsym.tojson())["nodes"]:
        if node["op"] != "null" and node["name"].startswith("quantized_"):
            quantized.extend(n["name"] for n in _inner_nodes(node)
                             if n["op"] in ("Convolution", "FullyConnected"))
    used = set(qsym.list_arguments()) | set(qsym.list_auxiliary_states())
    out = {"arg:" + k: v for k, v in qargs.items() if k in used}
    out.update({"aux:" + k: v for k, v in qauxs.items() if k in used})
    record = {"excluded": [n for n in excluded_names if not _always(n)], "quantized": quantized,
              "calib_mode": settings.calib_mode, "calib_num": len(batches),
              "granularity": settings.granularity}
    return qsym, out, record


@contextlib.contextmanager
def _native_log(lines):
    """Capture what MXNet's C++ side prints on stderr (the quantization pass logs every node it
    leaves out, the executor every oneDNN partition) into ``lines``, instead of the terminal."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)
            lines.extend(log.read().decode("utf-8", "replace").splitlines())


def _always(name):
    """Whether ``name`` matches :data:`ALWAYS_FLOAT32`."""
    return any(_matches(name, p) for p in ALWAYS_FLOAT32)


def _mxnet_reason(err):
    """The last line of an MXNetError's text, without the C++ stack."""
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(err).__name__)[:300]


def quantized_block(sym, params, batches, settings, input_names=INPUT_NAMES):
    """:func:`quantize_symbol` as a block that runs (same arguments).

    Returns:
        ``(SymbolBlock on the CPU, record)``; run once on the first calibration input.
    """
    import mxnet as mx
    qsym, values, record = quantize_symbol(sym, params, batches, settings, input_names)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Cannot decide type")
        block = mx.gluon.SymbolBlock(qsym, [mx.sym.var(n)
                                            for n in input_names[:len(batches[0])]])
    block.collect_params().load_dict({k.split(":", 1)[1]: v for k, v in values.items()},
                                     ctx=mx.cpu(), cast_dtype=True, dtype_source="saved")
    block.hybridize(static_alloc=True)
    block(*batches[0])
    return block, record
