"""Deterministic, resumable data loading with worker processes.

In:  the config, the dataset records of ``mxmask.data.coco.load_coco`` (and its ``DatasetInfo``),
     the first iteration, and this process's ``rank`` among ``num_workers`` training processes.
Out: :func:`build_train_loader` -> an iterator of training batch dicts (DEVELOPING.md, "Training
     batches"), one per iteration, forever; :func:`build_test_loader` -> an iterator of test
     batch dicts covering this shard's records once.

The batch of an iteration is a pure function of ``(seed, it, rank, num_workers)``
(:class:`TrainSampler`), so a resumed run gets exactly the batches of an uninterrupted one and
the number of loader processes changes nothing. Batches are made by ``cfg.data.num_workers``
worker processes (:class:`OrderedLoader`) that never hang the caller: a dead or silent worker
and an exception in a worker come back as errors in the main process.
"""
import collections
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
import traceback
import weakref

import numpy as np

from ..utils import UserError
from .transforms import TestTransform, TrainTransform, batchify_test, batchify_train

SAMPLER_STREAM = 1        # tags that keep the epoch and augmentation random streams apart
AUGMENT_STREAM = 2
DEFAULT_TIMEOUT = 300.0   # seconds without a batch from a live worker before giving up
JOIN_TIMEOUT = 2.0


class LoaderError(RuntimeError):
    """A data loader failure that is not the user's input (a worker died, timed out, or hit an
    unexpected exception). ``worker_traceback`` holds the worker's traceback when there is one."""

    def __init__(self, message, worker_traceback=""):
        super().__init__(message)
        self.worker_traceback = worker_traceback


def _entropy(seed):
    """Any Python int -> a non-negative int accepted by ``numpy.random.SeedSequence``."""
    return int(seed) % (1 << 64)


def _one_line(exc):
    """An exception's message on one line (its type name when the message is empty)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------
class TrainSampler:
    """Image indices per iteration, a pure function of ``(seed, it, rank, num_workers)``.

    The global batch of iteration ``it`` is the ``ims_per_batch`` images at positions
    ``it * B .. it * B + B - 1`` of an endless sequence of epoch permutations, epoch ``e`` being
    ``default_rng([seed, 1, e]).permutation(n)``. A process takes the slots ``rank::num_workers``
    of that batch. Each image's augmentation (short side, flip, copy-paste) is drawn from
    ``default_rng([seed, 2, it, slot])``. Resuming at iteration k therefore gives exactly the
    batches of an uninterrupted run, and the number of loader processes changes nothing
    (DEVELOPING.md, "Determinism and resume").

    Args:
        num_images (int): the number of training records (UserError when 0).
        ims_per_batch (int): ``solver.ims_per_batch``, over all processes; a multiple of
            ``num_workers``.
        seed (int): ``cfg.seed``.
        rank (int), num_workers (int): this training process and their number.
    """

    def __init__(self, num_images, ims_per_batch, seed=0, rank=0, num_workers=1):
        if num_images <= 0:
            raise UserError("the training set has no images")
        if num_workers < 1 or not 0 <= rank < num_workers:
            raise ValueError("rank %d is not in 0..%d" % (rank, num_workers - 1))
        if ims_per_batch < 1 or ims_per_batch % num_workers:
            raise UserError("solver.ims_per_batch (%d) must be a positive multiple of the number "
                            "of training processes (%d)" % (ims_per_batch, num_workers))
        self.num_images = int(num_images)
        self.ims_per_batch = int(ims_per_batch)
        self.seed = int(seed)
        self.rank = int(rank)
        self.num_workers = int(num_workers)
        self._perms = collections.OrderedDict()

    def epoch_permutation(self, epoch):
        """The order of the images in ``epoch`` (cached for the last few epochs)."""
        perm = self._perms.get(epoch)
        if perm is None:
            rng = np.random.default_rng([_entropy(self.seed), SAMPLER_STREAM, int(epoch)])
            perm = rng.permutation(self.num_images)
            self._perms[epoch] = perm
            while len(self._perms) > 4:
                self._perms.popitem(last=False)
        return perm

    def global_batch(self, it):
        """All ``ims_per_batch`` image indices of iteration ``it`` (over every process)."""
        positions = int(it) * self.ims_per_batch + np.arange(self.ims_per_batch, dtype=np.int64)
        epochs, within = np.divmod(positions, self.num_images)
        out = np.empty(self.ims_per_batch, np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self.epoch_permutation(int(epoch))[within[sel]]
        return out

    def slots(self):
        """This process's positions inside the global batch."""
        return np.arange(self.rank, self.ims_per_batch, self.num_workers)

    def batch_indices(self, it):
        """This process's image indices for iteration ``it``."""
        return self.global_batch(it)[self.slots()]

    def image_rng(self, it, slot):
        """The augmentation generator of the image in ``slot`` of iteration ``it``."""
        return np.random.default_rng([_entropy(self.seed), AUGMENT_STREAM, int(it), int(slot)])

    def __call__(self, start_iter=0):
        """Endless ``(it, indices)`` from ``start_iter``."""
        it = int(start_iter)
        while True:
            yield it, self.batch_indices(it)
            it += 1


