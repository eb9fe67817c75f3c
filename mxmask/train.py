"""What ``mxmask train`` does, start to finish.

    run_training(cfg, ctxs, kvstore="device", resume=False)

1. Data: generates the synthetic set if the config points at it and it is missing; reads and
   validates the training and validation json (:func:`mxmask.data.coco.load_coco`); takes the
   class names, COCO ids and keypoint metadata from the training json into the config.
2. Output folder: ``cfg.output_dir``. A folder that already holds a checkpoint is refused
   unless ``resume`` is set; with ``resume`` the saved ``config.yaml`` is used as it is, and a
   folder without a checkpoint is refused. Worker 0 holds the folder's lock file while it runs
   (:class:`mxmask.engine.checkpoint.RunLock`), so a second run on it stops at once.
3. Model: :func:`mxmask.modeling.rcnn.build_model` on the contexts, the pretrained backbone
   from a local file when configured, and :class:`mxmask.modeling.training.RCNNLoss`.
4. Training: :class:`mxmask.engine.trainer.Trainer` (kvstore, schedule, checkpoints).
5. Evaluation on the validation set with pycocotools, ``metrics.json``, ``curves.png``.

A failed write (a full disk) stops the run with one line naming the last intact checkpoint.

A ``dist_sync`` run (processes started by ``scripts/train_dist.sh``) is described at
:func:`run_training`.
"""
import errno
import gc
import os
import sys
import time
import traceback

import mxnet as mx

from .config import ConfigError
from .utils import UserError
from .engine import checkpoint as ckpt_io

# the errno values of a write that failed for lack of space or a broken device
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS)

# where the shapes dataset keeps its training json, under data.shapes.root
SHAPES_ANN = ("annotations", "train.json")


def _is_shapes_path(cfg):
    """Whether ``data.train_ann`` is the shapes dataset's training json."""
    root = os.path.normpath(cfg.data.shapes.root)
    return os.path.normpath(cfg.data.train_ann) == os.path.join(root, *SHAPES_ANN)


def prepare_data(cfg, log=print):
    """Make the training data ready and take its metadata into the config.

    Generates the shapes dataset when ``data.train_ann`` is its training json and it is missing
    (``data.shapes``), then reads and validates the training json.

    Args:
        cfg: the config; its ``data`` and ``model`` metadata are filled (:func:`fill_metadata`).
        log: called with each progress and warning line.

    Returns:
        ``(records, info)``: the training records and the ``DatasetInfo``
        (:func:`mxmask.data.coco.load_coco`).

    Raises:
        UserError, ConfigError: invalid data, or a config that contradicts it.
    """
    from .data.coco import load_coco
    if _is_shapes_path(cfg) and not os.path.exists(cfg.data.train_ann):
        from .data.shapes import ensure_shapes
        s = cfg.data.shapes
        log("generating the synthetic shapes dataset in %s (%d train / %d val images)"
            % (s.root, s.train, s.val))
        ensure_shapes(s.root, num_train=s.train, num_val=s.val, size=s.size, seed=s.seed)
    records, info, report = load_coco(cfg.data.train_ann, cfg.data.train_images,
                                      for_training=True,
                                      keypoint_offset=cfg.data.keypoint_offset)
    for line in report.warning_lines() if hasattr(report, "warning_lines") else []:
        log(line)
    fill_metadata(cfg, info)
    return records, info


