"""The training loop: a kvstore ``gluon.Trainer`` over any list of contexts, resumable.

What goes in: a resolved config, the network and its loss block, a list of contexts
(``[mx.cpu(0), mx.cpu(1)]`` or ``[mx.gpu(0), ...]``), a kvstore name (``device``, ``local`` or
``dist_sync``) and a loader of numpy batch dicts (:mod:`mxmask.data.loader`).
What comes out: the checkpoint folder ``cfg.output_dir`` (see :mod:`mxmask.engine.checkpoint`)
with ``history.json`` beside it (``curves.png`` is drawn from it by :mod:`mxmask.train`).

Each step (:class:`Trainer`) gives every context its share of the batch, sums the gradients
over contexts and workers, checks and clips them, and applies the update. A run resumed from a
checkpoint repeats the straight run (:meth:`Trainer.train`; DEVELOPING.md, "Determinism and
resume"), and a distributed run never hangs on a dead worker (:class:`Watchdog`).
"""
import json
import math
import os
import sys
import threading
import time
from contextlib import contextmanager

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from ..utils import UserError, atomic_write_json
from . import checkpoint as ckpt_io
from .schedule import lr_at

DEFAULT_DIST_TIMEOUT = 600.0
EXIT_DIST_TIMEOUT = 3
DUMP_PARAMS_ENV = "MXMASK_DUMP_WORKER_PARAMS"   # set: every worker saves OUT/worker{rank}.params


class NonFiniteLoss(UserError):
    """A loss or the gradient became NaN or inf and the policy is to stop."""


def split_batch(batch, ctxs):
    """Split a numpy batch dict along axis 0 across ``ctxs`` (uneven splits allowed).

    Args:
        batch (dict): numpy arrays with the batch on axis 0 (``image_id`` is left out).
        ctxs (list[mx.Context]): the contexts, in order; 5 images on 3 contexts go 2/1/2.

    Returns:
        list: ``(ctx, dict of NDArray)`` per context that gets at least one image; float64,
        uint8 and integer arrays become float32.
    """
    n = len(batch["data"])
    bounds = np.linspace(0, n, len(ctxs) + 1).round().astype(int)
    parts = []
    for ctx, lo, hi in zip(ctxs, bounds[:-1], bounds[1:]):
        if hi <= lo:
            continue
        parts.append((ctx, {k: mx.nd.array(v[lo:hi], ctx=ctx, dtype=_dtype(v))
                            for k, v in batch.items() if k != "image_id"}))
    return parts


def _dtype(v):
    """The NDArray dtype of a batch array: float32 for float64, uint8 and integers."""
    return np.float32 if v.dtype in (np.float64, np.uint8, np.int64, np.int32) else v.dtype


def step_seed(seed, it):
    """The MXNet RNG seed of iteration ``it``: fixed by the run seed and the iteration."""
    return (int(seed) * 1000003 + int(it)) % (2 ** 31 - 1)


def optimizer_settings(solver):
    """The ``gluon.Trainer`` settings of ``solver.optimizer``.

    SGD with momentum (Detectron2's solver) or Adam (beta 0.9/0.999, eps 1e-8). Both take
    ``weight_decay`` as an L2 term added to the gradient, and the learning rate of the schedule
    (linear warmup, then step or cosine, :mod:`mxmask.engine.schedule`), which the loop sets
    at every iteration.

    Args:
        solver: ``cfg.solver``.

    Returns:
        dict: the optimizer parameters (``learning_rate``, ``wd``, ``rescale_grad`` and
        ``momentum`` or the Adam betas and epsilon).
    """
    settings = {"learning_rate": solver.base_lr, "wd": solver.weight_decay, "rescale_grad": 1.0}
    if solver.optimizer == "sgd":
        settings["momentum"] = solver.momentum
    else:
        settings.update(beta1=0.9, beta2=0.999, epsilon=1e-8)
    return settings


def dist_timeout(cfg):
    """Seconds a distributed exchange may take.

    Args:
        cfg: the config; its ``solver.dist_timeout`` is used when it has one.

    Returns:
        float: ``MXMASK_DIST_TIMEOUT``, else ``solver.dist_timeout``, else
        :data:`DEFAULT_DIST_TIMEOUT`; 0 disables the watchdog.

    Raises:
        UserError: for a value that is not a number >= 0.
    """
    text = os.environ.get("MXMASK_DIST_TIMEOUT", "").strip()
    if text:
        try:
            value = float(text)
        except ValueError:
            raise UserError("MXMASK_DIST_TIMEOUT=%r: expected a number of seconds" % text)
    else:
        value = float(getattr(cfg.solver, "dist_timeout", DEFAULT_DIST_TIMEOUT))
    if value < 0 or not math.isfinite(value):
        raise UserError("the distributed timeout must be >= 0 seconds (0 disables), not %s"
                        % value)
    return value


