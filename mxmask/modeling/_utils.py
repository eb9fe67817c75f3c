"""Small helpers shared by the stages, written once (torchvision's ``detection/_utils.py``).

Every function takes ``F`` (``mx.nd`` or ``mx.sym``) first, so it works inside a HybridBlock's
``hybrid_forward`` both imperatively and after ``hybridize()``, and on NDArrays outside one.
"""

from ..ops import compiled_kernels_active

__all__ = ["batch_gather", "box_nms"]


def batch_gather(F, data, index):
    """Rows of each image: ``data[b, index[b, t], ...]``.

    Args:
        data: (B, M, ...) any dtype.
        index: (B, T) row indices in [0, M); may be float (as ``topk`` returns).

    Returns:
        (B, T, ...) the selected rows of each image.
    """
    bidx = F.broadcast_like(F.expand_dims(F.contrib.arange_like(index, axis=0), axis=1), index)
    return F.gather_nd(data, F.stack(bidx, index, axis=0))


def box_nms(F, data, **kwargs):
    """``contrib.box_nms(data, **kwargs)``, or the compiled ``mxmask_box_nms`` inside a
    :func:`mxmask.ops.compiled_kernels` block with ``"box_nms"``: the same arguments and rows
    (docs/kernels.md), and no gradient (the callers stop gradients at its outputs).

    Args:
        data: (..., N, W), each leading index an independent batch of N rows: a score at
            ``score_index``, the box x1, y1, x2, y2 (corner format) at ``coord_start``, a class
            id at ``id_index``.
        kwargs: ``contrib.box_nms``'s: ``overlap_thresh`` (IoU above it suppresses),
            ``valid_thresh`` (rows scored above it take part), ``topk`` (only the first topk by
            score take part), ``force_suppress`` (across classes), ``coord_start``,
            ``score_index``, ``id_index``, ...

    Returns:
        (..., N, W): per batch the kept rows in descending score order, then rows of -1.
    """
    if compiled_kernels_active("box_nms"):
        return F.mxmask_box_nms(data, **kwargs)
    return F.contrib.box_nms(data, **kwargs)