# --------------------------------------------------------------------------------------------
# Task -> batch (run in the workers or in process)
# --------------------------------------------------------------------------------------------
def _load_one(fn, record):
    """``fn(record)``, with any failure turned into an error naming the image file."""
    name = str(record.get("file_name", "?"))
    try:
        return fn(record)
    except UserError as e:
        if name in str(e):
            raise
        raise UserError("%s: %s" % (name, _one_line(e))) from e
    except Exception as e:
        raise LoaderError("%s: %s: %s" % (name, type(e).__name__, _one_line(e)),
                          traceback.format_exc()) from e


class TrainBatchMaker:
    """Iteration number -> this process's training batch (the train loader's task function).

    Args:
        cfg: the config (``input.size_divisibility`` and the :class:`TrainTransform` settings).
        records (list[dict]): the training records; also the copy-paste pool.
        info (DatasetInfo or None): the keypoint flip map and names.
        sampler (TrainSampler): which images and augmentation draws.
        reader: image reader, default :func:`mxmask.data.images.read_image`.
    """

    def __init__(self, cfg, records, info, sampler, reader=None):
        self.records = records
        self.sampler = sampler
        self.transform = TrainTransform(cfg, info, reader, paste_pool=records)
        self.size_divisibility = int(cfg.input.size_divisibility)

    def __call__(self, it):
        samples = []
        for slot, index in zip(self.sampler.slots(), self.sampler.batch_indices(it)):
            rng = self.sampler.image_rng(it, slot)
            samples.append(_load_one(lambda r: self.transform(r, rng), self.records[index]))
        return batchify_train(samples, self.size_divisibility)


