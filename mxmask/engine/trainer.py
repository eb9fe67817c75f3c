"""The training loop: a kvstore ``gluon.Trainer`` over any list of contexts, resumable.

What goes in: a resolved config, a list of contexts (``[mx.cpu(0), mx.cpu(1)]`` or
``[mx.gpu(0), ...]``) and a kvstore name (``device``, ``local`` or ``dist_sync``).
What comes out: the checkpoint folder ``cfg.output_dir`` (see :mod:`mxmask.engine.checkpoint`)
with ``history.json`` and ``curves.png`` beside it.

How a step works: the loader yields this worker's share of the global batch
(``solver.ims_per_batch`` images over all workers); it is split across the contexts (odd counts
too); each context computes the losses of its images under ``autograd.record``, scaled by its
share of the images so that the gradients summed by the kvstore are the global batch mean;
``trainer.step(1)`` applies SGD with momentum and weight decay at the scheduled rate.

Determinism and exact resume: the batch of iteration ``it`` and its augmentation are pure
functions of ``(seed, it)`` (see :mod:`mxmask.data.loader`), MXNet's RNG (used for target
sampling) is re-seeded from ``(seed, it)`` at every step, and the learning rate is a pure
function of ``it``. A run resumed from the checkpoint of iteration ``k`` therefore repeats the
straight run from ``k`` on, given the saved weights and optimizer state.
"""
import json
import math
import os
import sys
import time

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from ..utils import UserError, atomic_write_json
from . import checkpoint as ckpt_io
from .schedule import lr_at


class NonFiniteLoss(UserError):
    """A loss became NaN or inf and the policy is to stop."""