def fill_metadata(cfg, info):
    """Copy the class and keypoint metadata of the training json into the config, checked.

    Args:
        cfg: the config; ``model.num_classes`` and ``model.num_keypoints`` are set when 0 and
            must match the data otherwise, and every ``DatasetInfo`` field goes to ``data``.
        info: the training json's ``DatasetInfo``.

    Raises:
        ConfigError: ``model.num_classes``, ``model.num_keypoints`` or
        ``test.keypoint_oks_sigmas`` does not match the data.
        UserError: ``model.keypoint_on`` and no category has keypoints.
    """
    m = cfg.model
    if m.num_classes in (0, info.num_classes):
        m.num_classes = info.num_classes
    else:
        raise ConfigError("model.num_classes is %d but %s has %d categories"
                          % (m.num_classes, cfg.data.train_ann, info.num_classes))
    if m.keypoint_on:
        if info.num_keypoints == 0:
            raise UserError("%s: model.keypoint_on is true but no category has keypoints"
                            % cfg.data.train_ann)
        if m.num_keypoints not in (0, info.num_keypoints):
            raise ConfigError("model.num_keypoints is %d but %s has %d keypoints"
                              % (m.num_keypoints, cfg.data.train_ann, info.num_keypoints))
        m.num_keypoints = info.num_keypoints
        sigmas = cfg.test.keypoint_oks_sigmas
        if sigmas and len(sigmas) != info.num_keypoints:
            raise ConfigError("test.keypoint_oks_sigmas has %d values but %s has %d keypoints"
                              % (len(sigmas), cfg.data.train_ann, info.num_keypoints))
    for key, value in info.to_dict().items():
        setattr(cfg.data, key, value)


def _log_to(out):
    """A log function printing each line to ``out``, flushed."""
    def log(text):
        print(text, file=out, flush=True)
    return log


def _check_dist_env(kvstore):
    """UserError when a dist kvstore is asked for outside a distributed job."""
    if "dist" in kvstore and not os.environ.get("DMLC_ROLE"):
        raise UserError("--kvstore %s needs the processes of a distributed job: start it with "
                        "scripts/train_dist.sh NUM_WORKERS [train arguments] (DMLC_ROLE is not "
                        "set)" % kvstore)


def _abort_distributed(rank, exc):
    """Leave a distributed worker at once after an error. A normal exit would finalise the
    kvstore with a barrier that the other workers, blocked in their next exchange, never reach."""
    code = 1
    try:
        sys.stdout.flush()
        if isinstance(exc, (UserError, ConfigError)):
            sys.stderr.write("mxmask: error: worker %d: %s\n" % (rank, exc))
            code = 2
        elif isinstance(exc, KeyboardInterrupt):
            sys.stderr.write("mxmask: worker %d interrupted\n" % rank)
            code = 130
        else:
            traceback.print_exception(type(exc), exc, exc.__traceback__)
            sys.stderr.write("mxmask: error: worker %d failed (%s); stopping it\n"
                             % (rank, type(exc).__name__))
        sys.stderr.flush()
    finally:
        os._exit(code)


