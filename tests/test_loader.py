"""The data loader: sampler determinism and sharding, resume, worker processes give the same
batches as in-process loading, errors (bad image, dead worker, stuck worker) surface as one
clear error instead of a hang, and the test loader covers every record exactly once."""
import contextlib
import gc
import os
import signal
import time

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest

from mxmask.config import get_config
from mxmask.data.loader import (LoaderError, TrainSampler, build_test_loader,
                                build_train_loader, shard_records)
from mxmask.utils import UserError


@contextlib.contextmanager
def deadline(seconds):
    """Fail the test (instead of hanging the suite) if the block runs longer than ``seconds``."""
    def on_alarm(signum, frame):
        raise TimeoutError("no answer within %d s: the loader hangs" % seconds)
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _local_reader(path):
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise UserError("%s: cannot decode the image" % path)
    return image[:, :, ::-1].copy()


def _reader():
    """The project's reader when mxmask.data.coco provides it, else an equivalent one."""
    try:
        from mxmask.data.images import read_image
        return read_image
    except ImportError:
        return _local_reader


class _Info:
    keypoint_names = ["left_p", "right_p"]
    keypoint_flip_map = [1, 0]


def _write_dataset(folder, count=6):
    """``count`` small PNGs of varied sizes and hand-made records with masks and keypoints."""
    rng = np.random.default_rng(1)
    records = []
    for i in range(count):
        h, w = 40 + 8 * (i % 3), 56 - 4 * (i % 4)
        path = os.path.join(str(folder), "im%d.png" % i)
        cv2.imwrite(path, rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        n = 1 + i % 3
        x1 = rng.uniform(0, w / 2, n)
        y1 = rng.uniform(0, h / 2, n)
        boxes = np.stack([x1, y1, x1 + w / 3, y1 + h / 3], 1).astype(np.float32)
        polygons = [[[b[0], b[1], b[2], b[1], b[2], b[3], b[0], b[3]]] for b in boxes.tolist()]
        crowd_mask = np.zeros((h, w), np.uint8, order="F")
        crowd_mask[:5, :5] = 1
        kps = np.concatenate([boxes[:, None, :2] + 1, np.full((n, 1, 1), 2.0)], 2)
        kps = np.concatenate([kps, np.zeros((n, 1, 3))], 1).astype(np.float32)
        records.append({
            "image_id": 100 + i, "file_name": path, "height": h, "width": w,
            "boxes": boxes, "labels": (np.arange(n) % 2).astype(np.int32),
            "segmentations": polygons[:-1] + [mask_util.encode(
                np.asfortranarray((np.arange(h)[:, None] < h // 2) & (np.arange(w) < w // 2))
                .astype(np.uint8))],
            "keypoints": kps,
            "crowd_boxes": np.array([[0, 0, 5, 5]], np.float32)[: i % 2],
            "crowd_segmentations": [mask_util.encode(crowd_mask)][: i % 2],
        })
    return records


def _cfg(workers=0, ims_per_batch=4):
    return get_config("shapes", ["data.num_workers=%d" % workers,
                                 "solver.ims_per_batch=%d" % ims_per_batch,
                                 "input.min_size_train=[32, 48, 64]", "input.max_size_train=100",
                                 "input.min_size_test=48", "input.max_size_test=100",
                                 "seed=5"])


def _take(loader, n):
    batches = [next(loader) for _ in range(n)]
    loader.close()
    return batches


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for key in x:
            assert x[key].dtype == y[key].dtype, key
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# --------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------
def test_sampler_epochs_are_permutations_and_batches_a_pure_function_of_iteration():
    s = TrainSampler(num_images=10, ims_per_batch=4, seed=3)
    stream = np.concatenate([s.global_batch(it) for it in range(5)])    # 20 = two epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert not np.array_equal(stream[:10], stream[10:])
    again = TrainSampler(num_images=10, ims_per_batch=4, seed=3)
    for it in (7, 2, 1000):
        np.testing.assert_array_equal(again.global_batch(it), s.global_batch(it))
    assert not np.array_equal(TrainSampler(10, 4, seed=4).global_batch(0), s.global_batch(0))
    draws = [s.image_rng(9, slot).random() for slot in range(4)]
    assert len(set(draws)) == 4 and s.image_rng(9, 2).random() == draws[2]


def test_sampler_shards_are_disjoint_and_cover_the_global_batch():
    shards = [TrainSampler(13, 6, seed=0, rank=r, num_workers=3) for r in range(3)]
    for it in range(6):
        parts = [sh.batch_indices(it) for sh in shards]
        assert all(len(p) == 2 for p in parts)
        merged = np.empty(6, np.int64)
        for r, p in enumerate(parts):
            merged[r::3] = p
        np.testing.assert_array_equal(merged, shards[0].global_batch(it))
        assert len(set(merged.tolist())) == 6                 # no image twice in a batch
    with pytest.raises(UserError, match="ims_per_batch"):
        TrainSampler(13, 5, rank=0, num_workers=2)


# --------------------------------------------------------------------------------------------
# Train loader
# --------------------------------------------------------------------------------------------
def test_resumed_loader_reproduces_the_same_batches(tmp_path):
    records = _write_dataset(tmp_path)
    cfg = _cfg(workers=0)
    full = _take(build_train_loader(cfg, records, _Info(), reader=_reader()), 6)
    resumed = _take(build_train_loader(cfg, records, _Info(), start_iter=3, reader=_reader()), 3)
    _assert_same_batches(full[3:], resumed)
    assert full[0]["data"].shape[0] == 4 and full[0]["data"].shape[2] % 32 == 0
    assert {"gt_masks", "gt_keypoints"} <= set(full[0])
    assert len({b["data"].shape for b in full}) > 1            # multi-scale draws happen
    ranks = [_take(build_train_loader(cfg, records, _Info(), rank=r, num_workers=2,
                                      reader=_reader()), 2) for r in range(2)]
    for it in range(2):
        ids = np.empty(4, np.int64)
        ids[0::2], ids[1::2] = ranks[0][it]["image_id"], ranks[1][it]["image_id"]
        np.testing.assert_array_equal(ids, full[it]["image_id"])


def test_two_worker_processes_give_the_batches_of_in_process_loading(tmp_path):
    import mxnet as mx  # the trainer's situation: MXNet's engine has run before the fork
    a = mx.nd.ones((64, 64))
    assert mx.nd.dot(a, a).sum().asscalar() == 64 ** 3
    records = _write_dataset(tmp_path)
    cfg = _cfg()
    with deadline(60):
        serial = _take(build_train_loader(cfg, records, _Info(), start_iter=2,
                                          loader_workers=0, reader=_reader()), 5)
        loader = build_train_loader(cfg, records, _Info(), start_iter=2, loader_workers=2,
                                    reader=_reader())
        processes = list(loader._processes)
        parallel = _take(loader, 5)
    _assert_same_batches(serial, parallel)
    assert len(processes) == 2 and not any(p.is_alive() for p in processes)   # closed


def test_a_corrupt_image_raises_a_user_error_naming_the_file(tmp_path):
    records = _write_dataset(tmp_path, count=4)
    with open(records[2]["file_name"], "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really an image")
    cfg = _cfg()
    for workers in (0, 2):
        loader = build_train_loader(cfg, records, _Info(), loader_workers=workers,
                                    reader=_reader())
        with deadline(30), pytest.raises(UserError, match="im2.png"):
            for _ in range(8):          # two epochs: every image is read
                next(loader)
        assert not any(p.is_alive() for p in loader._processes)


def _kill_on_im3(path):
    if path.endswith("im3.png"):
        os.kill(os.getpid(), signal.SIGKILL)
    return _local_reader(path)


def _slow_on_im3(path):
    if path.endswith("im3.png"):
        time.sleep(30)
    return _local_reader(path)


def test_a_killed_worker_is_reported_not_waited_for(tmp_path):
    records = _write_dataset(tmp_path, count=4)
    loader = build_train_loader(_cfg(), records, _Info(), loader_workers=2, reader=_kill_on_im3)
    start = time.monotonic()
    with deadline(30), pytest.raises(LoaderError, match="died|killed by signal SIGKILL"):
        for _ in range(8):
            next(loader)
    assert time.monotonic() - start < 15


def test_a_stuck_worker_times_out(tmp_path):
    records = _write_dataset(tmp_path, count=4)
    loader = build_train_loader(_cfg(), records, _Info(), loader_workers=1, timeout=2,
                                reader=_slow_on_im3)
    with deadline(20), pytest.raises(LoaderError, match="nothing for 2 s"):
        for _ in range(8):
            next(loader)
    assert not any(p.is_alive() for p in loader._processes)


def test_dropping_the_loader_stops_its_workers(tmp_path):
    records = _write_dataset(tmp_path, count=4)
    loader = build_train_loader(_cfg(), records, _Info(), loader_workers=2, reader=_reader())
    processes = list(loader._processes)
    with deadline(30):
        next(loader)
        del loader
        gc.collect()
    assert len(processes) == 2 and not any(p.is_alive() for p in processes)


# --------------------------------------------------------------------------------------------
# Test loader
# --------------------------------------------------------------------------------------------
def test_shard_records_partition_the_records():
    records = list(range(11))
    shards = [shard_records(records, (r, 3)) for r in range(3)]
    assert sorted(sum(shards, [])) == records
    with pytest.raises(ValueError):
        shard_records(records, (3, 3))


@pytest.mark.parametrize("workers", [0, 2])
def test_test_loader_covers_every_record_once_across_shards(tmp_path, workers):
    records = _write_dataset(tmp_path, count=7)
    cfg = _cfg()
    seen = []
    with deadline(60):
        for rank in range(3):
            loader = build_test_loader(cfg, records, batch_size=2, shard=(rank, 3),
                                       loader_workers=workers, reader=_reader())
            batches = list(loader)
            assert len(batches) == len(loader)
            for b in batches:
                assert b["data"].shape[2] % 32 == 0 and b["data"].shape[3] % 32 == 0
                assert b["orig_size"].shape == (len(b["image_id"]), 2)
                assert (b["im_info"][:, :2].min(1) == 48).all()
            seen.extend(int(i) for b in batches for i in b["image_id"])
    assert sorted(seen) == [r["image_id"] for r in records]
    by_id = {r["image_id"]: r for r in records}
    single = list(build_test_loader(cfg, records, batch_size=3, loader_workers=0,
                                    reader=_reader()))
    for b in single:
        for image_id, size in zip(b["image_id"], b["orig_size"]):
            assert tuple(size) == (by_id[image_id]["height"], by_id[image_id]["width"])