def _exit_on_timeout(message):
    """Print the message and leave at once with :data:`EXIT_DIST_TIMEOUT` (no exit handlers)."""
    try:
        sys.stdout.flush()
        sys.stderr.write("mxmask: error: %s\n" % message)
        sys.stderr.flush()
    finally:
        os._exit(EXIT_DIST_TIMEOUT)


class Watchdog:
    """Ends the process when a guarded call takes longer than ``timeout`` seconds.

    In a distributed run (``dist_sync``), a kvstore call that waits for a process that died
    would block forever (ps-lite has no failure detection that ends the others). So every
    blocking exchange of the :class:`Trainer` runs under ``with watchdog.guard("gradient
    exchange"): ...``, bounded by :func:`dist_timeout` (``MXMASK_DIST_TIMEOUT``, else
    ``solver.dist_timeout``). The exchange right after a periodic evaluation is not bounded,
    because the other workers wait there for worker 0's evaluation.

    The check runs in a daemon thread (MXNet releases the GIL while it waits), which calls
    ``on_timeout(message)``; the default prints the message and leaves with
    :data:`EXIT_DIST_TIMEOUT` without running exit handlers (a blocked kvstore would hang
    them).

    Args:
        timeout (float or None): seconds; 0 or None disables it.
        who (str): prefixes the message ("worker 1").
        on_timeout: ``on_timeout(message)``, default :func:`_exit_on_timeout`.
        poll (float): seconds between checks.
    """

    def __init__(self, timeout, who="", on_timeout=None, poll=0.5):
        self.timeout = float(timeout or 0)
        self.who = who
        self.on_timeout = on_timeout or _exit_on_timeout
        self.poll = poll
        self._lock = threading.Lock()
        self._deadline = None
        self._what = ""
        self._thread = None
        self.fired = False

    @contextmanager
    def guard(self, what, enabled=True):
        """Bound the ``with`` block by the timeout; ``what`` names it in the message."""
        if not enabled or self.timeout <= 0:
            yield
            return
        self._start()
        with self._lock:
            self._deadline = time.monotonic() + self.timeout
            self._what = what
        try:
            yield
        finally:
            with self._lock:
                self._deadline = None

    def _start(self):
        """Start the checking thread on first use."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mxmask-watchdog", daemon=True)
            self._thread.start()

    def _run(self):
        """The checking thread: fire ``on_timeout`` once per guarded call that runs late."""
        while True:
            time.sleep(self.poll)
            with self._lock:
                late = self._deadline is not None and time.monotonic() > self._deadline
                what = self._what
                if late:
                    self._deadline = None
            if late:
                self.fired = True
                self.on_timeout(
                    "%s%s took longer than %g s (MXMASK_DIST_TIMEOUT); another process of the "
                    "distributed job has probably died or hangs; stopping this one"
                    % (self.who + ": " if self.who else "", what, self.timeout))


class History:
    """Loss, lr and evaluation records, saved as ``history.json`` and plotted as ``curves.png``.

    Args:
        path (str): the ``history.json`` file; an existing one is loaded (a resumed run cuts
            it back to its start with :meth:`truncate`).

    ``data`` is ``{"iter": [...], "lr": [...], "losses": {name: [...]}, "eval": [{"iter", task:
    AP}, ...]}``, the input of :func:`mxmask.vis.plot_training_curves`.
    """

    def __init__(self, path):
        self.path = path
        self.data = {"iter": [], "lr": [], "losses": {}, "eval": []}
        if os.path.exists(path):
            with open(path) as f:
                self.data = json.load(f)

    def truncate(self, it):
        """Drop records after iteration ``it`` (a resumed run repeats them)."""
        keep = [i for i, x in enumerate(self.data["iter"]) if x <= it]
        n = len(keep)
        self.data["iter"] = self.data["iter"][:n]
        self.data["lr"] = self.data["lr"][:n]
        self.data["losses"] = {k: v[:n] for k, v in self.data["losses"].items()}
        self.data["eval"] = [e for e in self.data["eval"] if e["iter"] <= it]

    def add(self, it, lr, losses):
        """Record iteration ``it``'s learning rate and losses ``{name: float}``."""
        self.data["iter"].append(int(it))
        self.data["lr"].append(float(lr))
        for k, v in losses.items():
            self.data["losses"].setdefault(k, []).append(float(v))

    def add_eval(self, it, metrics):
        """Record the AP of each task of an evaluation at iteration ``it``."""
        entry = {"iter": int(it)}
        entry.update({task: m.get("AP", 0.0) for task, m in metrics.items()})
        self.data["eval"].append(entry)

    def save(self):
        """Write ``history.json`` atomically."""
        atomic_write_json(self.path, self.data)


