"""The trainer: batch splitting over contexts, SGD maths, clipping, non-finite losses, the
progress line, curves, and failed checkpoint writes.

The exact-maths tests use a toy loss whose value is a mean over images (so a correct trainer
gives the same update for any split of the batch) and a numpy reference of MXNet's SGD
(``mom = momentum * mom - lr * (grad + wd * w); w += mom``). The end-to-end tests run the real
tiny shapes model in process.
"""
import errno
import io
import json
import math
import os
import re
import time

import mxnet as mx
import numpy as np
import pytest
from mxnet import gluon

from mxmask.config import get_config
from mxmask.engine import checkpoint as ck
from mxmask.engine import trainer as T
from mxmask.engine.schedule import lr_at
from mxmask.utils import UserError
from helpers.tiny import TINY, load_tiny_params, tiny_args, tiny_cfg  # noqa: F401

IN, OUT = 6, 3


class ToyLoss:
    """loss_sq: mean over images of sum((W x + b - t)^2); loss_lin: mean of 0.1 * sum(W x + b)."""

    def __init__(self, net):
        self.net = net

    def __call__(self, data, gt):
        out = self.net(data)
        n = data.shape[0]
        return {"loss_sq": ((out - gt) ** 2).sum().reshape((1,)) / n,
                "loss_lin": (0.1 * out).sum().reshape((1,)) / n}


def toy_cfg(ims, **solver):
    cfg = get_config("shapes")
    s = cfg.solver
    s.ims_per_batch, s.base_lr, s.momentum, s.weight_decay = ims, 0.05, 0.9, 0.01
    s.optimizer = "sgd"
    s.warmup_iters, s.warmup_factor, s.lr_schedule, s.steps, s.gamma = 2, 0.5, "step", [3], 0.1
    s.max_iter, s.checkpoint_period, s.log_period, s.clip_gradient = 4, 1000, 1000, 0.0
    for k, v in solver.items():
        setattr(s, k, v)
    return cfg


W0 = np.random.RandomState(0).randn(OUT, IN).astype(np.float32) * 0.5
B0 = np.random.RandomState(1).randn(OUT).astype(np.float32) * 0.5


def toy_trainer(cfg, ctxs, tmp, kvstore="device"):
    net = gluon.nn.Dense(OUT, in_units=IN)
    net.initialize(ctx=ctxs)
    net.weight.set_data(mx.nd.array(W0))
    net.bias.set_data(mx.nd.array(B0))
    cfg.output_dir = str(tmp)
    return T.Trainer(cfg, net, ToyLoss(net), ctxs, kvstore=kvstore, out=io.StringIO())


def toy_batches(n_iter, ims, seed=0):
    rng = np.random.RandomState(seed)
    return [{"data": rng.randn(ims, IN).astype(np.float32),
             "gt": rng.randn(ims, OUT).astype(np.float32),
             "image_id": np.arange(ims, dtype=np.int64)} for _ in range(n_iter)]


def reference_grads(w, b, batch):
    x, t = batch["data"].astype(np.float64), batch["gt"].astype(np.float64)
    out = x @ w.T + b
    dout = (2 * (out - t) + 0.1) / len(x)
    return dout.T @ x, dout.sum(0)


def reference_sgd(cfg, batches, clip=0.0, skip=()):
    s = cfg.solver
    w, b = W0.astype(np.float64), B0.astype(np.float64)
    mw, mb = np.zeros_like(w), np.zeros_like(b)
    for it, batch in enumerate(batches):
        if it in skip:
            continue
        gw, gb = reference_grads(w, b, batch)
        norm = math.sqrt((gw ** 2).sum() + (gb ** 2).sum())
        if clip > 0 and norm > clip:
            gw, gb = gw * clip / (norm + 1e-6), gb * clip / (norm + 1e-6)
        lr = lr_at(s, it)
        mw = s.momentum * mw - lr * (gw + s.weight_decay * w)
        mb = s.momentum * mb - lr * (gb + s.weight_decay * b)
        w, b = w + mw, b + mb
    return w, b


