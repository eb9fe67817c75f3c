"""COCO evaluation of result entries with pycocotools, and merging of per-shard results.

Input: COCO result entries (a list of dicts, or the path of a json file holding one), each with
``image_id`` (or a ``file_name`` that matches one gt image by base name), ``category_id``,
``score`` and at least one of ``bbox`` ``[x, y, w, h]``, ``segmentation`` (RLE dict with
``size == [height, width]`` of the image) and ``keypoints`` (flat ``[x, y, v] * K``), all in
original-image pixel coordinates. Ground truth: a COCO annotation json.

Output of :func:`evaluate_results`: the contract's metrics dict
``{"bbox": {"AP", "AP50", "AP75", "APs", "APm", "APl"}, "segm": {...same...},
"keypoints": {"AP", "AP50", "AP75", "APm", "APl"}}`` with floats in [0, 1], taken from
``COCOeval.stats``. pycocotools reports -1 when no gt falls into an area range; that is reported
as 0.0 (the contract's range) with a printed note. The protocol is Detectron2's
(:func:`evaluate_results`). :func:`gather_results` merges the entries of several shards.
"""
import io
import json
import os

import numpy as np

from ..utils import UserError, atomic_write_bytes, atomic_write_json

TASKS = ("bbox", "segm", "keypoints")
TASK_KEY = {"bbox": "bbox", "segm": "segmentation", "keypoints": "keypoints"}
METRIC_NAMES = {
    "bbox": ("AP", "AP50", "AP75", "APs", "APm", "APl"),
    "segm": ("AP", "AP50", "AP75", "APs", "APm", "APl"),
    "keypoints": ("AP", "AP50", "AP75", "APm", "APl"),
}



# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------
def _read_json(path, what):
    """The parsed json of ``path``; a missing or unreadable file is one UserError line."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError("%s: %s not found" % (path, what))
    except (OSError, ValueError) as e:
        raise UserError("%s: not a readable json file (%s)" % (path, str(e).splitlines()[0]))


def load_gt(gt_ann):
    """Load a COCO annotation json into a ``pycocotools.coco.COCO``.

    Missing ``iscrowd`` defaults to 0 and missing ``area`` to the box area (pycocotools needs
    both). Keypoint annotations without ``num_keypoints`` get it from their ``v > 0`` count,
    and annotations of keypoint categories without ``keypoints`` get all-zero keypoints, so
    that pycocotools' keypoint evaluation never fails on a missing field.

    Args:
        gt_ann (str): the json file.

    Returns:
        COCO: indexed, with ``mxmask_source`` holding the file name for messages.

    Raises:
        UserError: when the file is missing, unreadable or not COCO, or an id does not fit in
        int64.
    """
    from pycocotools.coco import COCO
    data = _read_json(gt_ann, "annotation file")
    if not isinstance(data, dict):
        raise UserError("%s: not a COCO annotation file (expected an object)" % gt_ann)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise UserError("%s: not a COCO annotation file (no '%s' list)" % (gt_ann, key))
    from ..data.validation import id_range_problem
    for key, fields in (("images", ("id",)), ("categories", ("id",)),
                        ("annotations", ("id", "image_id", "category_id"))):
        for i, entry in enumerate(data[key]):
            for name in fields:
                value = entry.get(name) if isinstance(entry, dict) else None
                if isinstance(value, int) and id_range_problem(name, value):
                    raise UserError("%s: %s[%d]: %s" % (gt_ann, key, i,
                                                        id_range_problem(name, value)))
    kpt_count = {c.get("id"): len(c.get("keypoints") or []) for c in data["categories"]
                 if isinstance(c, dict)}
    for ann in data["annotations"]:
        if not isinstance(ann, dict):
            raise UserError("%s: not a COCO annotation file (an annotation is not an object)"
                            % gt_ann)
        ann.setdefault("iscrowd", 0)
        if "area" not in ann and isinstance(ann.get("bbox"), list) and len(ann["bbox"]) == 4:
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
        k = kpt_count.get(ann.get("category_id"), 0)
        if k:
            if not isinstance(ann.get("keypoints"), list):
                ann["keypoints"] = [0] * (3 * k)
            if "num_keypoints" not in ann:
                ann["num_keypoints"] = int(sum(1 for v in ann["keypoints"][2::3] if v > 0))
    coco = COCO()
    coco.dataset = data
    try:
        coco.createIndex()
    except (KeyError, TypeError) as e:
        raise UserError("%s: not a COCO annotation file (missing or bad field %s)" % (gt_ann, e))
    coco.mxmask_source = str(gt_ann)      # the file name for messages (evaluate_results)
    return coco


def _is_number(x):
    """A finite int or float (numpy's too), not a bool."""
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) \
        and np.isfinite(x)


