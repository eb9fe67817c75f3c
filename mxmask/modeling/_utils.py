"""Small helpers shared by the stages, written once (torchvision's ``detection/_utils.py``).

Every function takes ``F`` (``mx.nd`` or ``mx.sym``) first, so it works inside a HybridBlock's
``hybrid_forward`` both imperatively and after ``hybridize()``, and on NDArrays outside one.
"""

from ..ops import compiled_kernels_active

__all__ = ["batch_gather", "box_nms"]


def batch_gather(F, data, index):
    """Rows of each image: data (B, M, ...) and index (B, T) with values in [0, M) ->
    ``data[b, index[b, t], ...]`` as (B, T, ...). ``index`` may be float (as ``topk`` returns)."""
    bidx = F.broadcast_like(F.expand_dims(F.contrib.arange_like(index, axis=0), axis=1), index)
    return F.gather_nd(data, F.stack(bidx, index, axis=0))


def box_nms(F, data, **kwargs):
    """``contrib.box_nms(data, **kwargs)`` (corner format): data (..., N, W), each leading index
    an independent batch of N rows (a score at ``score_index``, the box x1, y1, x2, y2 at
    ``coord_start``, a class id at ``id_index``) -> the same shape, per batch the rows scored >
    ``valid_thresh`` kept by greedy NMS (IoU > ``overlap_thresh`` suppresses, among the first
    ``topk`` by score, per class unless ``force_suppress``) in descending score order, then
    rows of -1. Inside a :func:`mxmask.ops.compiled_kernels` block with ``"box_nms"`` it is the
    compiled ``mxmask_box_nms`` with the same arguments: the same rows, faster on a CPU, and no
    gradient (the callers stop gradients at its outputs)."""
    if compiled_kernels_active("box_nms"):
        return F.mxmask_box_nms(data, **kwargs)
    return F.contrib.box_nms(data, **kwargs)