def format_eta(seconds):
    """``m:ss`` or ``h:mm:ss``."""
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return "%d:%02d:%02d" % (h, m, s) if h else "%d:%02d" % (m, s)


def format_progress(done, max_iter, speed, lr, losses, eta_seconds):
    """The periodic progress line: iteration, it/s, lr, total and each loss, ETA."""
    loss_text = "  ".join("%s %.4f" % (k, v) for k, v in losses.items())
    return ("iter %d/%d  %.2f it/s  lr %.6g  loss %.4f  %s  eta %s"
            % (done, max_iter, speed, lr, sum(losses.values()), loss_text,
               format_eta(eta_seconds)))


class Trainer:
    """Runs ``solver.max_iter`` iterations of ``loss_net`` over batches from ``loader_fn``.

    A step is :meth:`forward_backward` (losses and gradients per context) then :meth:`step`
    (reduce, check, clip, update). ``loss_net(**inputs) -> dict name -> scalar NDArray``
    computes the losses of one context's images (a staged block with ``begin`` / ``finish``,
    :class:`mxmask.modeling.training.RCNNLoss`, is run stage by stage over the contexts).
    :meth:`train` takes ``loader_fn(start_iter)``, which returns an iterator of numpy batch
    dicts starting at ``start_iter``, and ``evaluate_fn(it) -> metrics`` (or None).

    Args:
        cfg: the resolved config (``solver.*``, ``seed``, ``output_dir``).
        net (gluon.Block): the model whose parameters are trained and saved.
        loss_net: the loss block over ``net``.
        ctxs (list[mx.Context]): the contexts of this worker.
        kvstore (str or KVStore): ``device``, ``local`` or ``dist_sync`` (``dist_async`` is
            refused); with one context on one machine no kvstore is used.
        out: where worker 0 prints the progress lines (default ``sys.stdout``).
        watchdog (Watchdog or None): default, for a distributed kvstore, one with
            :func:`dist_timeout`.
    """

    def __init__(self, cfg, net, loss_net, ctxs, kvstore="device", out=None, watchdog=None):
        self.cfg = cfg
        self.net = net
        self.loss_net = loss_net
        self.ctxs = list(ctxs)
        self.out = out or sys.stdout        # looked up now, not when the module was imported
        self.kv = mx.kv.create(kvstore) if isinstance(kvstore, str) else kvstore
        self.distributed = "dist" in self.kv.type
        if self.distributed and "async" in self.kv.type:
            raise UserError("kvstore %s is not supported: use dist_sync" % self.kv.type)
        params = {k: v for k, v in net.collect_params().items() if v.grad_req != "null"}
        s = cfg.solver
        # One context on one machine needs no kvstore. Otherwise the kvstore only sums the
        # gradients (update_on_kvstore=False), so that they can be checked and clipped.
        use_kv = self.kv if (self.distributed or len(self.ctxs) > 1) else None
        self.trainer = gluon.Trainer(params, s.optimizer, optimizer_settings(s),
                                     kvstore=use_kv, update_on_kvstore=False)
        self.params = list(params.values())
        if watchdog is None and self.distributed:
            watchdog = Watchdog(dist_timeout(cfg), "worker %d" % self.kv.rank)
        self.watchdog = watchdog
        self._unbounded_next_exchange = False

    @property
    def rank(self):
        return self.kv.rank

    @property
    def num_workers(self):
        return self.kv.num_workers

    def _log(self, text):
        if self.rank == 0:
            print(text, file=self.out, flush=True)

    @contextmanager
    def _guard(self, what):
        if self.watchdog is None:
            yield
        else:
            with self.watchdog.guard(what, enabled=not self._unbounded_next_exchange):
                yield

    # ----------------------------------------------------------------------------------------
    # One step
    # ----------------------------------------------------------------------------------------
    def forward_backward(self, batch):
        """Losses and gradients of this worker's batch.

        The loader yields this worker's share of the global batch (``solver.ims_per_batch``
        images over all workers); :func:`split_batch` cuts it across the contexts, uneven counts
        too. Each context computes the losses of its images under ``autograd.record``. Its
        total is scaled by its share of the *global* batch (its images / ``ims_per_batch``), so
        the gradients summed over contexts and workers are the global-batch mean. Each context
        normalises its losses over its own images (and its own sampled rois / positives), as
        Detectron2 does per GPU, so the model's losses depend a little on how the batch is
        split; the trainer adds nothing to that. A context that gets no image has its
        gradients zeroed.

        Args:
            batch (dict): numpy arrays (DEVELOPING.md, "Training batches").

        Returns:
            dict: ``{loss name: float}``, the mean over this worker's images of each context's
            losses (what the progress line shows).
        """
        parts = split_batch(batch, self.ctxs)
        local_images = float(len(batch["data"]))
        global_images = float(self.cfg.solver.ims_per_batch)
        outs = []
        with autograd.record():
            # every context's first stage is queued before any second stage waits for its
            # number of positives (RCNNLoss.begin / finish, modeling/training.py); a loss
            # block without stages is simply called
            staged = hasattr(self.loss_net, "begin")
            states = [self.loss_net.begin(**inputs) if staged else inputs for _, inputs in parts]
            for (ctx, inputs), state in zip(parts, states):
                losses = self.loss_net.finish(state) if staged else self.loss_net(**state)
                count = inputs["data"].shape[0]
                total = mx.nd.add_n(*losses.values()) * (count / global_images)
                outs.append((total, losses, count))
        autograd.backward([o[0] for o in outs])
        used = {str(ctx) for ctx, _ in parts}
        idle = [i for i, ctx in enumerate(self.ctxs) if str(ctx) not in used]
        for p in self.params:
            grads, data = p.list_grad(), p.list_data()
            for i in idle:
                grads[i][:] = 0
                data[i]._fresh_grad = True      # Gluon keeps the flag on the weight array
        totals = {}
        for _, losses, count in outs:
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + float(v.asscalar()) * count / local_images
        return totals

    def global_grad_norm(self):
        """L2 norm over all parameters of the gradient held by the first context (after
        ``allreduce_grads`` the global mean gradient); NaN/inf when any entry is."""
        grads = [p.list_grad()[0] for p in self.params]
        # one multi_sum_sq call for all arrays, not one norm call per array
        squares = mx.nd.multi_sum_sq(*grads, num_arrays=len(grads))
        return float(np.sqrt(np.sum(squares.asnumpy().astype(np.float64))))

    def _scale_gradients(self, factor):
        """Multiply every gradient of every context by ``factor`` in place."""
        for p in self.params:
            for g in p.list_grad():
                g *= factor

    def step(self, it, losses):
        """Reduce, check, clip and apply the gradients of iteration ``it``.

        ``allreduce_grads()`` sums the gradients of all contexts and workers (the Gluon trainer
        always runs with ``update_on_kvstore=False``, also for ``dist_sync``: servers only sum,
        each worker applies the same update to the same weights). Every context then holds the
        global mean gradient, and its global L2 norm decides the rest. A non-finite norm, or a
        non-finite loss on this worker (which poisons the gradient it sends, so every worker
        takes the same decision), stops the run with :class:`NonFiniteLoss`, keeping the last
        good checkpoint, or with ``solver.nonfinite_policy=skip`` skips the batch (no parameter
        or momentum change). Gradient clipping (``solver.clip_gradient > 0``) scales the
        *reduced* gradient so that its global norm is at most the threshold (as
        ``torch.nn.utils.clip_grad_norm_`` on the averaged gradient, Detectron2's
        ``CLIP_TYPE=norm`` over the full model). Gluon's ``clip_global_norm`` on each context's
        un-reduced gradient would instead clip partial sums, so its result would depend on the
        number of contexts. ``update()`` then applies ``solver.optimizer``
        (:func:`optimizer_settings`).

        Args:
            it (int): the 0-based iteration.
            losses (dict): ``{name: float}`` of :meth:`forward_backward`.

        Returns:
            bool: True if the update was applied, False if the batch was skipped.
        """
        loss_ok = all(math.isfinite(v) for v in losses.values())
        if not loss_ok and self.distributed:
            # Tell the other workers: a NaN in what we send makes the reduced gradient NaN.
            self.params[0].list_grad()[0][:] = float("nan")
        with self._guard("iteration %d: the gradient exchange" % (it + 1)):
            self.trainer.allreduce_grads()
            norm = self.global_grad_norm()
        self._unbounded_next_exchange = False
        if not loss_ok or not math.isfinite(norm):
            return self._nonfinite(it, losses, norm)
        max_norm = self.cfg.solver.clip_gradient
        if max_norm > 0 and norm > max_norm:
            self._scale_gradients(max_norm / (norm + 1e-6))
        self.trainer.update(1)
        return True

    def _nonfinite(self, it, losses, norm):
        """Skip the batch (``solver.nonfinite_policy=skip``) or raise :class:`NonFiniteLoss`."""
        bad = ["%s=%s" % (k, v) for k, v in losses.items() if not math.isfinite(v)]
        what = "non-finite loss (%s)" % ", ".join(bad) if bad else \
            "non-finite gradient (global norm %s%s)" % (
                norm, ", from another worker" if self.distributed else "")
        if self.cfg.solver.nonfinite_policy == "skip":
            self._log("iter %d: %s: batch skipped (solver.nonfinite_policy=skip)" % (it + 1, what))
            for p in self.params:
                p.zero_grad()
            return False
        progress = ckpt_io.read_progress(self.cfg.output_dir)
        kept = ("the last good checkpoint (iteration %d) in %s is kept"
                % (progress["iter"], self.cfg.output_dir)) if progress else \
            "no checkpoint had been written yet"
        raise NonFiniteLoss(
            "iter %d: %s; %s. Lower solver.base_lr, set solver.clip_gradient, or set "
            "solver.nonfinite_policy=skip" % (it + 1, what, kept))

    # ----------------------------------------------------------------------------------------
    # Checkpoints
    # ----------------------------------------------------------------------------------------
    def init_kvstore(self):
        """Put the weights into the kvstore, worker 0's (and context 0's) overwriting the
        others, and wait until every copy has them.

        Gluon does this lazily inside the first ``allreduce_grads``, where with a dist kvstore
        it races: the broadcast's pull into the weights and the gradients' push on the same key
        are ordered by different engine variables, so a worker's pull can be answered after the
        server has stored the gradient sum, and the worker's weights become that sum (seen
        with MXNet 1.9.1 and 2 workers). Waiting here, before any gradient is pushed, avoids it.
        """
        t = self.trainer
        with self._guard("broadcasting the initial weights"):
            if not t._kv_initialized:
                t._init_kvstore()
            if t._params_to_init:
                t._init_params()
            mx.nd.waitall()

    def resume_from(self, out_dir):
        """Load the newest intact checkpoint of ``out_dir`` (weights, and optimizer state when
        saved): the latest, or when that one is damaged the newest older ``iter_*`` one
        (:func:`mxmask.engine.checkpoint.resume_point`), which the log then names in one line.

        Returns:
            int: the iteration to start from (0 without a checkpoint).

        Raises:
            UserError: damaged files with no intact checkpoint left, or files that do not match
            the network or the optimizer.
        """
        point = ckpt_io.resume_point(out_dir)
        if point is None:
            return 0
        it, params, states, note = point
        if note:
            self._log(note)
        ckpt_io.load_params(self.net, params, ctx=self.ctxs)
        if states is not None:
            self.init_kvstore()
            ckpt_io.load_states(self.trainer, states)
        return int(it)

    def save(self, it):
        """Write the checkpoint of iteration ``it`` (worker 0 only). A failed write (a full
        disk: OSError, or MXNetError from MXNet's own writer) is a one-line :class:`UserError`
        naming the last intact checkpoint, which stays complete."""
        if self.rank != 0:
            return
        out_dir = self.cfg.output_dir
        try:
            ckpt_io.save_checkpoint(out_dir, self.net, self.trainer, it, self.cfg.solver.max_iter)
        except ckpt_io.WRITE_ERRORS as e:
            raise UserError("iter %d: could not write the checkpoint to %s (%s); %s"
                            % (it, out_dir, ckpt_io.error_text(e), self.kept_checkpoint()))

    def kept_checkpoint(self):
        """Which checkpoint a run stopped by a failed write leaves, as a phrase for its error.

        Returns:
            str: ``the checkpoint of iteration N is intact (iter_NNNNNNN; train --resume
            continues from it once there is space)`` or ``no earlier checkpoint exists``.
        """
        try:
            progress = ckpt_io.read_progress(self.cfg.output_dir)
        except UserError:
            progress = None
        if not progress:
            return "no earlier checkpoint exists"
        return ("the checkpoint of iteration %d is intact (%s; train --resume continues from it "
                "once there is space)" % (progress["iter"], progress.get("checkpoint", "")
                                          or "model.params"))

    def save_history(self, history, it):
        """``history.save()`` at iteration ``it``; a failed write is a one-line
        :class:`UserError` naming the intact checkpoint."""
        try:
            history.save()
        except ckpt_io.WRITE_ERRORS as e:
            raise UserError("iter %d: could not write %s (%s); %s"
                            % (it, history.path, ckpt_io.error_text(e), self.kept_checkpoint()))

    def close(self):
        """Drop this trainer's references to the kvstore (a dist kvstore is finalised, with a
        barrier over all workers, when the last reference goes)."""
        self.trainer._kvstore = None
        self.trainer._kvstore_params = {"kvstore": None, "update_on_kvstore": False}
        self.kv = _Closed(self.kv)

    # ----------------------------------------------------------------------------------------
    # The loop
    # ----------------------------------------------------------------------------------------
    def train(self, loader_fn, start_iter=0, evaluate_fn=None, history=None):
        """Run iterations ``start_iter .. solver.max_iter - 1``.

        The batch of iteration ``it`` and its augmentation are pure functions of
        ``(seed, it)`` (:mod:`mxmask.data.loader`), MXNet's RNG (used for target sampling) is
        re-seeded with :func:`step_seed` at every step, and the learning rate is a pure
        function of ``it`` (:func:`mxmask.engine.schedule.lr_at`). A run resumed from the
        checkpoint of iteration ``k`` (:meth:`resume_from`) therefore repeats the straight run
        from ``k`` on, given the saved weights and optimizer state. Worker 0 logs progress every
        ``solver.log_period`` iterations and checkpoints every ``solver.checkpoint_period``;
        ``evaluate_fn`` runs every ``solver.eval_period`` iterations (not at the last).

        Args:
            loader_fn: ``loader_fn(start_iter)`` -> iterator of numpy batch dicts; closed at
                the end when it has ``close``.
            start_iter (int): the first iteration.
            evaluate_fn: ``evaluate_fn(it) -> metrics dict`` or None.
            history (History or None): default ``output_dir/history.json``, truncated to
                ``start_iter``.

        Returns:
            History: the loss, lr and evaluation records.
        """
        history = history or History(os.path.join(self.cfg.output_dir, "history.json"))
        history.truncate(start_iter)
        self.init_kvstore()
        loader = loader_fn(start_iter)
        try:
            self._loop(loader, start_iter, evaluate_fn, history)
        finally:
            close = getattr(loader, "close", None)
            if close:
                close()
        if os.environ.get(DUMP_PARAMS_ENV):
            self.net.save_parameters(
                os.path.join(self.cfg.output_dir, "worker%d.params" % self.rank))
        return history

    def _loop(self, loader, start_iter, evaluate_fn, history):
        """The iterations of :meth:`train`: seed, lr, step, log, checkpoint, evaluate."""
        s = self.cfg.solver
        t_start = time.time()
        window = []
        for it in range(start_iter, s.max_iter):
            mx.random.seed(step_seed(self.cfg.seed, it))
            lr = lr_at(s, it)
            self.trainer.set_learning_rate(lr)
            t0 = time.time()
            batch = next(loader)
            losses = self.forward_backward(batch)
            self.step(it, losses)
            window.append(time.time() - t0)
            done = it + 1
            if done % s.log_period == 0 or done == s.max_iter or done == start_iter + 1:
                history.add(done, lr, losses)
                speed = len(window) / max(1e-9, sum(window))
                window = []
                rate = (done - start_iter) / max(1e-9, time.time() - t_start)
                self._log(format_progress(done, s.max_iter, speed, lr, losses,
                                          (s.max_iter - done) / max(1e-9, rate)))
            if done % s.checkpoint_period == 0 or done == s.max_iter:
                # history first: a crash between the two leaves records past the checkpoint,
                # which a resumed run truncates; the other order could lose records
                if self.rank == 0:
                    self.save_history(history, done)
                self.save(done)
            if evaluate_fn is not None and s.eval_period > 0 and done % s.eval_period == 0 \
                    and done != s.max_iter:
                metrics = evaluate_fn(done)
                if metrics:
                    history.add_eval(done, metrics)
                self._unbounded_next_exchange = self.distributed


class _Closed:
    """Stands in for a closed kvstore: keeps ``rank``/``num_workers``/``type`` readable."""

    def __init__(self, kv):
        self.rank, self.num_workers, self.type = kv.rank, kv.num_workers, kv.type