def _load_results(results):
    """(entries, label): the label names the file in messages."""
    if isinstance(results, (str, os.PathLike)):
        label = str(results)
        entries = _read_json(label, "results file")
    else:
        label, entries = "results", results
    if not isinstance(entries, list):
        raise UserError("%s: expected a json list of result entries, got %s"
                        % (label, type(entries).__name__))
    return entries, label


def validate_results(entries, gt, label="results"):
    """Check result entries against the gt and return clean copies (the input is not changed).

    Args:
        entries (list[dict]): COCO result entries (module docstring).
        gt (COCO): the ground truth of :func:`load_gt`.
        label (str): names the results in messages (a file name).

    Returns:
        list[dict]: one copy per entry with ``image_id``, ``category_id``, ``score`` and those
        of ``bbox``, ``segmentation`` (compressed RLE), ``keypoints`` that the entry has; a
        ``file_name`` is resolved to the gt image with that base name. ``keypoints`` on a
        category without keypoints are dropped (they are never scored).

    Raises:
        UserError: naming ``label``, the entry index and the field.
    """
    import pycocotools.mask as mask_util
    images = gt.imgs
    cats = gt.cats
    by_name = {}
    for img in images.values():
        by_name.setdefault(os.path.basename(str(img.get("file_name", ""))), []).append(img["id"])
    clean = []
    for i, e in enumerate(entries):
        where = "%s: entry %d" % (label, i)
        if not isinstance(e, dict):
            raise UserError("%s: expected an object, got %s" % (where, type(e).__name__))
        if "image_id" in e:
            image_id = e["image_id"]
            if not isinstance(image_id, (int, np.integer)) or isinstance(image_id, bool) \
                    or image_id not in images:
                raise UserError("%s: image_id %r is not an image of the annotation file"
                                % (where, image_id))
        elif "file_name" in e:
            ids = by_name.get(os.path.basename(str(e["file_name"])), [])
            if len(ids) != 1:
                raise UserError("%s: file_name %r matches %s of the annotation file"
                                % (where, e["file_name"], "no image" if not ids else
                                   "%d images" % len(ids)))
            image_id = ids[0]
        else:
            raise UserError("%s: missing field image_id" % where)
        category_id = e.get("category_id")
        if not isinstance(category_id, (int, np.integer)) or isinstance(category_id, bool) \
                or category_id not in cats:
            raise UserError("%s: category_id %r is not a category of the annotation file"
                            % (where, category_id))
        if not _is_number(e.get("score")):
            raise UserError("%s: field score must be a finite number, got %r"
                            % (where, e.get("score")))
        out = {"image_id": int(image_id), "category_id": int(category_id),
               "score": float(e["score"])}
        if "bbox" in e:
            b = e["bbox"]
            if not (isinstance(b, (list, tuple)) and len(b) == 4 and all(map(_is_number, b))
                    and b[2] >= 0 and b[3] >= 0):
                raise UserError("%s: field bbox must be [x, y, w, h] with w, h >= 0, got %r"
                                % (where, b))
            out["bbox"] = [float(v) for v in b]
        if "segmentation" in e:
            seg = e["segmentation"]
            img = images[image_id]
            size = [img.get("height"), img.get("width")]
            if not (isinstance(seg, dict) and isinstance(seg.get("counts"), (str, bytes, list))
                    and isinstance(seg.get("size"), (list, tuple))):
                raise UserError("%s: field segmentation must be an RLE object "
                                "{size, counts}" % where)
            if list(seg["size"]) != size:
                raise UserError("%s: field segmentation has size %s but image %d is %s"
                                % (where, list(seg["size"]), image_id, size))
            if isinstance(seg["counts"], list):
                try:
                    seg = mask_util.frPyObjects(dict(seg), size[0], size[1])
                except Exception as err:  # noqa: BLE001 - pycocotools raises plain Exceptions
                    raise UserError("%s: field segmentation has bad counts (%s)" % (where, err))
            out["segmentation"] = {"size": size, "counts": seg["counts"]}
        if "keypoints" in e:
            k = len(cats[category_id].get("keypoints") or [])
            kp = e["keypoints"]
            if k:
                is_list = isinstance(kp, (list, tuple))
                if not (is_list and len(kp) == 3 * k and all(map(_is_number, kp))):
                    got = ("%d values" % len(kp)) if is_list else repr(kp)
                    raise UserError("%s: field keypoints must be %d numbers (K=%d of category "
                                    "%d), got %s" % (where, 3 * k, k, category_id, got))
                out["keypoints"] = [float(v) for v in kp]
        if not any(key in e for key in ("bbox", "segmentation", "keypoints")):
            raise UserError("%s: has none of the fields bbox, segmentation, keypoints" % where)
        clean.append(out)
    return clean


