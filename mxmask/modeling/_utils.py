"""Small helpers shared by the stages, written once (torchvision's ``detection/_utils.py``).

Every function takes ``F`` (``mx.nd`` or ``mx.sym``) first, so it works inside a HybridBlock's
``hybrid_forward`` both imperatively and after ``hybridize()``, and on NDArrays outside one.
"""

__all__ = ["batch_gather"]


def batch_gather(F, data, index):
    """Rows of each image: data (B, M, ...) and index (B, T) with values in [0, M) ->
    ``data[b, index[b, t], ...]`` as (B, T, ...). ``index`` may be float (as ``topk`` returns)."""
    bidx = F.broadcast_like(F.expand_dims(F.contrib.arange_like(index, axis=0), axis=1), index)
    return F.gather_nd(data, F.stack(bidx, index, axis=0))