class TestBatchMaker:
    """Batch number ``k`` -> the test batch of records ``[k * batch_size, (k + 1) * batch_size)``.

    Args:
        cfg: the config (:class:`~mxmask.data.transforms.TestTransform` settings and
            ``input.size_divisibility``).
        records (list[dict]): the records to test, in order.
        batch_size (int): images per batch (the last batch may be smaller).
        reader: image reader, default :func:`mxmask.data.images.read_image`.

    ``len()`` is the number of batches.
    """

    __test__ = False

    def __init__(self, cfg, records, batch_size, reader=None):
        self.records = records
        self.batch_size = int(batch_size)
        self.transform = TestTransform(cfg, reader)
        self.size_divisibility = int(cfg.input.size_divisibility)

    def __len__(self):
        return -(-len(self.records) // self.batch_size)

    def __call__(self, k):
        chunk = self.records[k * self.batch_size:(k + 1) * self.batch_size]
        return batchify_test([_load_one(self.transform, r) for r in chunk], self.size_divisibility)


# --------------------------------------------------------------------------------------------
# Worker processes
# --------------------------------------------------------------------------------------------
def _is_array_dict(obj):
    """Whether ``obj`` is a dict of numeric numpy arrays (sent as raw bytes)."""
    return isinstance(obj, dict) and all(isinstance(v, np.ndarray) and v.dtype != object
                                         for v in obj.values())


def _send_result(conn, task, batch):
    """A dict of arrays goes as a small pickled layout then one raw message per array, which
    avoids pickling megabytes through the pipe; anything else is pickled."""
    if not _is_array_dict(batch):
        conn.send(("pickled", task, batch))
        return
    arrays = [(key, np.ascontiguousarray(value)) for key, value in batch.items()]
    conn.send(("arrays", task, [(key, a.dtype.str, a.shape) for key, a in arrays]))
    for _, a in arrays:
        conn.send_bytes(memoryview(a.reshape(-1)).cast("B"))


def _receive_arrays(conn, layout):
    """The raw messages that follow an ``("arrays", task, layout)`` header -> dict of arrays."""
    batch = {}
    for key, dtype, shape in layout:
        a = np.empty(shape, dtype)
        conn.recv_bytes_into(memoryview(a.reshape(-1)).cast("B"))
        batch[key] = a
    return batch


def _worker_main(conn, make_batch, parent_pid, inherited=()):
    """Loop: receive a task, send its batch (:func:`_send_result`) or ``("error", task,
    is_user_error, message, traceback)``; stop on ``None``, a closed pipe or a vanished parent.

    ``inherited`` are the parent's pipe ends that a forked child holds copies of; they are
    closed so that the parent closing its end really breaks this worker's pipe."""
    for other in inherited:
        other.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import cv2
    cv2.setNumThreads(0)
    while True:
        try:
            if not conn.poll(1.0):
                if os.getppid() != parent_pid:
                    return
                continue
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        try:
            batch = make_batch(task)
        except Exception as e:
            batch = None
            error = ("error", task, isinstance(e, UserError), _one_line(e),
                     getattr(e, "worker_traceback", "") or traceback.format_exc())
        try:
            if batch is None:
                conn.send(error)
            else:
                _send_result(conn, task, batch)
        except (BrokenPipeError, EOFError, OSError):
            return
        except Exception as e:  # the batch could not be pickled: nothing was sent yet
            try:
                conn.send(("error", task, False, "cannot send the batch: " + _one_line(e),
                           traceback.format_exc()))
            except Exception:
                return


def _shutdown(processes, conns):
    """Ask the workers to stop and close the pipes (a worker blocked sending a batch nobody will
    read gets a broken pipe and exits); terminate the ones that are still alive after that."""
    for conn in conns:
        try:
            conn.send(None)
        except Exception:
            pass
    for conn in conns:
        try:
            conn.close()
        except Exception:
            pass
    deadline = time.monotonic() + JOIN_TIMEOUT
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.terminate()
            p.join(JOIN_TIMEOUT)
        if p.is_alive():
            p.kill()
            p.join(JOIN_TIMEOUT)


def _terminate(processes):
    """SIGTERM the processes still alive, without waiting."""
    for p in processes:
        if p.is_alive():
            p.terminate()


def _describe_exit(exitcode):
    """How a worker ended, for an error message (exit code or signal name)."""
    if exitcode is None:
        return "closed its pipe unexpectedly"
    if exitcode < 0:
        try:
            return "was killed by signal %s" % signal.Signals(-exitcode).name
        except ValueError:
            return "was killed by signal %d" % -exitcode
    return "exited with code %d" % exitcode


class OrderedLoader:
    """Iterator over ``make_batch(task)`` for ``tasks`` in order, computed by worker processes.

    Each worker gets its own duplex pipe; task ``j`` goes to worker ``j % W`` and each worker
    answers in order, so the results come back in order without reordering buffers. At most
    ``prefetch`` tasks are outstanding per worker (bounded memory). A batch crosses the pipe as
    raw array bytes after a small pickled layout. The main process waits on the worker's pipe
    *and* its process sentinel, so a worker that dies is reported at once (exit code or
    signal), and a worker silent for ``timeout`` seconds is reported too: never a hang. An
    exception in a worker comes back as one line naming the image file and is raised again in
    the main process (a ``UserError`` stays a ``UserError``, anything else is a
    :class:`LoaderError` carrying the worker's traceback). Workers run only numpy/OpenCV code
    (``cv2.setNumThreads(0)``), never MXNet, so the default 'fork' start method is safe even
    after MXNet's engine has run in the parent ('spawn' works too). Workers ignore SIGINT (the
    parent shuts them down) and exit when the parent goes away; ``close()`` (or ``with``),
    garbage collection and interpreter exit stop them.

    Args:
        make_batch: ``task -> batch`` (:class:`TrainBatchMaker`, :class:`TestBatchMaker`);
            picklable when the start method is 'spawn'.
        tasks: iterable of tasks (iteration or batch numbers), possibly endless.
        processes (int): worker processes; 0 runs ``make_batch`` in this process.
        prefetch (int): tasks sent ahead per worker.
        timeout (float): seconds without an answer from a live worker before a LoaderError.
        start_method (str or None): multiprocessing start method; default 'fork' where it
            exists, else 'spawn'.
        name, task_name (str): how error messages name the loader and a task.
    """

    def __init__(self, make_batch, tasks, processes=0, prefetch=2, timeout=DEFAULT_TIMEOUT,
                 start_method=None, name="data loader", task_name="task"):
        self.make_batch = make_batch
        self.name = name
        self.task_name = task_name
        self.timeout = float(timeout)
        self._tasks = iter(tasks)
        self._pending = collections.deque()  # (sequence number, task) sent and not received
        self._sent = 0
        self._closed = False
        self._processes = []
        self._conns = []
        self._finalizer = weakref.finalize(self, _shutdown, self._processes, self._conns)
        if processes > 0:
            try:
                self._start_workers(int(processes), start_method)
                for _ in range(int(processes) * max(1, int(prefetch))):
                    if not self._send_next():
                        break
            except BaseException:
                self.close()
                raise

    def _start_workers(self, count, start_method):
        if start_method is None:
            methods = multiprocessing.get_all_start_methods()
            start_method = "fork" if "fork" in methods else "spawn"
        ctx = multiprocessing.get_context(start_method)
        for _ in range(count):
            parent_conn, child_conn = ctx.Pipe(duplex=True)
            inherited = self._conns + [parent_conn] if start_method == "fork" else []
            p = ctx.Process(target=_worker_main,
                            args=(child_conn, self.make_batch, os.getpid(), inherited),
                            daemon=True, name="mxmask-loader")
            p.start()
            child_conn.close()
            self._processes.append(p)
            self._conns.append(parent_conn)

    def _send_next(self):
        """Send the next task to its worker; False when the tasks are exhausted."""
        try:
            task = next(self._tasks)
        except StopIteration:
            return False
        worker = self._sent % len(self._processes)
        try:
            self._conns[worker].send(task)
        except OSError:
            self._raise_dead(worker, task)
        self._pending.append((self._sent, task))
        self._sent += 1
        return True

    def _receive(self, worker, task):
        """The answer of ``worker`` for ``task``, or an error when it dies or stays silent."""
        conn, proc = self._conns[worker], self._processes[worker]
        ready = multiprocessing.connection.wait([conn, proc.sentinel], timeout=self.timeout)
        if not ready:
            raise LoaderError("%s produced nothing for %.0f s on %s %s (stuck?)"
                              % (self._worker_name(worker), self.timeout, self.task_name, task))
        if conn in ready:
            try:
                message = conn.recv()
                if message[0] == "arrays":
                    return ("ok", message[1], _receive_arrays(conn, message[2]))
                if message[0] == "pickled":
                    return ("ok",) + tuple(message[1:])
                return message
            except (EOFError, OSError):
                pass
        self._raise_dead(worker, task)

    def _worker_name(self, worker):
        return "%s worker %d (pid %d)" % (self.name, worker, self._processes[worker].pid)

    def _raise_dead(self, worker, task):
        proc = self._processes[worker]
        proc.join(JOIN_TIMEOUT)
        hint = " (out of memory?)" if proc.exitcode == -signal.SIGKILL else ""
        raise LoaderError("%s %s while working on %s %s%s"
                          % (self._worker_name(worker), _describe_exit(proc.exitcode),
                             self.task_name, task, hint))

    def _next_in_workers(self):
        seq, task = self._pending.popleft()
        message = self._receive(seq % len(self._processes), task)
        if message[0] == "error":
            _, _, is_user_error, text, tb = message
            if is_user_error:
                raise UserError(text)
            raise LoaderError(text, tb)
        self._send_next()
        return message[2]

    def __iter__(self):
        return self

    def __next__(self):
        if self._closed:
            raise StopIteration
        try:
            if not self._processes:
                return self.make_batch(next(self._tasks))
            if not self._pending:
                raise StopIteration
            return self._next_in_workers()
        except BaseException:
            _terminate(self._processes)  # after an error the workers may be stuck: no grace
            self.close()
            raise

    def close(self):
        """Stop the workers (idempotent)."""
        self._closed = True
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------------------------
# Public builders
# --------------------------------------------------------------------------------------------
def _count_iterations(start):
    """``start, start + 1, ...`` forever (the training tasks)."""
    it = int(start)
    while True:
        yield it
        it += 1


def build_train_loader(cfg, records, info=None, start_iter=0, rank=0, num_workers=1,
                       loader_workers=None, prefetch=2, timeout=DEFAULT_TIMEOUT, reader=None,
                       start_method=None):
    """Endless iterator of training batches from iteration ``start_iter``.

    Args:
        cfg: the config (``seed``, ``solver.ims_per_batch``, ``data.num_workers``, ``input.*``).
        records (list[dict]): the training records of :func:`mxmask.data.coco.load_coco`.
        info (DatasetInfo or None): the dataset's keypoint names and flip map.
        start_iter (int): the first iteration (a resumed run's checkpoint iteration).
        rank (int), num_workers (int): this training process among ``num_workers``; each gets
            ``ims_per_batch / num_workers`` images of every global batch.
        loader_workers (int or None): overrides ``cfg.data.num_workers`` (worker processes,
            0 = in process).
        prefetch, timeout, start_method: as in :class:`OrderedLoader`.
        reader: overrides the image reader (default :func:`mxmask.data.images.read_image`).

    Returns:
        OrderedLoader: yields one batch dict per iteration (DEVELOPING.md, "Training batches":
        ``data`` float32 (B, 3, Hp, Wp), ``im_info`` (B, 3), ``gt_boxes`` (B, G, 4), ...), with
        the :class:`TrainSampler` as its ``sampler`` attribute. Close it to stop the workers.
    """
    sampler = TrainSampler(len(records), cfg.solver.ims_per_batch, cfg.seed, rank, num_workers)
    make_batch = TrainBatchMaker(cfg, records, info, sampler, reader)
    processes = cfg.data.num_workers if loader_workers is None else loader_workers
    loader = OrderedLoader(make_batch, _count_iterations(start_iter), processes, prefetch,
                           timeout, start_method, name="train loader", task_name="iteration")
    loader.sampler = sampler
    return loader


def shard_records(records, shard=(0, 1)):
    """This shard's records; the shards of one ``num`` partition the records.

    Args:
        records (list): all records.
        shard (tuple): ``(rank, num)`` with ``0 <= rank < num``; ValueError otherwise.

    Returns:
        list: records ``rank::num``.
    """
    rank, num = int(shard[0]), int(shard[1])
    if num < 1 or not 0 <= rank < num:
        raise ValueError("shard %r: need 0 <= rank < num" % (shard,))
    return list(records[rank::num])


def build_test_loader(cfg, records, batch_size=1, shard=(0, 1), loader_workers=None, prefetch=2,
                      timeout=DEFAULT_TIMEOUT, reader=None, start_method=None):
    """Iterator of test batches over this shard's records, each record exactly once, in order.

    Args:
        cfg: the config (``data.num_workers`` and the test-time ``input.*`` settings).
        records (list[dict]): the records (:func:`mxmask.data.coco.load_coco` with
            ``for_training=False``).
        batch_size (int): images per batch, >= 1.
        shard (tuple): ``(rank, num)``: this process takes records ``rank::num``.
        loader_workers, prefetch, timeout, reader, start_method: as in
            :func:`build_train_loader`.

    Returns:
        OrderedLoader: yields dicts with ``data`` float32 (B, 3, Hp, Wp), ``im_info`` float32
        (B, 3), ``image_id`` int64 (B,) and ``orig_size`` int64 (B, 2) = (height, width);
        ``len()`` is its number of batches.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    make_batch = TestBatchMaker(cfg, shard_records(records, shard), batch_size, reader)
    processes = cfg.data.num_workers if loader_workers is None else loader_workers
    processes = min(int(processes), len(make_batch))
    loader = _SizedLoader(make_batch, range(len(make_batch)), processes, prefetch, timeout,
                          start_method, name="test loader", task_name="batch")
    return loader


class _SizedLoader(OrderedLoader):
    """An :class:`OrderedLoader` whose ``len()`` is its batch maker's number of batches."""

    def __len__(self):
        return len(self.make_batch)