def run_training(cfg, ctxs, kvstore="device", resume=False, out=None):
    """Train, checkpoint and evaluate (module docstring).

    In a ``dist_sync`` run (processes started by ``scripts/train_dist.sh``) every worker reads its
    shard of each global batch (``kv.rank``, ``kv.num_workers``); worker 0 prepares the data
    first (the others wait at a kvstore barrier), writes the config and the checkpoints, and runs
    the evaluation after all workers have left the job (the kvstore is finalised first, so the
    others exit instead of waiting). Every blocking kvstore call is bounded by the trainer's
    watchdog (``MXMASK_DIST_TIMEOUT``, else ``solver.dist_timeout``), and an error in a worker ends
    that worker at once (``os._exit``; a normal exit would wait in the kvstore's final barrier for
    workers that are themselves waiting for it). ``resume`` needs the output folder on a file
    system all workers share.

    Args:
        cfg: the config (``output_dir`` is the checkpoint folder).
        ctxs: list of contexts.
        kvstore: ``device``, ``local`` or ``dist_sync``.
        resume: continue the run in ``cfg.output_dir`` from its last checkpoint, with its saved
            config.
        out: where progress goes (default: ``sys.stdout`` at the time of the call).

    Returns:
        ``(checkpoint folder, metrics)``; metrics is None on workers other than 0.

    Raises:
        UserError: a folder that holds a checkpoint without ``resume``, ``resume`` on a folder
        without one, a folder another ``mxmask train`` is writing (its lock file,
        :class:`mxmask.engine.checkpoint.RunLock`), a dist kvstore outside a distributed job,
        bad data, a write that fails (full disk).
    """
    from .engine.trainer import Watchdog, dist_timeout

    out = out or sys.stdout

    _check_dist_env(kvstore)
    if "dist" not in kvstore:
        # a run in progress is named before anything else is said about its folder (in a dist
        # job worker 0 may hold the lock already, so there only worker 0's acquire checks)
        ckpt_io.RunLock(cfg.output_dir).check()
    progress = ckpt_io.read_progress(cfg.output_dir)
    if progress is not None and not resume:
        raise UserError("%s already holds a checkpoint (iteration %d of %d): pass --resume to "
                        "continue it, or --out DIR for a new run"
                        % (cfg.output_dir, progress["iter"], progress["max_iter"]))
    if resume and progress is None:
        raise UserError("%s: nothing to resume (no checkpoint in it); run without --resume to "
                        "start a new run there" % cfg.output_dir)
    if resume:
        saved = ckpt_io.load_checkpoint_config(cfg.output_dir)
        saved.output_dir = cfg.output_dir
        cfg = saved
    if "dist" not in kvstore:
        return _train(cfg, ctxs, [mx.kv.create(kvstore)], resume, out, None)
    watchdog = Watchdog(dist_timeout(cfg), "worker")
    with watchdog.guard("joining the distributed job (mx.kv.create)"):
        box = [mx.kv.create(kvstore)]         # no local name: _train drops the last reference
    rank = box[0].rank
    watchdog.who = "worker %d" % rank
    try:
        return _train(cfg, ctxs, box, resume, out, watchdog)
    except BaseException as e:
        _abort_distributed(rank, e)


def _train(cfg, ctxs, kv_box, resume, out, watchdog):
    """The body of :func:`run_training`. ``kv_box``: a one-element list holding the kvstore,
    emptied before the final evaluation so that a dist kvstore can be finalised."""
    log = _log_to(out)
    kv = kv_box[0]
    rank, num_workers, kv_type = kv.rank, kv.num_workers, kv.type
    del kv
    lock = ckpt_io.RunLock(cfg.output_dir, log)
    if rank == 0:
        lock.acquire()                         # only worker 0 writes into out_dir
    try:
        return _train_locked(cfg, ctxs, kv_box, resume, out, log, watchdog, rank, num_workers,
                             kv_type)
    finally:
        lock.release()


