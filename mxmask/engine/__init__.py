"""Training and evaluation machinery.

- ``trainer``: the training loop (kvstore trainer, schedules, logging).
- ``checkpoint``: the checkpoint folder (config.yaml, model.params, trainer.states,
  progress.json), written atomically.
- ``evaluator``: COCO evaluation of result entries with pycocotools (``evaluate_results``:
  results list/json + gt json -> ``{"bbox": {...}, "segm": {...}, "keypoints": {...}}``,
  printed tables, metrics.json, optional precision/recall plots) and merging of per-shard
  results (``gather_results``).

Submodules are imported explicitly (``from mxmask.engine.evaluator import evaluate_results``);
this package imports nothing so that loading one part never pulls in MXNet or matplotlib.
"""
