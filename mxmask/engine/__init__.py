"""Training and evaluation machinery.

- ``trainer``: the training loop (kvstore trainer, gradient checks, progress, history);
  ``schedule``: the learning rate of an iteration.
- ``checkpoint``: the checkpoint folder (config.yaml, model.params, trainer.states,
  progress.json), written atomically.
- ``inference``: a predictor over a dataset, sharded over processes or not, then scored.
- ``evaluator``: COCO evaluation of result entries with pycocotools (``evaluate_results``:
  results list/json + gt json -> ``{"bbox": {...}, "segm": {...}, "keypoints": {...}}``,
  printed tables, metrics.json, optional precision/recall plots) and merging of per-shard
  results (``gather_results``).
- ``dist_launch``: the launcher of ``dist_sync`` jobs.

Submodules are imported explicitly (``from mxmask.engine.evaluator import evaluate_results``);
this package imports nothing so that loading one part never pulls in MXNet or matplotlib.
"""