def split_batch(batch, ctxs):
    """Split a numpy batch dict along axis 0 across ``ctxs`` (uneven splits allowed).

    Returns a list of ``(ctx, dict of NDArray)``; contexts that would get no image are dropped.
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
    return np.float32 if v.dtype in (np.float64, np.uint8, np.int64, np.int32) else v.dtype


def step_seed(seed, it):
    """The MXNet RNG seed of iteration ``it``: fixed by the run seed and the iteration."""
    return (int(seed) * 1000003 + int(it)) % (2 ** 31 - 1)


class History:
    """Loss, lr and evaluation records, saved as ``history.json`` and plotted as ``curves.png``."""

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
        self.data["iter"].append(int(it))
        self.data["lr"].append(float(lr))
        for k, v in losses.items():
            self.data["losses"].setdefault(k, []).append(float(v))

    def add_eval(self, it, metrics):
        entry = {"iter": int(it)}
        entry.update({task: m.get("AP", 0.0) for task, m in metrics.items()})
        self.data["eval"].append(entry)

    def save(self):
        atomic_write_json(self.path, self.data)


def format_eta(seconds):
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return "%d:%02d:%02d" % (h, m, s) if h else "%d:%02d" % (m, s)


class Trainer:
    """Runs ``solver.max_iter`` iterations of ``loss_net`` over batches from ``loader_fn``.

    ``loss_net(**inputs) -> dict name -> scalar NDArray`` computes the losses of one context's
    images; ``loader_fn(start_iter)`` returns an iterator of numpy batch dicts starting at
    ``start_iter``; ``evaluate_fn(it) -> metrics`` runs evaluation (or None).
    """

    def __init__(self, cfg, net, loss_net, ctxs, kvstore="device", out=sys.stdout):
        self.cfg = cfg
        self.net = net
        self.loss_net = loss_net
        self.ctxs = list(ctxs)
        self.out = out
        self.kv = mx.kv.create(kvstore) if isinstance(kvstore, str) else kvstore
        distributed = "dist" in self.kv.type
        params = {k: v for k, v in net.collect_params().items() if v.grad_req != "null"}
        s = cfg.solver
        self.trainer = gluon.Trainer(
            params, "sgd",
            {"learning_rate": s.base_lr, "momentum": s.momentum, "wd": s.weight_decay,
             "rescale_grad": 1.0},
            kvstore=self.kv, update_on_kvstore=False if distributed else None)
        self.params = list(params.values())

    @property
    def rank(self):
        return self.kv.rank

    @property
    def num_workers(self):
        return self.kv.num_workers

    def _log(self, text):
        if self.rank == 0:
            print(text, file=self.out, flush=True)

    def _forward_backward(self, batch):
        """Losses of the local batch; returns {name: value} averaged over the global batch."""
        parts = split_batch(batch, self.ctxs)
        global_images = float(self.cfg.solver.ims_per_batch)
        totals = {}
        with autograd.record():
            outs = []
            for ctx, inputs in parts:
                losses = self.loss_net(**inputs)
                share = inputs["data"].shape[0] / global_images
                total = sum(losses.values()) * share
                outs.append((total, losses, share))
        autograd.backward([o[0] for o in outs])
        for _, losses, share in outs:
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + float(v.asscalar()) * share
        return totals

    def _clip_gradients(self):
        max_norm = self.cfg.solver.clip_gradient
        if max_norm <= 0:
            return
        for ctx_index in range(len(self.ctxs)):
            grads = [p.list_grad()[ctx_index] for p in self.params]
            gluon.utils.clip_global_norm(grads, max_norm, check_isfinite=False)

    def _check_finite(self, losses, it):
        bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
        if not bad:
            return True
        text = ", ".join("%s=%s" % (k, v) for k, v in bad.items())
        if self.cfg.solver.nonfinite_policy == "skip":
            self._log("iter %d: non-finite loss (%s): batch skipped" % (it, text))
            for p in self.params:
                p.zero_grad()
            return False
        raise NonFiniteLoss(
            "iter %d: non-finite loss (%s); the last good checkpoint in %s is kept. Lower "
            "solver.base_lr, set solver.clip_gradient, or set solver.nonfinite_policy=skip"
            % (it, text, self.cfg.output_dir))

    def resume_from(self, out_dir):
        """Load the last checkpoint of ``out_dir``; return the iteration to start from."""
        progress = ckpt_io.read_progress(out_dir)
        if progress is None:
            return 0
        params, states = ckpt_io.checkpoint_files(out_dir)
        self.net.load_parameters(params, ctx=self.ctxs)
        if states is not None:
            self.trainer.load_states(states)
        return int(progress["iter"])

    def save(self, it):
        if self.rank != 0:
            return
        ckpt_io.save_checkpoint(self.cfg.output_dir, self.net, self.trainer, it,
                                self.cfg.solver.max_iter)

    def train(self, loader_fn, start_iter=0, evaluate_fn=None, history=None):
        s = self.cfg.solver
        history = history or History(os.path.join(self.cfg.output_dir, "history.json"))
        history.truncate(start_iter)
        loader = loader_fn(start_iter)
        t_start, it_start = time.time(), start_iter
        window = []
        for it in range(start_iter, s.max_iter):
            mx.random.seed(step_seed(self.cfg.seed, it))
            lr = lr_at(s, it)
            self.trainer.set_learning_rate(lr)
            t0 = time.time()
            batch = next(loader)
            losses = self._forward_backward(batch)
            if self._check_finite(losses, it):
                self._clip_gradients()
                self.trainer.step(1)
            window.append(time.time() - t0)
            done = it + 1
            if done % s.log_period == 0 or done == s.max_iter or done == start_iter + 1:
                history.add(done, lr, losses)
                speed = len(window) / max(1e-9, sum(window))
                window = []
                elapsed = time.time() - t_start
                rate = (done - it_start) / max(1e-9, elapsed)
                eta = (s.max_iter - done) / max(1e-9, rate)
                loss_text = "  ".join("%s %.4f" % (k, v) for k, v in losses.items())
                self._log("iter %d/%d  %.2f it/s  lr %.5f  loss %.4f  %s  eta %s"
                          % (done, s.max_iter, speed, lr, sum(losses.values()), loss_text,
                             format_eta(eta)))
            if done % s.checkpoint_period == 0 or done == s.max_iter:
                self.save(done)
                if self.rank == 0:
                    history.save()
            if evaluate_fn is not None and s.eval_period > 0 and done % s.eval_period == 0 \
                    and done != s.max_iter:
                metrics = evaluate_fn(done)
                if metrics:
                    history.add_eval(done, metrics)
        close = getattr(loader, "close", None)
        if close:
            close()
        return history
