"""Inference over a dataset, sharded or not, and its COCO evaluation.

    entries, image_ids, seconds = inference_on_dataset(predictor, records, shard=(rank, num))
    metrics = evaluate_on_dataset(predictor, ann, images, out_dir)            # one process
    metrics = evaluate_on_dataset(predictor, ann, images, out_dir, shard=(r, n))   # n processes

What goes in: a :class:`~mxmask.predictor.Predictor` and a COCO dataset (read with
``load_coco(..., for_training=False)``, so images without annotations are kept and scored).
What comes out: COCO result entries ordered by ``(image_id, -score)``, the results json, and the
metrics dict of :func:`mxmask.engine.evaluator.evaluate_results` (also ``out_dir/metrics.json``).

Every image is processed exactly once, with several contexts (the predictor sends consecutive
batches to them in turn) or several processes (``shard=(rank, num)``: files in a shared
folder, merged and scored by rank 0; :func:`evaluate_on_dataset`).
"""
import hashlib
import json
import os
import time

import numpy as np

from ..config import unused_labels
from ..data.loader import build_test_loader, shard_records
from ..utils import UserError, atomic_write_json
from .evaluator import evaluate_results, gather_results, keypoint_sigmas, load_gt

DEFAULT_GATHER_TIMEOUT = 600.0


# --------------------------------------------------------------------------------------------
# Running the model over records
# --------------------------------------------------------------------------------------------
def parse_shard(text):
    """Parse ``--shard``.

    Args:
        text (str): ``"RANK/NUM"``.

    Returns:
        tuple: ``(rank, num)`` with ``0 <= rank < num``; UserError otherwise.
    """
    rank, sep, num = str(text).partition("/")
    try:
        rank, num = int(rank), int(num)
    except ValueError:
        rank = num = None
    if not sep or num is None or num < 1 or not 0 <= rank < num:
        raise UserError("--shard %s: expected RANK/NUM with 0 <= RANK < NUM, e.g. 0/2" % text)
    return rank, num


