#!/usr/bin/env python
"""Milliseconds per training step on the real training data: the step `mxmask train` runs.

`mxmask bench --train` times one synthetic batch with random weights, in which every object has
keypoints and the proposals are random. This script times the batches training itself draws
(their sizes, objects and augmentation, from ``data/loader.py``), through the trainer's own
``forward_backward`` and ``step`` (gradient exchange, norm, clipping, optimizer update), and can
start from a checkpoint's trained weights, whose proposals give the RoI heads the positives of
late training. To measure a change to the training step, run it before and after, alternating,
several times (docs/benchmarks.md, "Machines": the machines' speed drifts).

In:  a preset (``--preset``, default ``shapes``; its dataset is generated as `mxmask train` does
     when missing) or a checkpoint (``--ckpt``: its config and weights); ``--set`` overrides.
Out: ms per step of each of ``--repeat`` blocks of ``--steps`` timed steps (after ``--warmup``
     untimed ones; the batches are made beforehand, so data loading is not timed) and their
     median, on stdout; ``--json`` writes the same numbers. The weights are not saved.

    python dev/bench_train_steps.py                                 # shapes, random init
    python dev/bench_train_steps.py --ckpt runs/shapes --steps 50 --repeat 3
    python dev/bench_train_steps.py --ckpt runs/shapes \
        --set model.box_head.positive_fraction=0.75        # a training setting, same weights
"""
import argparse
import io
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mxmask  # noqa: E402,F401  (sets the thread count before mxnet is imported)
from mxmask.config import ConfigError  # noqa: E402
from mxmask.utils import UserError, atomic_write_json  # noqa: E402


def parse_args(argv=None):
    """The command-line options (``--help``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="shapes", help="config preset (default shapes)")
    p.add_argument("--ckpt", help="checkpoint folder: its config and trained weights")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--steps", type=int, default=50, help="timed steps per block (default 50)")
    p.add_argument("--repeat", type=int, default=1, help="timed blocks (default 1)")
    p.add_argument("--warmup", type=int, default=10, help="untimed first steps (default 10)")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    return p.parse_args(argv)


def load_matching(net, path, strict=True):
    """Load the checkpoint's parameters into ``net``. Not ``strict`` (a ``--set`` changed the
    model): a parameter the file lacks, or has in another shape, keeps its initial value (the
    trained rest still gives the checkpoint's proposals and positives, which set the heads'
    work); the names of those are printed."""
    import mxnet as mx
    if strict:
        net.load_parameters(path, ctx=net.contexts())
        return
    saved = mx.nd.load(path)
    fresh = []
    for name, param in net._collect_params_with_prefix().items():
        if name in saved and saved[name].shape == param.shape:
            param.set_data(saved[name])
        else:
            fresh.append(name)
    if fresh:
        print("left at their initial values: %s" % ", ".join(fresh), flush=True)


def build(args):
    """(cfg, trainer, batches): the model on one CPU context, its training graph and trainer,
    and the first warmup + steps * repeat batches of the training loader."""
    import mxnet as mx
    from mxmask.config import get_config, set_value
    from mxmask.data.loader import build_train_loader
    from mxmask.train import prepare_data
    from mxmask.engine.trainer import Trainer
    from mxmask.modeling.rcnn import build_model
    from mxmask.modeling.training import RCNNLoss
    if args.ckpt:
        from mxmask.engine.checkpoint import checkpoint_files, load_checkpoint_config
        cfg = load_checkpoint_config(args.ckpt)
        for assignment in args.set:
            set_value(cfg, assignment)
    else:
        cfg = get_config(args.preset, args.set)
    records, info = prepare_data(cfg, log=lambda text: print(text, flush=True))
    ctxs = [mx.cpu()]
    mx.random.seed(cfg.seed)
    net = build_model(cfg, ctx=ctxs)
    if args.ckpt:
        load_matching(net, checkpoint_files(args.ckpt)[0], strict=not args.set)
    loss_net = RCNNLoss(net, cfg)
    loss_net.hybridize(static_alloc=True)
    trainer = Trainer(cfg, net, loss_net, ctxs, kvstore="device", out=io.StringIO())
    loader = build_train_loader(cfg, records, info, loader_workers=0)
    batches = [next(loader) for _ in range(args.warmup + args.steps * args.repeat)]
    return cfg, trainer, batches


def time_steps(trainer, batches, warmup, steps, repeat, lr):
    """ms per step of each block (the trainer's forward_backward + step, all work waited
    for)."""
    import mxnet as mx
    trainer.trainer.set_learning_rate(lr)

    def run(it, batch):
        trainer.step(it, trainer.forward_backward(batch))
    for it in range(warmup):
        run(it, batches[it])
    mx.nd.waitall()
    blocks = []
    for r in range(repeat):
        start = time.perf_counter()
        for i in range(steps):
            it = warmup + r * steps + i
            run(it, batches[it])
        mx.nd.waitall()
        blocks.append((time.perf_counter() - start) / steps * 1000.0)
    return blocks


def main(argv=None):
    """Build, time, print (and with ``--json`` write) the blocks. Returns the exit code: 0, or 2
    after a bad option, config or dataset.
    """
    args = parse_args(argv)
    if args.steps < 1 or args.repeat < 1 or args.warmup < 0:
        print("bench_train_steps: error: --steps and --repeat must be at least 1, --warmup at "
              "least 0", file=sys.stderr)
        return 2
    try:
        cfg, trainer, batches = build(args)
    except (UserError, ConfigError) as e:
        print("bench_train_steps: error: %s" % e, file=sys.stderr)
        return 2
    # a small learning rate: the timed steps should not move trained weights far
    blocks = time_steps(trainer, batches, args.warmup, args.steps, args.repeat,
                        lr=cfg.solver.base_lr * 0.01)
    result = {"config": args.ckpt or args.preset, "overrides": list(args.set),
              "steps": args.steps, "warmup": args.warmup, "images_per_step":
              cfg.solver.ims_per_batch, "threads": os.environ.get("OMP_NUM_THREADS", "default"),
              "ms_per_step": blocks, "median_ms": statistics.median(blocks)}
    print("%s%s: %s ms per step (%d steps of %d images per block, after %d); median %.1f ms"
          % (result["config"], " " + " ".join(args.set) if args.set else "",
             " / ".join("%.1f" % b for b in blocks), args.steps, cfg.solver.ims_per_batch,
             args.warmup, result["median_ms"]))
    if args.json:
        atomic_write_json(args.json, result, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
