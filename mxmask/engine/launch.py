"""What ``mxmask train`` does, start to finish.

    run_training(cfg, ctxs, kvstore="device", resume=False)

1. Data: generates the synthetic set if the config points at it and it is missing; reads and
   validates the training and validation json (:func:`mxmask.data.coco.load_coco`); takes the
   class names, COCO ids and keypoint metadata from the training json into the config.
2. Output folder: ``cfg.output_dir``. A folder that already holds a checkpoint is refused
   unless ``resume`` is set; with ``resume`` the saved ``config.yaml`` is used as it is.
3. Model: :func:`mxmask.modeling.rcnn.build_model` on the contexts, the pretrained backbone
   from a local file when configured, and :class:`mxmask.modeling.training.RCNNLoss`.
4. Training: :class:`mxmask.engine.trainer.Trainer` (kvstore, schedule, checkpoints).
5. Evaluation on the validation set with pycocotools, ``metrics.json``, ``curves.png``.

In a ``dist_sync`` run every worker reads its shard of each global batch (``kv.rank``,
``kv.num_workers``); worker 0 writes the checkpoints and runs the evaluation.
"""
import os
import sys
import time

import mxnet as mx

from ..config import ConfigError
from ..utils import UserError
from . import checkpoint as ckpt_io

SHAPES_ANN = ("annotations", "train.json")


def _is_shapes_path(cfg):
    root = os.path.normpath(cfg.data.shapes.root)
    return os.path.normpath(cfg.data.train_ann) == os.path.join(root, *SHAPES_ANN)


def prepare_data(cfg, log=print):
    """Generate the shapes set when needed; load train and val records; fill the metadata."""
    from ..data.coco import load_coco
    if _is_shapes_path(cfg) and not os.path.exists(cfg.data.train_ann):
        from ..data.shapes import ensure_shapes
        s = cfg.data.shapes
        log("generating the synthetic shapes dataset in %s (%d train / %d val images)"
            % (s.root, s.train, s.val))
        ensure_shapes(s.root, num_train=s.train, num_val=s.val, size=s.size, seed=s.seed)
    records, info, report = load_coco(cfg.data.train_ann, cfg.data.train_images,
                                      for_training=True)
    for line in report.warning_lines() if hasattr(report, "warning_lines") else []:
        log(line)
    fill_metadata(cfg, info)
    return records, info


def fill_metadata(cfg, info):
    """Copy class/keypoint metadata of the training json into the config (checked)."""
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
    def log(text):
        print(text, file=out, flush=True)
    return log


def run_training(cfg, ctxs, kvstore="device", resume=False, out=sys.stdout):
    """Train ``cfg`` on ``ctxs``; returns (checkpoint folder, metrics or None)."""
    from ..data.loader import build_train_loader
    from ..modeling.backbone import load_pretrained_from_config
    from ..modeling.rcnn import build_model
    from ..modeling.training import RCNNLoss
    from .trainer import Trainer

    log = _log_to(out)
    out_dir = cfg.output_dir
    progress = ckpt_io.read_progress(out_dir)
    if progress is not None and not resume:
        raise UserError("%s already holds a checkpoint (iteration %d of %d): pass --resume to "
                        "continue it, or --out DIR for a new run"
                        % (out_dir, progress["iter"], progress["max_iter"]))
    if resume and progress is not None:
        saved = ckpt_io.load_checkpoint_config(out_dir)
        saved.output_dir = out_dir
        cfg = saved
    kv = mx.kv.create(kvstore)
    records, info = prepare_data(cfg, log if kv.rank == 0 else (lambda _: None))
    if kv.rank == 0:
        ckpt_io.save_config(cfg, out_dir)

    mx.random.seed(cfg.seed)
    net = build_model(cfg, ctx=ctxs, num_devices=len(ctxs))
    if cfg.model.backbone.pretrained:
        load_pretrained_from_config(net.backbone, cfg, ctx=ctxs)
    loss_net = RCNNLoss(net, cfg)
    loss_net.hybridize(static_alloc=True)
    trainer = Trainer(cfg, net, loss_net, ctxs, kvstore=kv, out=out)
    start_iter = trainer.resume_from(out_dir) if resume else 0
    if start_iter:
        log("resuming %s at iteration %d" % (out_dir, start_iter))
    log("training %s: %d images, %d classes, %s, kvstore %s, %d worker(s), %d iterations"
        % (out_dir, len(records), cfg.model.num_classes, ",".join(str(c) for c in ctxs),
           kv.type, kv.num_workers, cfg.solver.max_iter))

    def loader_fn(start):
        return build_train_loader(cfg, records, info, start_iter=start, rank=kv.rank,
                                  num_workers=kv.num_workers)

    def evaluate_fn(it):
        if kv.rank != 0:
            return None
        return evaluate(cfg, net, ctxs, out_dir, log)

    t0 = time.time()
    history = trainer.train(loader_fn, start_iter, evaluate_fn)
    log("training took %.1f s" % (time.time() - t0))
    metrics = None
    if kv.rank == 0:
        metrics = evaluate(cfg, net, ctxs, out_dir, log)
        history.add_eval(cfg.solver.max_iter, metrics)
        history.save()
        from ..vis import plot_training_curves
        plot_training_curves(history.data, os.path.join(out_dir, "curves.png"))
    return out_dir, metrics


def evaluate(cfg, net, ctxs, out_dir, log=print):
    """Evaluate the in-memory ``net`` on ``cfg``'s val set; writes metrics.json in out_dir."""
    from ..predictor import Predictor
    from .inference import evaluate_on_dataset
    net.hybridize(static_alloc=True)
    predictor = Predictor(None, ctx=ctxs, cfg=cfg, net=net)
    return evaluate_on_dataset(predictor, cfg.data.val_ann, cfg.data.val_images,
                               out_dir=out_dir,
                               results_path=os.path.join(out_dir, "results.json"), log=log)