def reference_adam(cfg, batches):
    """Adam (Kingma & Ba, bias-corrected; eps added to the uncorrected root as MXNet does) with
    the L2 weight decay added to the gradient, at the scheduled learning rate."""
    s = cfg.solver
    w, b = W0.astype(np.float64), B0.astype(np.float64)
    state = [(np.zeros_like(w), np.zeros_like(w)), (np.zeros_like(b), np.zeros_like(b))]
    for it, batch in enumerate(batches):
        t = it + 1
        lr = lr_at(s, it) * math.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
        new = []
        for p, g, (m, v) in zip((w, b), reference_grads(w, b, batch), state):
            g = g + s.weight_decay * p
            m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
            new.append((p - lr * m / (np.sqrt(v) + 1e-8), (m, v)))
        (w, sw), (b, sb) = new
        state = [sw, sb]
    return w, b


def run(tr, batches):
    tr.cfg.solver.max_iter = len(batches)
    tr.train(lambda start: iter(batches[start:]))


def params_on_every_context(tr):
    out = []
    for p in (tr.net.weight, tr.net.bias):
        arrays = [a.asnumpy() for a in p.list_data()]
        for a in arrays[1:]:
            np.testing.assert_array_equal(a, arrays[0])     # contexts stay in sync
        out.append(arrays[0])
    return out


# --------------------------------------------------------------------------------------------
def test_split_batch_cuts_uneven_counts_in_order_and_drops_idle_contexts():
    batch = {"data": np.arange(5 * 2, dtype=np.float32).reshape(5, 2),
             "image_id": np.arange(5, dtype=np.int64), "gt_masks": np.ones((5, 1), np.uint8)}
    ctxs = [mx.cpu(0), mx.cpu(1), mx.cpu(2)]
    parts = T.split_batch(batch, ctxs)
    assert [p[1]["data"].shape[0] for p in parts] == [2, 1, 2]
    assert [p[0] for p in parts] == ctxs
    np.testing.assert_array_equal(np.concatenate([p[1]["data"].asnumpy() for p in parts]),
                                  batch["data"])
    assert all("image_id" not in p[1] and p[1]["gt_masks"].dtype == np.float32 for p in parts)
    two = {k: v[:2] for k, v in batch.items()}
    assert [(p[0], p[1]["data"].shape[0]) for p in T.split_batch(two, ctxs)] == \
        [(mx.cpu(0), 1), (mx.cpu(2), 1)]


@pytest.mark.parametrize("ims,kvstore", [(4, "device"), (3, "local"), (5, "device")])
def test_three_contexts_give_the_single_context_sgd_update(ims, kvstore, tmp_path):
    """Momentum, weight decay, warmup and a step decay over 4 iterations; uneven splits
    (4 -> 1/2/1, 5 -> 2/1/2) included: every context's loss is scaled by its share."""
    batches = toy_batches(4, ims)
    cfg1, cfg3 = toy_cfg(ims), toy_cfg(ims)
    one = toy_trainer(cfg1, [mx.cpu(0)], tmp_path / "one")
    three = toy_trainer(cfg3, [mx.cpu(0), mx.cpu(1), mx.cpu(2)], tmp_path / "three", kvstore)
    run(one, batches)
    run(three, batches)
    w_ref, b_ref = reference_sgd(cfg1, batches)
    w1, b1 = params_on_every_context(one)
    w3, b3 = params_on_every_context(three)
    np.testing.assert_allclose(w1, w_ref, atol=1e-5)
    np.testing.assert_allclose(b1, b_ref, atol=1e-5)
    np.testing.assert_allclose(w3, w1, atol=1e-5)
    np.testing.assert_allclose(b3, b1, atol=1e-5)


