"""The network: HybridBlocks and ``F``-functions that work with ``mx.nd`` and ``mx.sym``.

Boxes everywhere are ``(x1, y1, x2, y2)`` in network-input pixels (continuous coordinates, pixel
``i`` covers ``[i, i+1)``); see DEVELOPING.md, "Module interfaces", for the shapes that pass
between the files:

    box_coder.py   encode/decode/clip/area/IoU, the one place for box maths
    anchors.py     AnchorGenerator: (1, H*W*A, 4) anchors per level, stored as a constant
    proposals.py   ProposalGenerator: RPN outputs -> rois (B, post, 4), scores (B, post)
    poolers.py     assign_fpn_levels, MultiLevelRoIAlign: rois (B, R, 4) -> (B*R, C, P, P)
    backbone.py, fpn.py, norm.py, rpn.py, roi_heads.py, rcnn.py (the inference network)
    targets.py, losses.py, training.py (the training graph); precision.py, _utils.py
"""