def keypoint_sigmas(gt, kpt_oks_sigmas, gt_ann="annotations"):
    """The keypoint categories of the gt and the OKS sigmas to score them with.

    Args:
        gt (COCO): the ground truth.
        kpt_oks_sigmas (list or None): ``test.keypoint_oks_sigmas``; required unless K = 17.
        gt_ann (str): the file name for messages.

    Returns:
        tuple: ``(category ids with keypoints, sigmas float64 (K,) or None)``; None means
        pycocotools' COCO default.

    Raises:
        UserError: when no category has keypoints, the keypoint categories differ in K, or
            the sigmas are missing, of the wrong count or not positive.
    """
    kp_cats = sorted(cid for cid, c in gt.cats.items() if c.get("keypoints"))
    if not kp_cats:
        raise UserError("%s: no category has keypoints; cannot score the keypoints task" % gt_ann)
    ks = sorted({len(gt.cats[c]["keypoints"]) for c in kp_cats})
    if len(ks) > 1:
        raise UserError("%s: keypoint categories have different keypoint counts %s; one set of "
                        "OKS sigmas cannot score them" % (gt_ann, ks))
    k = ks[0]
    given = list(kpt_oks_sigmas or [])
    if not given:
        if k == 17:
            return kp_cats, None
        raise UserError("%s: keypoint category has K=%d keypoints but no OKS sigmas were given "
                        "(test.keypoint_oks_sigmas is empty): pass %d with --sigmas or set "
                        "test.keypoint_oks_sigmas; COCO's defaults only fit K=17"
                        % (gt_ann, k, k))
    if len(given) != k:
        raise UserError("%s: keypoint category has K=%d keypoints but test.keypoint_oks_sigmas "
                        "has %d values" % (gt_ann, k, len(given)))
    sig = np.asarray(given, np.float64)
    if not (np.isfinite(sig).all() and (sig > 0).all()):
        raise UserError("test.keypoint_oks_sigmas: values must be positive numbers, got %s"
                        % given)
    return kp_cats, sig


def task_results(clean, task):
    """The entries pycocotools scores for one task, as fresh dicts (``loadRes`` mutates them).

    Only the entries with the task's field, holding ``image_id``, ``category_id``, ``score`` and
    that field: ``segm`` entries lose their ``bbox`` so that pycocotools takes the area from
    the mask; ``keypoints`` entries keep it (when all have one) for the dt area.
    """
    key = TASK_KEY[task]
    keep = ("image_id", "category_id", "score", key)
    chosen = [e for e in clean if key in e]
    if task == "keypoints" and all("bbox" in e for e in chosen):
        keep = keep + ("bbox",)       # the dt area for the area ranges comes from the box
    return [{k: e[k] for k in keep} for e in chosen]


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
def _max_det_index(params, wanted=100):
    """The index of ``wanted`` in ``params.maxDets``, else of the last value."""
    return params.maxDets.index(wanted) if wanted in params.maxDets else len(params.maxDets) - 1


def per_category_ap(coco_eval):
    """Per-category AP of an evaluated ``COCOeval``.

    Args:
        coco_eval (COCOeval): after ``accumulate``; ``eval['precision']`` is (T, R, K, A, M).

    Returns:
        dict: ``{category_id: AP}``, the mean over IoU thresholds and recall, area 'all',
        maxDets 100 (the last for keypoints), ignoring -1; NaN when a category has no gt.
    """
    precision = coco_eval.eval["precision"]
    m = _max_det_index(coco_eval.params)
    out = {}
    for k, cid in enumerate(coco_eval.params.catIds):
        p = precision[:, :, k, 0, m]
        p = p[p > -1]
        out[cid] = float(p.mean()) if p.size else float("nan")
    return out


def _print_per_category(task, aps, gt):
    """Print the per-category AP table of a task."""
    names = {cid: str(c.get("name", cid)) for cid, c in gt.cats.items()}
    width = max([len(names[c]) for c in aps] + [8])
    lines = ["Per-category %s AP:" % task, "  %-*s | AP" % (width, "category"),
             "  " + "-" * width + "-+-------"]
    for cid, ap in aps.items():
        lines.append("  %-*s | %s" % (width, names[cid], "  -" if np.isnan(ap) else
                                      "%.3f" % ap))
    print("\n".join(lines))