@pytest.mark.parametrize("ctxs", [[mx.cpu(0)], [mx.cpu(0), mx.cpu(1)]])
def test_adam_gives_the_reference_update(ctxs, tmp_path):
    batches = toy_batches(4, 4)
    cfg = toy_cfg(4, optimizer="adam", base_lr=0.01)
    tr = toy_trainer(cfg, ctxs, tmp_path)
    run(tr, batches)
    w_ref, b_ref = reference_adam(cfg, batches)
    w, b = params_on_every_context(tr)
    np.testing.assert_allclose(w, w_ref, atol=1e-5)
    np.testing.assert_allclose(b, b_ref, atol=1e-5)
    assert np.abs(w_ref - reference_sgd(toy_cfg(4, base_lr=0.01), batches)[0]).max() > 1e-3


def test_a_context_without_images_gets_zero_gradients_not_stale_ones(tmp_path):
    batches = toy_batches(3, 2)        # 2 images on 3 contexts: cpu(1) idle every step
    cfg = toy_cfg(2)
    tr = toy_trainer(cfg, [mx.cpu(0), mx.cpu(1), mx.cpu(2)], tmp_path)
    run(tr, batches)
    w, b = params_on_every_context(tr)
    w_ref, b_ref = reference_sgd(cfg, batches)
    np.testing.assert_allclose(w, w_ref, atol=1e-5)
    np.testing.assert_allclose(b, b_ref, atol=1e-5)


def test_clipping_scales_the_reduced_gradient_to_the_global_norm(tmp_path):
    """Per-context clipping (Gluon's clip_global_norm on each context's partial gradient)
    would give another result here: every partial norm is above the threshold too."""
    batches = toy_batches(2, 4)
    g = reference_grads(W0.astype(np.float64), B0.astype(np.float64), batches[0])
    norm = math.sqrt(sum((x ** 2).sum() for x in g))
    clip = 0.3 * norm
    results = []
    for ctxs in ([mx.cpu(0)], [mx.cpu(0), mx.cpu(1), mx.cpu(2)]):
        cfg = toy_cfg(4, clip_gradient=clip)
        tr = toy_trainer(cfg, ctxs, tmp_path / str(len(ctxs)))
        run(tr, batches)
        results.append(params_on_every_context(tr))
    w_ref, b_ref = reference_sgd(toy_cfg(4), batches, clip=clip)
    w_unclipped, _ = reference_sgd(toy_cfg(4), batches)
    assert np.abs(w_ref - w_unclipped).max() > 1e-3        # the clip matters
    for w, b in results:
        np.testing.assert_allclose(w, w_ref, atol=1e-5)
        np.testing.assert_allclose(b, b_ref, atol=1e-5)


def test_global_grad_norm_is_the_norm_of_the_summed_gradient(tmp_path):
    batch = toy_batches(1, 4)[0]
    tr = toy_trainer(toy_cfg(4), [mx.cpu(0), mx.cpu(1)], tmp_path)
    tr.init_kvstore()
    tr.forward_backward(batch)
    tr.trainer.allreduce_grads()
    g = reference_grads(W0.astype(np.float64), B0.astype(np.float64), batch)
    assert tr.global_grad_norm() == pytest.approx(math.sqrt(sum((x ** 2).sum() for x in g)),
                                                  rel=1e-5)


def nan_batches(ims=4):
    batches = toy_batches(3, ims)
    bad = dict(batches[1])
    bad["data"] = bad["data"].copy()
    bad["data"][ims - 1, 0] = np.nan            # one image of the last context
    return batches[:1] + [bad] + batches[1:]


@pytest.mark.parametrize("ctxs", [1, 3])
def test_skip_policy_skips_the_batch_without_touching_weights_or_momentum(ctxs, tmp_path):
    batches = nan_batches()
    cfg = toy_cfg(4, nonfinite_policy="skip", lr_schedule="step", steps=[], warmup_iters=0)
    tr = toy_trainer(cfg, [mx.cpu(i) for i in range(ctxs)], tmp_path)
    run(tr, batches)
    w, b = params_on_every_context(tr)
    w_ref, b_ref = reference_sgd(cfg, batches, skip={1})
    np.testing.assert_allclose(w, w_ref, atol=1e-5)
    np.testing.assert_allclose(b, b_ref, atol=1e-5)
    assert "iter 2: non-finite loss (loss_sq=nan, loss_lin=nan): batch skipped" in \
        tr.out.getvalue()


