"""Inference over a dataset and its COCO evaluation.

    results = inference_on_dataset(predictor, records, shard=(rank, num))
    metrics = evaluate_on_dataset(predictor, ann, images, out_dir)

What goes in: a :class:`~mxmask.predictor.Predictor` and the records of a COCO dataset
(``load_coco(..., for_training=False)``, so images without annotations are kept). What comes out:
COCO result entries keyed by ``image_id``, and the metrics dict of
:func:`mxmask.engine.evaluator.evaluate_results` (also written to ``out_dir/metrics.json``).

Sharding: a worker ``rank`` of ``num`` processes records ``rank::num``; :func:`gather_shards`
merges the shards' entries and checks that every image was processed exactly once.
"""
import json
import os
import time

from ..data.loader import build_test_loader, shard_records
from ..utils import atomic_write_text
from .evaluator import evaluate_results, gather_results


def inference_on_dataset(predictor, records, shard=(0, 1), batch_size=1, loader_workers=None,
                         log=None):
    """Run ``predictor`` on this shard's records -> (entries, processed image ids, seconds)."""
    loader = build_test_loader(predictor.cfg, records, batch_size=batch_size, shard=shard,
                               loader_workers=loader_workers)
    entries, image_ids = [], []
    start = time.time()
    try:
        for batch, per_image in predictor.run_batches(loader):
            image_ids.extend(int(i) for i in batch["image_id"])
            for image_entries in per_image:
                entries.extend(image_entries)
            if log is not None and len(image_ids) % 50 == 0:
                log("inference: %d/%d images" % (len(image_ids),
                                                 len(shard_records(records, shard))))
    finally:
        loader.close()
    return entries, image_ids, time.time() - start


def gather_shards(shard_entries, shard_image_ids, records):
    """Merge per-shard entries; every record's image must appear in exactly one shard."""
    expected = [int(r["image_id"]) for r in records]
    return gather_results(shard_entries, expected_image_ids=expected,
                          shard_image_ids=shard_image_ids)


def model_tasks(cfg):
    return ["bbox"] + (["segm"] if cfg.model.mask_on else []) + \
        (["keypoints"] if cfg.model.keypoint_on else [])


def evaluate_on_dataset(predictor, ann_file, image_dir, out_dir=None, results_path=None,
                        plots=False, log=print):
    """Predict on every image of a COCO dataset and score it with pycocotools."""
    from ..data.coco import load_coco
    records, _, _ = load_coco(ann_file, image_dir, for_training=False)
    entries, image_ids, seconds = inference_on_dataset(predictor, records, log=log)
    entries = gather_shards([entries], [image_ids], records)
    if log:
        log("inference: %d images in %.1f s (%.3f s/image)"
            % (len(image_ids), seconds, seconds / max(1, len(image_ids))))
    if results_path:
        atomic_write_text(results_path, json.dumps(entries))
    cfg = predictor.cfg
    sigmas = cfg.test.keypoint_oks_sigmas or None
    metrics = evaluate_results(entries, ann_file, tasks=model_tasks(cfg), kpt_oks_sigmas=sigmas,
                               out_dir=out_dir, plots=plots)
    return metrics