def inference_on_dataset(predictor, records, shard=(0, 1), batch_size=1, loader_workers=None,
                         log=None):
    """Run ``predictor`` on this shard's records.

    Args:
        predictor (Predictor): its config gives the test-time input; with several contexts,
            consecutive batches go to the contexts in turn, each read back once.
        records (list[dict]): all records; this shard takes ``rank::num``.
        shard (tuple): ``(rank, num)``.
        batch_size (int): images that go through the network together on one context.
        loader_workers (int or None): decoding processes (default ``cfg.data.num_workers``; 0
            decodes in this process).
        log: ``log(text)`` for progress lines every 50 images, or None.

    Returns:
        tuple: ``(entries, image_ids, seconds)``: the COCO result entries, the image ids
        processed (also those without a detection), and the wall time.
    """
    total = len(shard_records(records, shard))
    loader = build_test_loader(predictor.cfg, records, batch_size=batch_size, shard=shard,
                               loader_workers=loader_workers)
    entries, image_ids = [], []
    next_log = 50
    start = time.time()
    try:
        for batch, per_image in predictor.run_batches(loader):
            image_ids.extend(int(i) for i in batch["image_id"])
            for image_entries in per_image:
                entries.extend(image_entries)
            if log is not None and len(image_ids) >= next_log:
                log("inference: %d/%d images" % (len(image_ids), total))
                next_log = (len(image_ids) // 50 + 1) * 50
    finally:
        loader.close()
    return entries, image_ids, time.time() - start


def gather_shards(shard_entries, shard_image_ids, records):
    """Merge per-shard entries; every record's image must appear in exactly one shard.

    Args:
        shard_entries (list[list[dict]]): the entries of each shard.
        shard_image_ids (list[list[int]]): the image ids each shard processed.
        records (list[dict]): all records of the dataset.

    Returns:
        list[dict]: the merged entries ordered by ``(image_id, -score)``.

    Raises:
        ValueError: naming the missing, duplicated or unexpected image ids.
    """
    expected = [int(r["image_id"]) for r in records]
    return gather_results(shard_entries, expected_image_ids=expected,
                          shard_image_ids=shard_image_ids)


def model_tasks(cfg):
    """The evaluation tasks of a model.

    Args:
        cfg: the model's config.

    Returns:
        list[str]: ``bbox``, plus ``segm`` / ``keypoints`` when it has those heads.
    """
    return ["bbox"] + (["segm"] if cfg.model.mask_on else []) + \
        (["keypoints"] if cfg.model.keypoint_on else [])


# --------------------------------------------------------------------------------------------
# File-based gathering across processes
# --------------------------------------------------------------------------------------------
def shard_paths(gather_dir, rank):
    """``(results.rank{r}.json, results.rank{r}.ids.json)`` of ``rank`` in ``gather_dir``."""
    return (os.path.join(gather_dir, "results.rank%d.json" % rank),
            os.path.join(gather_dir, "results.rank%d.ids.json" % rank))


def run_fingerprint(predictor, ann_file, num_shards, num_records):
    """A digest that is equal in every process of one sharded evaluation.

    It differs when the weights, the model/input/test config, the score threshold, the
    annotation file or the shard count differ, so that rank 0 never merges a file left by an
    earlier run.

    Args:
        predictor (Predictor): the model (weights and config).
        ann_file (str): the annotation file (path, size and mtime are hashed).
        num_shards (int), num_records (int): the split of the run.

    Returns:
        str: a SHA-1 hex digest.
    """
    from ..config import to_dict
    cfg = to_dict(predictor.cfg)
    h = hashlib.sha1()
    try:
        st = os.stat(ann_file)
        ann = [os.path.abspath(ann_file), st.st_size, st.st_mtime_ns]
    except OSError:
        ann = [os.path.abspath(ann_file)]
    h.update(json.dumps([ann, int(num_shards), int(num_records), float(predictor.score_thresh),
                         cfg["model"], cfg["input"], cfg["test"],
                         list(predictor.category_ids)], sort_keys=True).encode())
    # structural names (as in saved .params files): Gluon's prefixes differ between instances
    for name, param in sorted(predictor.net._collect_params_with_prefix().items()):
        a = param.data(param.list_ctx()[0]).asnumpy()
        h.update(name.encode())
        h.update(np.array([a.sum(dtype=np.float64), np.abs(a).sum(dtype=np.float64)]).tobytes())
    return h.hexdigest()


def write_shard(gather_dir, rank, num_shards, entries, image_ids, fingerprint=""):
    """Write one rank's entries, then its id list (the completion marker), atomically.

    Args:
        gather_dir (str): the folder shared by the ranks.
        rank (int), num_shards (int): this shard.
        entries (list[dict]): its result entries.
        image_ids (list[int]): the images it processed.
        fingerprint (str): :func:`run_fingerprint` of the run.

    Returns:
        str: the results file written.
    """
    results_path, ids_path = shard_paths(gather_dir, rank)
    atomic_write_json(results_path, list(entries))
    atomic_write_json(ids_path, {"rank": int(rank), "num_shards": int(num_shards),
                                 "image_ids": [int(i) for i in image_ids],
                                 "num_entries": len(entries), "fingerprint": fingerprint})
    return results_path


def read_shard(gather_dir, rank, num_shards, fingerprint=""):
    """Read ``rank``'s shard files.

    Returns:
        tuple: ``((entries, image_ids), None)`` when the shard of this run (same
        ``num_shards`` and ``fingerprint``) is complete, else ``(None, why not)``.
    """
    results_path, ids_path = shard_paths(gather_dir, rank)
    if not os.path.exists(ids_path):
        return None, "%s not written yet" % os.path.basename(ids_path)
    try:
        with open(ids_path) as f:
            meta = json.load(f)
        with open(results_path) as f:
            entries = json.load(f)
    except (OSError, ValueError) as e:
        return None, "unreadable (%s)" % str(e).splitlines()[0]
    if not isinstance(meta, dict) or not isinstance(entries, list) \
            or not isinstance(meta.get("image_ids"), list):
        return None, "%s is not a shard file of mxmask" % os.path.basename(ids_path)
    if meta.get("rank") != rank or meta.get("num_shards") != num_shards \
            or meta.get("fingerprint") != fingerprint:
        return None, ("%s is from another run (different weights, config, data or shard "
                      "count)" % os.path.basename(ids_path))
    if meta.get("num_entries") != len(entries):
        return None, ("%s holds %d entries but %s says %d"
                      % (os.path.basename(results_path), len(entries),
                         os.path.basename(ids_path), meta.get("num_entries")))
    return (entries, meta["image_ids"]), None


def wait_for_shards(gather_dir, num_shards, ranks, fingerprint="",
                    timeout=DEFAULT_GATHER_TIMEOUT, poll=0.5, log=None):
    """Wait until every rank in ``ranks`` has written its shard of this run.

    Args:
        gather_dir (str): the folder shared by the ranks.
        num_shards (int), ranks (iterable of int), fingerprint (str): what to wait for.
        timeout (float): seconds.
        poll (float): seconds between looks.
        log: ``log(text)`` for one waiting line, or None.

    Returns:
        list: ``(entries, image_ids)`` per rank, in ``ranks`` order.

    Raises:
        UserError: naming the ranks still missing after ``timeout`` seconds, and why.
    """
    ranks = list(ranks)
    deadline = time.monotonic() + float(timeout)
    got, logged = {}, False
    while True:
        waiting = {}
        for r in ranks:
            if r not in got:
                shard, why = read_shard(gather_dir, r, num_shards, fingerprint)
                if shard is None:
                    waiting[r] = why
                else:
                    got[r] = shard
        if not waiting:
            return [got[r] for r in ranks]
        now = time.monotonic()
        if now >= deadline:
            raise UserError(
                "%s: gave up after %g s waiting for the results of rank(s) %s of %d (%s); run "
                "every rank with the same --out-dir, or raise --gather-timeout"
                % (gather_dir, float(timeout), ", ".join(str(r) for r in sorted(waiting)),
                   num_shards, "; ".join("rank %d: %s" % (r, waiting[r])
                                         for r in sorted(waiting))))
        if log is not None and not logged:
            log("rank 0: waiting for rank(s) %s in %s"
                % (", ".join(str(r) for r in sorted(waiting)), gather_dir))
            logged = True
        time.sleep(max(0.0, min(poll, deadline - now)))


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
def check_eval_set(cfg, gt, ann_file, category_ids, kpt_oks_sigmas=None):
    """Refuse, before any inference, a dataset the model's results could not be scored on.

    Args:
        cfg: the checkpoint's config.
        gt (COCO): the dataset (:func:`mxmask.engine.evaluator.load_gt`).
        ann_file (str): its file name, for messages.
        category_ids (list[int]): the COCO ids of the model's labels.
        kpt_oks_sigmas (list or None): the OKS sigmas for keypoint models.

    Raises:
        UserError: for model categories absent from the json (the labels of
            ``config.unused_labels`` aside), a different keypoint count, or missing OKS
            sigmas.
    """
    unused = set(unused_labels(cfg))
    missing = [c for label, c in enumerate(category_ids)
               if c not in gt.cats and label not in unused]
    if missing:
        raise UserError("%s: has no categories with ids %s, which the checkpoint predicts "
                        "(data.category_ids %s)" % (ann_file, missing, list(category_ids)))
    if cfg.model.keypoint_on:
        kp_cats, _ = keypoint_sigmas(gt, kpt_oks_sigmas, ann_file)
        k = len(gt.cats[kp_cats[0]]["keypoints"])
        if k != cfg.model.num_keypoints:
            raise UserError("%s: its keypoint category has K=%d keypoints but the checkpoint's "
                            "model predicts %d" % (ann_file, k, cfg.model.num_keypoints))


def evaluate_on_dataset(predictor, ann_file, image_dir, out_dir=None, results_path=None,
                        plots=False, log=print, shard=(0, 1), gather_dir=None,
                        gather_timeout=DEFAULT_GATHER_TIMEOUT, batch_size=1,
                        loader_workers=None, kpt_oks_sigmas=None):
    """Predict on every image of a COCO dataset and score it with pycocotools.

    With ``shard=(rank, num)``, ``num > 1``, worker ``rank`` processes records ``rank::num``.
    Ranks ``1..num-1`` write ``results.rank{r}.json`` (their entries) and then
    ``results.rank{r}.ids.json`` (the image ids they processed, the entry count and a
    fingerprint of the run) into ``gather_dir``, atomically; the ids file is written last, so
    its presence means the shard is complete. Rank 0 runs its own shard, waits for the others
    (at most ``gather_timeout`` seconds, then a UserError naming the missing ranks), ignores
    files whose fingerprint (model weights, test/model config, annotation file, shard count)
    belongs to another run, and merges with :func:`gather_shards`, which fails when an image is
    missing or was processed twice. Only rank 0 scores and returns metrics.

    Args:
        predictor (Predictor): the model.
        ann_file (str), image_dir (str): the COCO dataset, read with
            ``load_coco(..., for_training=False)`` so that images without annotations are kept
            and scored.
        out_dir (str or None): where ``metrics.json`` (and ``pr_<task>.png`` with ``plots``)
            go.
        results_path (str or None): where all entries go, ordered by ``(image_id, -score)``.
        plots (bool): precision/recall plots.
        log: ``log(text)`` for progress lines (None: silent).
        shard (tuple): ``(rank, num)``.
        gather_dir (str or None): the shard files' folder (default ``out_dir``), shared by the
            ranks.
        gather_timeout (float): seconds rank 0 waits for the others.
        batch_size, loader_workers: as in :func:`inference_on_dataset`.
        kpt_oks_sigmas (list or None): overrides ``test.keypoint_oks_sigmas``.

    Returns:
        dict or None: the metrics of :func:`mxmask.engine.evaluator.evaluate_results`; None on
        ranks other than 0.
    """
    from ..data.coco import load_coco
    log = log or (lambda _: None)
    cfg = predictor.cfg
    sigmas = list(kpt_oks_sigmas or []) or list(cfg.test.keypoint_oks_sigmas or []) or None
    rank, num = int(shard[0]), int(shard[1])
    if num > 1:
        gather_dir = gather_dir or out_dir
        if gather_dir is None:
            raise ValueError("evaluate_on_dataset: sharded evaluation needs gather_dir or out_dir")
    gt = load_gt(ann_file)
    check_eval_set(cfg, gt, ann_file, predictor.category_ids, sigmas)
    records, _, _ = load_coco(ann_file, image_dir, for_training=False)
    entries, image_ids, seconds = inference_on_dataset(predictor, records, shard=(rank, num),
                                                       batch_size=batch_size,
                                                       loader_workers=loader_workers, log=log)
    log("inference%s: %d images in %.1f s (%.3f s/image)"
        % (" (rank %d of %d)" % (rank, num) if num > 1 else "", len(image_ids), seconds,
           seconds / max(1, len(image_ids))))
    shard_entries, shard_ids = [entries], [image_ids]
    if num > 1:
        fingerprint = run_fingerprint(predictor, ann_file, num, len(records))
        if rank != 0:
            path = write_shard(gather_dir, rank, num, entries, image_ids, fingerprint)
            log("rank %d of %d: wrote %s; rank 0 merges the shards and scores them"
                % (rank, num, path))
            return None
        for other_entries, other_ids in wait_for_shards(gather_dir, num, range(1, num),
                                                        fingerprint, gather_timeout, log=log):
            shard_entries.append(other_entries)
            shard_ids.append(other_ids)
    try:
        entries = gather_shards(shard_entries, shard_ids, records)
    except ValueError as e:
        raise UserError("%s: %s" % (gather_dir if num > 1 else ann_file, e))
    if results_path:
        atomic_write_json(results_path, entries)
    start = time.time()
    metrics = evaluate_results(entries, gt, tasks=model_tasks(cfg), kpt_oks_sigmas=sigmas,
                               out_dir=out_dir, plots=plots)
    log("evaluation: %d entries on %d images in %.2f s"
        % (len(entries), len(records), time.time() - start))
    return metrics