def test_stop_policy_raises_and_leaves_the_weights_of_the_last_good_step(tmp_path):
    batches = nan_batches()
    cfg = toy_cfg(4, warmup_iters=0)
    tr = toy_trainer(cfg, [mx.cpu(0), mx.cpu(1)], tmp_path)
    with pytest.raises(T.NonFiniteLoss, match=r"iter 2: non-finite loss \(loss_sq=nan") as e:
        run(tr, batches)
    assert "no checkpoint had been written yet" in str(e.value)
    w, b = params_on_every_context(tr)
    w_ref, b_ref = reference_sgd(cfg, batches[:1])
    np.testing.assert_allclose(w, w_ref, atol=1e-5)


def test_watchdog_fires_only_when_a_guarded_call_is_late():
    fired = []
    dog = T.Watchdog(0.3, "worker 1", on_timeout=fired.append, poll=0.05)
    with dog.guard("quick"):
        time.sleep(0.01)
    time.sleep(0.5)
    assert fired == []
    with dog.guard("iteration 7: the gradient exchange"):
        time.sleep(0.8)
    assert len(fired) == 1 and fired[0].startswith(
        "worker 1: iteration 7: the gradient exchange took longer than 0.3 s")
    off = T.Watchdog(0, on_timeout=fired.append, poll=0.05)
    with off.guard("anything"):
        time.sleep(0.2)
    assert len(fired) == 1 and off._thread is None


def test_dist_timeout_reads_the_environment(monkeypatch):
    cfg = get_config("shapes")
    monkeypatch.delenv("MXMASK_DIST_TIMEOUT", raising=False)
    assert T.dist_timeout(cfg) == T.DEFAULT_DIST_TIMEOUT
    monkeypatch.setenv("MXMASK_DIST_TIMEOUT", "12.5")
    assert T.dist_timeout(cfg) == 12.5
    monkeypatch.setenv("MXMASK_DIST_TIMEOUT", "soon")
    with pytest.raises(UserError, match="MXMASK_DIST_TIMEOUT"):
        T.dist_timeout(cfg)


# --------------------------------------------------------------------------------------------
# The real tiny model, in process
# --------------------------------------------------------------------------------------------
@pytest.fixture
def poison_iteration(monkeypatch):
    """poison_iteration(k): the loss and gradients of iteration k (1-based) become NaN."""
    original = T.Trainer.forward_backward

    def install(k):
        calls = []

        def forward_backward(self, batch):
            losses = original(self, batch)
            calls.append(1)
            if len(calls) + self._first_iter == k:
                for p in self.params:
                    for g in p.list_grad():
                        g[:] = float("nan")
                losses["loss_mask"] = float("nan")
            return losses
        monkeypatch.setattr(T.Trainer, "forward_backward", forward_backward)
        original_train = T.Trainer.train

        def train(self, loader_fn, start_iter=0, *a, **kw):
            self._first_iter = start_iter
            return original_train(self, loader_fn, start_iter, *a, **kw)
        monkeypatch.setattr(T.Trainer, "train", train)
    return install


def test_nan_stop_keeps_the_last_good_checkpoint(shapes_dataset, tmp_path, poison_iteration):
    from mxmask.train import run_training
    poison_iteration(3)
    cfg = tiny_cfg(shapes_dataset, tmp_path / "run", "solver.max_iter=4",
                   "solver.checkpoint_period=2")
    log = io.StringIO()
    with pytest.raises(T.NonFiniteLoss) as e:
        run_training(cfg, [mx.cpu()], out=log)
    assert "iter 3: non-finite loss (loss_mask=nan)" in str(e.value)
    assert "last good checkpoint (iteration 2)" in str(e.value)
    out = str(tmp_path / "run")
    assert ck.read_progress(out)["iter"] == 2
    params, states = ck.checkpoint_files(out)
    assert states is not None
    values = load_tiny_params(ck.load_checkpoint_config(out), params)
    assert all(np.isfinite(v).all() for v in values.values())


