"""Multiply-accumulate (MAC) counts of an MXNet graph, from the graph and its inferred shapes.

    count_macs(sym, {"data": (1, 3, 800, 1344), "im_info": (1, 3)}, groups={...})
    count_block_macs(block, {"data": (1, 3, 224, 224)})

What goes in: a Symbol (or a HybridBlock, traced on ``mx.sym.var`` inputs in predict mode) and the
shapes of its inputs; optionally known parameter shapes and ``groups`` ``{group: [name prefix,
...]}``. What comes out: ``{"total": MACs, "by_op": {op: MACs}, "by_group": {group: MACs},
"layers": [(node name, op, MACs), ...]}`` (integers; one MAC is one multiply and one add, so
FLOPs = 2 * MACs).

Only Convolution, Deconvolution and FullyConnected nodes are counted (:func:`count_macs` has the
formulas), the usual convention for GMAC figures: ResNet-50 at 224x224 gives 4,089,184,256.
Count the plain graph, before ``optimize_for``: fused ``_sg_mkldnn_*`` nodes are not looked into.
"""
import json

import numpy as np

__all__ = ["COUNTED_OPS", "count_macs", "count_block_macs"]

COUNTED_OPS = ("Convolution", "Deconvolution", "FullyConnected")


def _prod(shape):
    """The product of a shape's dimensions as a Python int (int64 arithmetic)."""
    return int(np.prod([int(v) for v in shape], dtype=np.int64))


def _entry_shapes(sym, shapes, param_shapes):
    """``(graph json nodes, {(node id, output index): shape})`` for every node output of ``sym``.

    Operator nodes are renamed ``n<id>`` first, because Gluon graphs may hold several nodes with
    the same name (a block called once per FPN level) and ``get_internals`` names outputs by node
    name."""
    import mxnet as mx
    js = json.loads(sym.tojson())
    nodes = js["nodes"]
    for nid, node in enumerate(nodes):
        if node["op"] != "null":
            node["name"] = "n%d" % nid
    internals = mx.sym.load_json(json.dumps(js)).get_internals()
    known = dict(param_shapes or {})
    known.update(shapes)
    args = set(internals.list_arguments()) | set(internals.list_auxiliary_states())
    given = {k: tuple(v) for k, v in known.items()
             if k in args and all(int(d) > 0 for d in v)}
    _, out_shapes, _ = internals.infer_shape_partial(**given)
    by_name = dict(zip(internals.list_outputs(), out_shapes))
    entries = {}
    for nid, node in enumerate(nodes):
        if node["op"] == "null":
            if node["name"] in by_name:
                entries[(nid, 0)] = by_name[node["name"]]
            continue
        single = node["name"] + "_output"
        if single in by_name:
            entries[(nid, 0)] = by_name[single]
        k = 0
        while "%s_output%d" % (node["name"], k) in by_name:
            entries[(nid, k)] = by_name["%s_output%d" % (node["name"], k)]
            k += 1
    return nodes, entries


def count_macs(sym, shapes, groups=None, param_shapes=None):
    """MACs of the Convolution, Deconvolution and FullyConnected nodes of ``sym``.

    Counted, per node, from the node's weight shape and its inferred input/output shapes:

        Convolution      N * C_out * prod(output spatial) * (C_in / groups) * prod(kernel)
                         = prod(output shape) * prod(weight.shape[1:])  (groups are in the weight)
        Deconvolution    N * C_in * prod(input spatial) * (C_out / groups) * prod(kernel)
                         = prod(input shape) * prod(weight.shape[1:])   (every input pixel
                         scatters one kernel window into every output channel of its group)
        FullyConnected   rows * num_hidden * in_features = prod(output shape) * weight.shape[1]

    Nothing else is counted: bias additions, normalisation, activations, pooling, RoIAlign,
    resizing, box decoding, NMS and other element-wise work are left out. MKLDNN-fused subgraph
    nodes (``_sg_mkldnn_*``) are not looked into, so count before ``optimize_for``.

    The shapes are the graph's own fixed shapes, so the RoI heads are counted on the roi counts
    built into the graph, not on how many rois hold a detection: in mxmask's inference graph the
    box head runs on ``model.rpn.post_nms_topk_test`` proposals per image and the mask and
    keypoint heads on ``test.max_dets`` detections per image; in GluonCV's, the box head on
    ``_rpn_test_post_nms`` proposals and the mask head on ``_rcnn_max_dets`` detections.

    Args:
        sym (mx.sym.Symbol): the graph.
        shapes (dict): ``{input name: shape}``; every input's shape.
        groups (dict or None): ``{group: [name prefix, ...]}``. A node goes to the first group
            holding a prefix that the node's (original) name or its weight's name starts with
            (so a group can be given as the parameter names of a sub-block, which also works for
            layers that Gluon named outside the block's name scope); nodes matching no group go
            to ``"other"`` (present only when non-zero).
        param_shapes (dict or None): parameter shapes that shape inference cannot derive
            (constants).

    Returns:
        dict: ``{"total": int, "by_op": {op: int}, "by_group": {group: int},
        "layers": [(node name, op, MACs), ...]}``.

    Raises:
        ValueError: when a counted node's shape stays unknown.
    """
    original = [n["name"] for n in json.loads(sym.tojson())["nodes"]]
    nodes, entries = _entry_shapes(sym, shapes, param_shapes)
    groups = groups or {}
    total, by_op, by_group, layers = 0, {}, {g: 0 for g in groups}, []
    for nid, node in enumerate(nodes):
        op = node["op"]
        if op not in COUNTED_OPS:
            continue
        name = original[nid]
        data_entry, weight_entry = node["inputs"][0], node["inputs"][1]
        weight = entries.get((weight_entry[0], weight_entry[1]))
        out = entries.get((nid, 0))
        data = entries.get((data_entry[0], data_entry[1]))
        needed = [weight, data if op == "Deconvolution" else out]
        if any(s is None or not len(s) or 0 in s for s in needed):
            raise ValueError("count_macs: the shape of node %s (%s) could not be inferred; give "
                             "every input shape" % (name, op))
        if op == "Convolution":
            macs = _prod(out) * _prod(weight[1:])
        elif op == "Deconvolution":
            macs = _prod(data) * _prod(weight[1:])
        else:
            macs = _prod(out) * int(weight[1])
        total += macs
        by_op[op] = by_op.get(op, 0) + macs
        weight_name = nodes[weight_entry[0]]["name"]
        group = next((g for g, prefixes in groups.items()
                      if any(name.startswith(p) or weight_name.startswith(p)
                             for p in prefixes)), "other")
        by_group[group] = by_group.get(group, 0) + macs
        layers.append((name, op, macs))
    return {"total": total, "by_op": by_op, "by_group": by_group, "layers": layers}


def count_block_macs(block, shapes, groups=None):
    """:func:`count_macs` of a HybridBlock traced in predict mode.

    Args:
        block (HybridBlock): called on symbol variables named after the keys of ``shapes``, in
            that order. Parameter shapes that are already known (initialised or declared) are
            passed to :func:`count_macs`.
        shapes (dict): ``{input name: shape}``.
        groups (dict or None): as in :func:`count_macs`.

    Returns:
        dict: the :func:`count_macs` record.
    """
    import mxnet as mx
    names = list(shapes)
    with mx.autograd.predict_mode():
        out = block(*[mx.sym.var(n) for n in names])
    if isinstance(out, (list, tuple)):
        out = mx.sym.Group(list(out))
    params = {p.name: p.shape for p in block.collect_params().values()
              if p.shape is not None and all(int(d) > 0 for d in p.shape)}
    return count_macs(out, shapes, groups, params)