def _train_locked(cfg, ctxs, kv_box, resume, out, log, watchdog, rank, num_workers, kv_type):
    """The body of :func:`_train` once worker 0 holds the folder's lock."""
    from .data.loader import build_train_loader
    from .modeling.backbone import load_pretrained_from_config
    from .modeling.rcnn import build_model
    from .modeling.training import RCNNLoss
    from .engine.trainer import Trainer

    out_dir = cfg.output_dir
    distributed = watchdog is not None
    if rank == 0:
        records, info = prepare_data(cfg, log)   # may generate the shapes set: rank 0 first
        try:
            ckpt_io.save_config(cfg, out_dir)
        except ckpt_io.WRITE_ERRORS as e:
            raise UserError("%s: could not write config.yaml (%s)"
                            % (out_dir, ckpt_io.error_text(e)))
    if distributed:
        with watchdog.guard("waiting for worker 0 to prepare the data"):
            kv_box[0]._barrier()
    if rank != 0:
        records, info = prepare_data(cfg, lambda _: None)

    mx.random.seed(cfg.seed)
    net = build_model(cfg, ctx=ctxs, num_devices=len(ctxs))
    if cfg.model.backbone.pretrained:
        load_pretrained_from_config(net.backbone, cfg, ctx=ctxs)
    loss_net = RCNNLoss(net, cfg)
    loss_net.hybridize(static_alloc=True)
    trainer = Trainer(cfg, net, loss_net, ctxs, kvstore=kv_box[0], out=out,
                      watchdog=watchdog)
    start_iter = trainer.resume_from(out_dir) if resume else 0
    if start_iter:
        log("resuming %s at iteration %d (with its saved config.yaml)" % (out_dir, start_iter))
    if rank == 0:
        log("training %s: %d images, %d classes, %s, kvstore %s, %d worker(s), %d iterations%s"
            % (out_dir, len(records), cfg.model.num_classes, ",".join(str(c) for c in ctxs),
               kv_type, num_workers, cfg.solver.max_iter,
               ", convolutions in bfloat16" if loss_net.amp else ""))

    def loader_fn(start):
        return build_train_loader(cfg, records, info, start_iter=start, rank=rank,
                                  num_workers=num_workers)

    def evaluate_stopping_on_a_full_disk(it):
        # results.json and metrics.json: a failed write stops the run in one line, as a
        # failed checkpoint does (a full disk; errors that are not writes pass through)
        try:
            return evaluate(cfg, net, ctxs, out_dir, log)
        except ckpt_io.WRITE_ERRORS as e:
            if isinstance(e, OSError) and e.errno not in WRITE_ERRNOS:
                raise
            if not isinstance(e, OSError) and "Write" not in str(e):
                raise
            raise UserError("iter %d: could not write the evaluation's results.json / "
                            "metrics.json to %s (%s); %s" % (it, out_dir, ckpt_io.error_text(e),
                                                              trainer.kept_checkpoint()))

    def evaluate_fn(it):
        if rank != 0:
            return None
        return evaluate_stopping_on_a_full_disk(it)

    t0 = time.time()
    history = trainer.train(loader_fn, start_iter, evaluate_fn)
    if rank == 0:
        log("training took %.1f s" % (time.time() - t0))
    if distributed:
        # Leave the job before evaluating: dropping the last kvstore reference finalises it
        # (a barrier over all workers), so the other workers exit now instead of waiting,
        # unbounded, for worker 0's evaluation.
        with watchdog.guard("leaving the distributed job (kvstore finalisation)"):
            trainer.close()
            kv_box.clear()
            gc.collect()
    metrics = None
    if rank == 0:
        metrics = evaluate_stopping_on_a_full_disk(cfg.solver.max_iter)
        history.add_eval(cfg.solver.max_iter, metrics)
        from .vis import plot_training_curves
        try:
            history.save()
            plot_training_curves(history.data, os.path.join(out_dir, "curves.png"))
        except ckpt_io.WRITE_ERRORS as e:
            # the final checkpoint and metrics.json are written by now
            raise UserError("%s: could not write history.json / curves.png (%s); the checkpoint "
                            "of iteration %d and metrics.json are intact"
                            % (out_dir, ckpt_io.error_text(e), cfg.solver.max_iter))
    return out_dir, metrics


def evaluate(cfg, net, ctxs, out_dir, log=print):
    """Evaluate the in-memory ``net`` on ``cfg``'s val set.

    Args:
        cfg: the config (``data.val_ann``, ``data.val_images``).
        net: the trained ``MaskRCNN``, hybridized here.
        ctxs: list of contexts.
        out_dir: where ``results.json`` and ``metrics.json`` go.
        log: called with each progress line.

    Returns:
        the metrics (``{task: {"AP", "AP50", ...}}``).
    """
    from .predictor import Predictor
    from .engine.inference import evaluate_on_dataset
    net.hybridize(static_alloc=True)
    predictor = Predictor(None, ctx=ctxs, cfg=cfg, net=net)
    return evaluate_on_dataset(predictor, cfg.data.val_ann, cfg.data.val_images,
                               out_dir=out_dir,
                               results_path=os.path.join(out_dir, "results.json"), log=log)
