#!/usr/bin/env python
"""Measure the training data loader's throughput (images per second).

In:  a config preset (default ``shapes``) and the synthetic shapes dataset, generated with
     ``mxmask.data.shapes.generate_shapes`` into ``--data`` (or a temporary folder) when missing.
Out: one line of settings and one result line per ``--workers`` value on stdout: images/s,
     ms per batch, CPU ms per image (all processes, so comparable on a busy machine) and the
     loader start-up time. Nothing else is written.

    python dev/bench_loader.py --config shapes --workers 0 2 --iters 50
"""
import argparse
import os
import resource
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mxmask.config import get_config  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="shapes", help="preset name or YAML file (default shapes)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--data", default="", help="shapes dataset folder (generated if missing; "
                   "default: a temporary folder)")
    p.add_argument("--num-train", type=int, default=0,
                   help="training images to generate when the dataset is missing (default: 100 "
                   "in a temporary folder, the config's data.shapes.train in --data)")
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="loader worker processes to try (default: data.num_workers)")
    p.add_argument("--iters", type=int, default=50, help="timed iterations (default 50)")
    p.add_argument("--warmup", type=int, default=3, help="untimed first iterations (default 3)")
    return p.parse_args(argv)


def ensure_shapes(folder, cfg, num_train):
    """(annotation json, image folder) of the shapes train split in ``folder``, generated with
    ``num_train`` training images (and the config's size and seed) when missing."""
    ann = os.path.join(folder, "annotations", "train.json")
    images = os.path.join(folder, "images", "train")
    if not os.path.exists(ann):
        from mxmask.data.shapes import generate_shapes
        s = cfg.data.shapes
        start = time.perf_counter()
        generate_shapes(folder, num_train=num_train, num_val=1, size=s.size, seed=s.seed)
        print("generated the shapes dataset in %s (%.1f s)" % (folder, time.perf_counter() - start))
    return ann, images


def cpu_seconds():
    """CPU time of this process plus its reaped children (the closed loader's workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(cfg, records, info, workers, iters, warmup):
    """-> dict: images/s and ms per batch over ``iters`` timed batches, start-up seconds, and
    CPU ms per image over the whole run (all processes; independent of other load)."""
    from mxmask.data.loader import build_train_loader
    cpu_start = cpu_seconds()
    start = time.perf_counter()
    loader = build_train_loader(cfg, records, info, loader_workers=workers)
    total_images = 0
    try:
        for _ in range(max(1, warmup)):
            total_images += next(loader)["data"].shape[0]
        startup = time.perf_counter() - start
        images = 0
        start = time.perf_counter()
        for _ in range(iters):
            images += next(loader)["data"].shape[0]
        elapsed = time.perf_counter() - start
    finally:
        loader.close()
    total_images += images
    return {"images_per_s": images / elapsed, "ms_per_batch": 1000 * elapsed / iters,
            "startup_s": startup,
            "cpu_ms_per_image": 1000 * (cpu_seconds() - cpu_start) / total_images}


def main(argv=None):
    args = parse_args(argv)
    cfg = get_config(args.config, args.set)
    folder = args.data or tempfile.mkdtemp(prefix="mxmask-shapes-")
    try:
        from mxmask.data.coco import load_coco
        num_train = args.num_train or (cfg.data.shapes.train if args.data else 100)
        ann, image_dir = ensure_shapes(folder, cfg, num_train)
        records, info, _ = load_coco(ann, image_dir, for_training=True)
        workers = args.workers if args.workers is not None else [cfg.data.num_workers]
        print("config=%s images=%d ims_per_batch=%d min_size_train=%s max_size_train=%d "
              "mask_on=%s keypoint_on=%s iters=%d cpus=%d"
              % (args.config, len(records), cfg.solver.ims_per_batch, cfg.input.min_size_train,
                 cfg.input.max_size_train, cfg.model.mask_on, cfg.model.keypoint_on, args.iters,
                 os.cpu_count()))
        for w in workers:
            r = measure(cfg, records, info, w, args.iters, args.warmup)
            print("workers=%d  %.1f images/s  %.1f ms/batch  %.1f CPU ms/image  (start-up + %d "
                  "warm-up batches %.2f s)" % (w, r["images_per_s"], r["ms_per_batch"],
                                               r["cpu_ms_per_image"], max(1, args.warmup),
                                               r["startup_s"]))
    finally:
        if not args.data:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