def _plot_pr(coco_eval, task, path):
    """Precision/recall curves: IoU 0.5, 0.75 and the mean over IoUs; area all, last maxDets."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    precision = coco_eval.eval["precision"][:, :, :, 0, -1]        # (T, R, K)
    recall = coco_eval.params.recThrs
    ious = coco_eval.params.iouThrs
    fig = Figure(figsize=(5, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)

    def mean_curve(p):                 # p (..., R, K) -> (R,), ignoring -1 entries
        p = np.moveaxis(p, -2, 0).reshape(len(recall), -1)
        valid = p > -1
        count = valid.sum(axis=1)
        return np.where(count > 0, np.where(valid, p, 0).sum(axis=1) / np.maximum(count, 1),
                        np.nan)
    for thr, style in ((0.5, "-"), (0.75, "--")):
        t = np.flatnonzero(np.isclose(ious, thr))
        if t.size:
            ax.plot(recall, mean_curve(precision[t[0]]), style, label="IoU=%.2f" % thr)
    ax.plot(recall, mean_curve(precision), ":", color="k", label="mean IoU=.50:.95")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("%s precision / recall" % task)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def _coco_eval(gt, dets, task, kp_cats=None, sigmas=None, image_ids=None):
    """Run COCOeval for one task over non-empty ``dets``; returns the evaluated object."""
    from pycocotools.cocoeval import COCOeval
    dt = gt.loadRes(dets)
    ev = COCOeval(gt, dt, task)
    if image_ids is not None:
        ev.params.imgIds = sorted(image_ids)
    if task == "keypoints":
        ev.params.catIds = list(kp_cats)
        if sigmas is not None:
            ev.params.kpt_oks_sigmas = sigmas
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev


def evaluate_results(results, gt_ann, tasks=None, kpt_oks_sigmas=None, out_dir=None,
                     per_category=True, plots=False, image_ids=None):
    """Score COCO result entries against ``gt_ann`` and return the metrics dict.

    The protocol is Detectron2's:

    - ``segm`` is scored from entries without their ``bbox`` so that pycocotools takes the
      instance area from the mask (for APs/APm/APl), not from the box.
    - ``keypoints`` is scored over the categories that have ``keypoints`` in the gt only; the
      OKS sigmas are COCO's 17 unless ``kpt_oks_sigmas`` gives them; for K != 17 they are
      required.
    - All gt images are scored (an image without detections counts as missed objects).

    Args:
        results: a list of entries or the path of a results json.
        gt_ann: the path of a COCO json, or a ``COCO`` object from :func:`load_gt` (not loaded
            again).
        tasks (list or None): any of ``bbox``/``segm``/``keypoints``; by default those whose
            field (``bbox``, ``segmentation``, ``keypoints``) appears in the results (``bbox``
            when there are no results). A task without entries scores 0.0 everywhere.
        kpt_oks_sigmas: ``test.keypoint_oks_sigmas`` (needed when K != 17).
        out_dir (str or None): where ``metrics.json`` (atomic) and, with ``plots``,
            ``pr_<task>.png`` go.
        per_category (bool): also print the per-category AP tables.
        plots (bool): draw precision/recall curves (needs ``out_dir``).
        image_ids: score only these gt images (default: all).

    Returns:
        dict: ``{task: {"AP", "AP50", "AP75", "APs", "APm", "APl"}}`` (no ``APs`` for
        keypoints), floats in [0, 1].

    Raises:
        UserError: for unusable results or gt, or an unknown task.
    """
    if hasattr(gt_ann, "loadRes"):
        gt, gt_ann = gt_ann, getattr(gt_ann, "mxmask_source", "annotations")
    else:
        gt = load_gt(gt_ann)
    entries, label = _load_results(results)
    clean = validate_results(entries, gt, label)
    if tasks is None:
        tasks = [t for t in TASKS if any(TASK_KEY[t] in e for e in clean)] or ["bbox"]
    else:
        tasks = list(tasks)
        bad = [t for t in tasks if t not in TASKS]
        if bad:
            raise UserError("unknown evaluation task %s (tasks: %s)" % (bad, ", ".join(TASKS)))
    if plots and out_dir is None:
        raise ValueError("evaluate_results: plots=True needs out_dir")
    metrics = {}
    for task in TASKS:
        if task not in tasks:
            continue
        kp_cats = sigmas = None
        if task == "keypoints":
            kp_cats, sigmas = keypoint_sigmas(gt, kpt_oks_sigmas, gt_ann)
        dets = task_results(clean, task)
        names = METRIC_NAMES[task]
        if task == "keypoints":
            dets = [d for d in dets if d["category_id"] in set(kp_cats)]
        if not dets:
            print("Evaluate annotation type *%s*: no results, every metric is 0.0" % task)
            metrics[task] = {name: 0.0 for name in names}
            continue
        print("Evaluate annotation type *%s*" % task)
        try:
            ev = _coco_eval(gt, dets, task, kp_cats, sigmas, image_ids)
        except KeyError as e:
            raise UserError("%s: an annotation lacks the field %s needed for %s evaluation"
                            % (gt_ann, e, task))
        stats = [float(s) for s in ev.stats[:len(names)]]
        undefined = [n for n, s in zip(names, stats) if s < 0]
        if undefined:
            print("%s: no ground truth for %s; reported as 0.0" % (task, ", ".join(undefined)))
        metrics[task] = {n: (s if s >= 0 else 0.0) for n, s in zip(names, stats)}
        if per_category:
            _print_per_category(task, per_category_ap(ev), gt)
        if plots:
            _plot_pr(ev, task, os.path.join(out_dir, "pr_%s.png" % task))
    if out_dir is not None:
        atomic_write_json(os.path.join(out_dir, "metrics.json"), metrics, indent=2)
    return metrics


# --------------------------------------------------------------------------------------------
# Distributed / sharded evaluation
# --------------------------------------------------------------------------------------------
def _id_list(ids, limit=20):
    """Sorted image ids (or file names) for a message, cut after ``limit``."""
    ids = sorted(ids, key=lambda v: (str(type(v)), v))
    text = ", ".join(str(i) for i in ids[:limit])
    return text + (" ... (%d in all)" % len(ids) if len(ids) > limit else "")


def _image_key(entry):
    """An entry's ``image_id``, else its ``file_name``."""
    return entry["image_id"] if "image_id" in entry else entry.get("file_name")