def test_progress_line_curves_history_and_nan_skip(shapes_dataset, tmp_path, poison_iteration):
    from mxmask.train import run_training
    poison_iteration(2)
    cfg = tiny_cfg(shapes_dataset, tmp_path / "run", "solver.max_iter=4",
                   "solver.checkpoint_period=4", "solver.nonfinite_policy=skip")
    log = io.StringIO()
    out_dir, metrics = run_training(cfg, [mx.cpu()], out=log)
    text = log.getvalue()
    assert "iter 2: non-finite loss (loss_mask=nan): batch skipped" in text
    names = "loss_rpn_cls loss_rpn_loc loss_cls loss_box_reg loss_mask loss_keypoint".split()
    pattern = re.compile(r"^iter (\d+)/4  (\d+\.\d\d) it/s  lr (\S+)  loss (\S+)  " +
                         "  ".join(r"%s (\S+)" % n for n in names) + r"  eta (\d+):(\d\d)$")
    lines = [pattern.match(line) for line in text.splitlines() if line.startswith("iter ")
             and "skipped" not in line]
    assert len(lines) == 4 and all(lines)
    assert [int(m.group(1)) for m in lines] == [1, 2, 3, 4]
    for m in lines:
        assert float(m.group(2)) > 0
        assert float(m.group(3)) == pytest.approx(lr_at(cfg.solver, int(m.group(1)) - 1),
                                                  rel=1e-5)
        parts = [float(m.group(5 + i)) for i in range(len(names))]
        if int(m.group(1)) != 2:
            assert float(m.group(4)) == pytest.approx(sum(parts), abs=1e-3)
    assert lines[-1].group(11) == "0" and lines[-1].group(12) == "00"   # eta 0:00 at the end

    history = json.load(open(os.path.join(out_dir, "history.json")))
    assert history["iter"] == [1, 2, 3, 4] and set(history["losses"]) == set(names)
    assert history["eval"][-1]["iter"] == 4 and "bbox" in history["eval"][-1]
    import matplotlib.image
    png = matplotlib.image.imread(os.path.join(out_dir, "curves.png"))
    assert png.shape[0] > 200 and png.shape[1] > 200
    assert png[..., :3].std() > 0.05 and len(np.unique(png[..., :3].reshape(-1, 3), axis=0)) > 20
    assert metrics is not None and os.path.exists(os.path.join(out_dir, "metrics.json"))


def test_a_full_disk_at_the_second_checkpoint_stops_with_a_clear_error(
        shapes_dataset, tmp_path, monkeypatch, capsys):
    from mxmask import cli
    saves = []
    original = gluon.Trainer.save_states

    def save_states(self, fname):
        saves.append(fname)
        if len(saves) == 2:
            with open(fname, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, fname)
    monkeypatch.setattr(gluon.Trainer, "save_states", save_states)
    out = tmp_path / "run"
    code = cli.main(["train"] + tiny_args(shapes_dataset, out, "solver.max_iter=4",
                                          "solver.checkpoint_period=2"))
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(r"mxmask: error: iter 4: could not write the checkpoint to \S+ "
                     r"\(\[Errno 28\] No space left on device\); the checkpoint of iteration 2 "
                     r"is intact", err), err
    assert len(err.strip().splitlines()) == 1
    progress = ck.read_progress(str(out))
    assert progress["iter"] == 2 and progress["checkpoint"] == "iter_0000002"
    params, states = ck.checkpoint_files(str(out))
    cfg = ck.load_checkpoint_config(str(out))
    values = load_tiny_params(cfg, params)
    assert all(np.isfinite(v).all() for v in values.values())
    assert not [p for p in os.listdir(out) if p.startswith(".staging")]
    # and the run resumes from it
    monkeypatch.setattr(gluon.Trainer, "save_states", original)
    assert cli.main(["train", "--resume", "--out", str(out)]) == 0
    assert ck.read_progress(str(out))["iter"] == 4


