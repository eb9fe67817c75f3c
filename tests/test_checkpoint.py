"""Checkpoint folders: atomic saves, the previous checkpoint survives a failed save, lr schedule."""
import errno
import json
import os

import mxnet as mx
import numpy as np
import pytest
from mxnet import gluon

from mxmask.config import get_config
from mxmask.engine import checkpoint as ck
from mxmask.engine.schedule import lr_at
from mxmask.utils import UserError


def _net(seed):
    net = gluon.nn.Dense(3, in_units=4)
    mx.random.seed(seed)
    net.initialize(mx.init.Normal(1.0))
    return net


def _trainer(net):
    t = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1, "momentum": 0.9})
    with mx.autograd.record():
        loss = net(mx.nd.ones((2, 4))).sum()
    loss.backward()
    t.step(1)
    return t


def test_save_then_load_restores_weights_and_progress(tmp_path):
    net = _net(1)
    trainer = _trainer(net)
    ck.save_checkpoint(str(tmp_path), net, trainer, 10, 100)
    progress = ck.read_progress(str(tmp_path))
    assert progress["iter"] == 10 and progress["max_iter"] == 100
    for name in ("model.params", "trainer.states", "progress.json"):
        assert os.path.exists(tmp_path / name)
    params, states = ck.checkpoint_files(str(tmp_path))
    other = _net(2)
    other.load_parameters(params)
    np.testing.assert_array_equal(other.weight.data().asnumpy(), net.weight.data().asnumpy())
    assert states is not None


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    net = _net(1)
    trainer = _trainer(net)
    ck.save_checkpoint(str(tmp_path), net, trainer, 10, 100)
    before = (tmp_path / "model.params").read_bytes()

    net2 = _net(2)

    def disk_full(path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(net2, "save_parameters", disk_full)
    with pytest.raises(OSError):
        ck.save_checkpoint(str(tmp_path), net2, trainer, 20, 100)
    assert ck.read_progress(str(tmp_path))["iter"] == 10
    assert (tmp_path / "model.params").read_bytes() == before
    params, _ = ck.checkpoint_files(str(tmp_path))
    restored = _net(3)
    restored.load_parameters(params)
    np.testing.assert_array_equal(restored.weight.data().asnumpy(), net.weight.data().asnumpy())
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".staging")]


def test_old_iteration_folders_are_pruned(tmp_path):
    net = _net(1)
    for it in (1, 2, 3, 4):
        ck.save_checkpoint(str(tmp_path), net, None, it, 4, keep=2)
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("iter_")) == \
        ["iter_0000003", "iter_0000004"]


def test_bad_progress_is_a_clear_error(tmp_path):
    (tmp_path / "progress.json").write_text(json.dumps({"iter": "x", "max_iter": 3}))
    with pytest.raises(UserError, match="progress.json: field 'iter'"):
        ck.read_progress(str(tmp_path))
    with pytest.raises(UserError, match="not a checkpoint folder"):
        ck.checkpoint_files(str(tmp_path / "nothing"))


def test_lr_schedule_warmup_step_and_cosine():
    s = get_config("mask_rcnn_r50_fpn").solver
    s.base_lr, s.warmup_iters, s.warmup_factor, s.steps, s.gamma = 0.02, 100, 0.001, [200, 300], 0.1
    assert lr_at(s, 0) == pytest.approx(0.02 * 0.001)
    assert lr_at(s, 50) == pytest.approx(0.02 * (0.001 * 0.5 + 0.5))
    assert lr_at(s, 100) == pytest.approx(0.02)
    assert lr_at(s, 200) == pytest.approx(0.002)
    assert lr_at(s, 300) == pytest.approx(0.0002)
    s.lr_schedule, s.max_iter, s.warmup_iters = "cosine", 400, 0
    assert lr_at(s, 0) == pytest.approx(0.02)
    assert lr_at(s, 200) == pytest.approx(0.01)
    assert lr_at(s, 400) == pytest.approx(0.0)