def gather_results(shards, expected_image_ids=None, shard_image_ids=None):
    """Merge per-shard result lists into one list ordered by ``(image_id, -score)``.

    Every image must come from exactly one shard, and with ``expected_image_ids`` every
    expected image must be covered (by ``shard_image_ids`` when given, else by the entries:
    then an image without detections cannot be told from a missing one, and only unexpected
    and duplicated ids are checked).

    Args:
        shards (list[list[dict]]): one list of result entries per worker.
        expected_image_ids (list or None): the images of the dataset.
        shard_image_ids (list[list] or None): the image ids each shard processed (an image with
            no detections leaves no entry, so only these lists can show that it was processed).

    Returns:
        list[dict]: the merged entries. Ties in score keep category id order, then shard
        order, so the result is deterministic.

    Raises:
        ValueError: listing the duplicated, missing or unexpected image ids.
    """
    shards = [list(s) for s in shards]
    if shard_image_ids is not None:
        if len(shard_image_ids) != len(shards):
            raise ValueError("gather_results: %d shards but %d image id lists"
                             % (len(shards), len(shard_image_ids)))
        per_shard = [list(ids) for ids in shard_image_ids]
        for s, (entries, ids) in enumerate(zip(shards, per_shard)):
            stray = {_image_key(e) for e in entries} - set(ids)
            if stray:
                raise ValueError("gather_results: shard %d has results for images it did not "
                                 "process: %s" % (s, _id_list(stray)))
    else:
        per_shard = [list({_image_key(e) for e in entries}) for entries in shards]
    owner = {}
    duplicated = set()
    for s, ids in enumerate(per_shard):
        for image_id in ids:
            if image_id in owner and owner[image_id] != s:
                duplicated.add(image_id)
            owner.setdefault(image_id, s)
        if len(set(ids)) != len(ids):
            seen = set()
            duplicated.update(i for i in ids if i in seen or seen.add(i))
    problems = []
    if duplicated:
        problems.append("images in more than one shard: %s" % _id_list(duplicated))
    if expected_image_ids is not None:
        expected = set(expected_image_ids)
        unexpected = set(owner) - expected
        if unexpected:
            problems.append("images not expected: %s" % _id_list(unexpected))
        if shard_image_ids is not None:
            missing = expected - set(owner)
            if missing:
                problems.append("images missing from every shard: %s" % _id_list(missing))
    if problems:
        raise ValueError("gather_results: " + "; ".join(problems))
    merged = [e for entries in shards for e in entries]
    merged.sort(key=lambda e: (_image_key(e), -float(e["score"]), e.get("category_id", 0)))
    return merged