def test_dist_sync_without_the_launcher_is_a_clear_error(shapes_dataset, tmp_path, capsys,
                                                         monkeypatch):
    from mxmask import cli
    monkeypatch.delenv("DMLC_ROLE", raising=False)
    code = cli.main(["train", "--kvstore", "dist_sync"] + tiny_args(shapes_dataset, tmp_path))
    assert code == 2
    assert "scripts/train_dist.sh" in capsys.readouterr().err


def test_the_real_model_on_three_contexts_keeps_them_in_sync(shapes_dataset, tmp_path):
    """4 images on 3 contexts (1/2/1), clipping on: every context ends with the same weights,
    finite and moved. (The real losses normalise per context, as Detectron2 per GPU, so they
    are not expected to equal a one-context run exactly; the toy tests above check the maths.)"""
    from mxmask.data.loader import build_train_loader
    from mxmask.train import prepare_data
    from mxmask.modeling.rcnn import build_model
    from mxmask.modeling.training import RCNNLoss
    cfg = tiny_cfg(shapes_dataset, tmp_path, "solver.ims_per_batch=4", "solver.max_iter=2",
                   "solver.clip_gradient=1.0")
    records, info = prepare_data(cfg, lambda _: None)
    ctxs = [mx.cpu(0), mx.cpu(1), mx.cpu(2)]
    mx.random.seed(0)
    net = build_model(cfg, ctx=ctxs, num_devices=len(ctxs))
    loss_net = RCNNLoss(net, cfg)
    loss_net.hybridize(static_alloc=True)
    tr = T.Trainer(cfg, net, loss_net, ctxs, kvstore="device", out=io.StringIO())
    params = list(net.collect_params().values())
    before = [p.data(ctxs[0]).asnumpy() for p in params]
    tr.train(lambda start: build_train_loader(cfg, records, info, start_iter=start))
    moved = 0.0
    for p, b in zip(params, before):
        arrays = [a.asnumpy() for a in p.list_data()]
        assert np.isfinite(arrays[0]).all(), p.name
        for a in arrays[1:]:
            np.testing.assert_array_equal(a, arrays[0], err_msg=p.name)
        moved = max(moved, float(np.abs(arrays[0] - b).max()))
    assert moved > 1e-4
    assert ck.read_progress(str(tmp_path))["iter"] == 2


# Damaged checkpoints, full disks, resume and the run lock, through `mxmask train`
# --------------------------------------------------------------------------------------------
RESUME_RUN = ("solver.max_iter=6", "solver.checkpoint_period=2")


@pytest.fixture(scope="module")
def straight_run(shapes_dataset, tmp_path_factory):
    """The weights of an uninterrupted 6-iteration run of the tiny model."""
    from mxmask import cli
    out = tmp_path_factory.mktemp("straight") / "run"
    assert cli.main(["train"] + tiny_args(shapes_dataset, out, *RESUME_RUN)) == 0
    return {k: v.asnumpy() for k, v in mx.nd.load(str(out / "model.params")).items()}


def assert_same_weights(a, out):
    b = {k: v.asnumpy() for k, v in mx.nd.load(os.path.join(out, "model.params")).items()}
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_resume_from_a_damaged_latest_checkpoint_falls_back_and_repeats_the_straight_run(
        shapes_dataset, tmp_path, monkeypatch, capsys, straight_run):
    from mxmask import cli
    original = T.Trainer.forward_backward
    calls = []

    def killed_at_5(self, batch):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt         # the run dies after the checkpoint of iteration 4
        return original(self, batch)
    monkeypatch.setattr(T.Trainer, "forward_backward", killed_at_5)
    out = tmp_path / "run"
    assert cli.main(["train"] + tiny_args(shapes_dataset, out, *RESUME_RUN)) == 130
    monkeypatch.setattr(T.Trainer, "forward_backward", original)
    assert ck.read_progress(str(out))["iter"] == 4
    assert not os.path.exists(out / ck.LOCK)            # released on the way out
    params = out / "iter_0000004" / "model.params"
    params.write_bytes(params.read_bytes()[:1000])      # a copy cut short, say
    capsys.readouterr()
    assert cli.main(["train", "--resume", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert ("%s: the checkpoint of iteration 4 is damaged (iter_0000004/model.params: damaged "
            "checkpoint file, truncated or corrupt (" % out) in text
    assert "); resuming from %s, the newest intact checkpoint\n" % (out / "iter_0000002") in text
    assert "resuming %s at iteration 2" % out in text and "iter 3/6" in text
    assert ck.read_progress(str(out))["iter"] == 6
    assert_same_weights(straight_run, str(out))


def test_an_mxnet_write_failure_stops_in_one_line_and_resume_repeats_the_straight_run(
        shapes_dataset, tmp_path, monkeypatch, capsys, straight_run):
    from mxmask import cli
    original = gluon.Block.save_parameters
    saves = []

    def save_parameters(self, fname, *a, **kw):
        saves.append(fname)
        if len(saves) == 2:
            original(self, fname, *a, **kw)
            raise mx.base.MXNetError("Traceback (most recent call last):\n  File \"../3rdparty/"
                                     "dmlc-core/src/io/local_filesys.cc\", line 38\nMXNetError: "
                                     "Check failed: std: :fwrite(ptr, 1, size, fp_) == size: "
                                     "FileStream.Write incomplete")
        return original(self, fname, *a, **kw)
    monkeypatch.setattr(gluon.Block, "save_parameters", save_parameters)
    out = tmp_path / "run"
    assert cli.main(["train"] + tiny_args(shapes_dataset, out, *RESUME_RUN)) == 2
    err = capsys.readouterr().err
    assert err == ("mxmask: error: iter 4: could not write the checkpoint to %s (Check failed: "
                   "std: :fwrite(ptr, 1, size, fp_) == size: FileStream.Write incomplete); the "
                   "checkpoint of iteration 2 is intact (iter_0000002; train --resume continues "
                   "from it once there is space)\n" % out)
    assert not os.path.exists(out / ck.LOCK)
    monkeypatch.setattr(gluon.Block, "save_parameters", original)
    assert cli.main(["train", "--resume", "--out", str(out)]) == 0
    assert_same_weights(straight_run, str(out))


def test_a_full_disk_at_history_json_stops_in_one_line(shapes_dataset, tmp_path, monkeypatch,
                                                       capsys):
    from mxmask import cli
    original = T.atomic_write_json
    calls = []

    def write(path, obj, indent=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(path, obj, indent=indent)
    monkeypatch.setattr(T, "atomic_write_json", write)
    out = tmp_path / "run"
    assert cli.main(["train"] + tiny_args(shapes_dataset, out, "solver.max_iter=4",
                                          "solver.checkpoint_period=2")) == 2
    err = capsys.readouterr().err
    assert err == ("mxmask: error: iter 4: could not write %s ([Errno 28] No space left on "
                   "device); the checkpoint of iteration 2 is intact (iter_0000002; train "
                   "--resume continues from it once there is space)\n" % (out / "history.json"))


def test_a_full_disk_at_curves_png_stops_in_one_line(shapes_dataset, tmp_path, monkeypatch,
                                                     capsys):
    from mxmask import cli, vis

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(vis, "atomic_write_bytes", full)
    out = tmp_path / "run"
    assert cli.main(["train"] + tiny_args(shapes_dataset, out, "solver.max_iter=1")) == 2
    err = capsys.readouterr().err
    assert err == ("mxmask: error: %s: could not write history.json / curves.png ([Errno 28] No "
                   "space left on device); the checkpoint of iteration 1 and metrics.json are "
                   "intact\n" % out)
    assert ck.read_progress(str(out))["iter"] == 1


def test_resume_without_a_checkpoint_is_refused(tmp_path, capsys):
    from mxmask import cli
    assert cli.main(["train", "--resume", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        "mxmask: error: %s: nothing to resume (no checkpoint in it); run without --resume to "
        "start a new run there\n" % tmp_path)


def test_a_second_run_on_the_same_folder_names_the_lock_holder(shapes_dataset, tmp_path, capsys):
    import socket
    from mxmask import cli
    out = tmp_path / "run"
    out.mkdir()
    (out / ck.LOCK).write_text("%d %s\n" % (os.getppid(), socket.gethostname()))
    assert cli.main(["train"] + tiny_args(shapes_dataset, out, "solver.max_iter=1")) == 2
    assert capsys.readouterr().err == (
        "mxmask: error: %s is in use by another mxmask train (pid %d on %s): wait for it to "
        "end, or remove %s if it is gone\n"
        % (out, os.getppid(), socket.gethostname(), out / ck.LOCK))
    assert (out / ck.LOCK).exists()                     # the holder's lock stays
    assert not (out / "config.yaml").exists()           # and nothing was written


def test_a_pretrained_file_that_is_not_a_params_file_is_one_line(shapes_dataset, tmp_path,
                                                                   capsys):
    from mxmask import cli
    junk = tmp_path / "resnet.params"
    junk.write_text("model.backbone.pretrained is not this text\n")
    code = cli.main(["train"] + tiny_args(shapes_dataset, tmp_path / "run", "solver.max_iter=1",
                                          "model.backbone.pretrained=%s" % junk))
    err = capsys.readouterr().err
    assert code == 2
    assert err == ("mxmask: error: %s: not a readable MXNet .params file, or a damaged one "
                   "(Check failed: header == kMXAPINDArrayListMagic: Invalid NDArray file "
                   "format)\n" % junk)
    assert not (tmp_path / "run" / ck.LOCK).exists()


def test_two_processes_on_one_folder(shapes_dataset, tmp_path, capsys):
    """A second `mxmask train` on the folder of a running one stops at once, naming it, even
    after the first has written a checkpoint; the first is not disturbed."""
    import signal
    import socket
    import subprocess
    import sys
    from mxmask import cli
    out = tmp_path / "run"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    first = subprocess.Popen([sys.executable, "-m", "mxmask", "train"] + tiny_args(
        shapes_dataset, out, "solver.max_iter=10000", "solver.checkpoint_period=1"), cwd=root,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "progress.json").exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        assert (out / ck.LOCK).read_text() == "%d %s\n" % (first.pid, socket.gethostname())
        for args in (tiny_args(shapes_dataset, out, "solver.max_iter=1"),
                     ["--resume", "--out", str(out)]):
            capsys.readouterr()
            assert cli.main(["train"] + args) == 2
            assert capsys.readouterr().err == (
                "mxmask: error: %s is in use by another mxmask train (pid %d on %s): wait for it "
                "to end, or remove %s if it is gone\n"
                % (out, first.pid, socket.gethostname(), out / ck.LOCK))
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # killed: its lock is stale, and --resume takes it over
    assert (out / ck.LOCK).exists()
    it = ck.read_progress(str(out))["iter"]
    text = (out / "config.yaml").read_text()          # one more iteration is enough here
    assert "max_iter: 10000" in text
    (out / "config.yaml").write_text(text.replace("max_iter: 10000", "max_iter: %d" % (it + 1)))
    capsys.readouterr()
    assert cli.main(["train", "--resume", "--out", str(out)]) == 0
    assert ("%s: taking over the lock of mxmask train pid %d on %s, which no longer runs"
            % (out, first.pid, socket.gethostname())) in capsys.readouterr().out
    assert not (out / ck.LOCK).exists()


def test_a_full_disk_at_metrics_json_stops_in_one_line(shapes_dataset, tmp_path, monkeypatch,
                                                       capsys):
    from mxmask import cli
    from mxmask.engine import evaluator

    def full(path, obj, indent=None):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(evaluator, "atomic_write_json", full)
    out = tmp_path / "run"
    assert cli.main(["train"] + tiny_args(shapes_dataset, out, "solver.max_iter=2",
                                          "solver.eval_period=1")) == 2
    err = capsys.readouterr().err
    assert err == ("mxmask: error: iter 1: could not write the evaluation's results.json / "
                   "metrics.json to %s ([Errno 28] No space left on device); no earlier "
                   "checkpoint exists\n" % out)
