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


# Damaged checkpoints, failed writes, the run lock
# --------------------------------------------------------------------------------------------
def _truncate(path):
    data = open(path, "rb").read()
    with open(path, "r+b") as f:     # in place: the top-level hard link sees it too
        f.truncate(len(data) // 2)


def _two_checkpoints(tmp_path):
    net = _net(1)
    trainer = _trainer(net)
    ck.save_checkpoint(str(tmp_path), net, trainer, 2, 4)
    net.weight.set_data(net.weight.data() + 1)
    ck.save_checkpoint(str(tmp_path), net, trainer, 4, 4)
    return net


@pytest.mark.parametrize("name", ["model.params", "trainer.states"])
def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, name):
    _two_checkpoints(tmp_path)
    out = str(tmp_path)
    assert ck.resume_point(out)[0] == 4 and ck.resume_point(out)[3] is None
    _truncate(str(tmp_path / "iter_0000004" / name))
    it, params, states, note = ck.resume_point(out)
    assert it == 2 and params == os.path.join(out, "iter_0000002", "model.params")
    assert states == os.path.join(out, "iter_0000002", "trainer.states")
    assert note.startswith("%s: the checkpoint of iteration 4 is damaged (iter_0000004/%s: "
                           "damaged checkpoint file, truncated or corrupt (" % (out, name))
    assert note.endswith("); resuming from %s, the newest intact checkpoint"
                         % os.path.join(out, "iter_0000002"))
    assert "\n" not in note and "Traceback" not in note and "line " not in note


def test_no_intact_checkpoint_left_is_one_line_naming_the_damage(tmp_path):
    _two_checkpoints(tmp_path)
    _truncate(str(tmp_path / "iter_0000004" / "model.params"))
    _truncate(str(tmp_path / "iter_0000002" / "trainer.states"))
    with pytest.raises(ck.DamagedCheckpoint) as e:
        ck.resume_point(str(tmp_path))
    text = str(e.value)
    assert "iter_0000004/model.params: damaged checkpoint file, truncated or corrupt" in text
    assert "no intact older iter_* checkpoint in %s to resume from" % tmp_path in text
    assert "\n" not in text and "Traceback" not in text


def test_a_damaged_params_file_is_named_damaged_not_mismatched(tmp_path):
    net = _net(1)
    ck.save_checkpoint(str(tmp_path), net, None, 1, 1)
    path = str(tmp_path / "model.params")
    _truncate(path)
    with pytest.raises(ck.DamagedCheckpoint) as e:
        ck.load_params(_net(2), path)
    assert str(e.value) == ("%s: damaged checkpoint file, truncated or corrupt (Check failed: "
                            "fi->Read(data): Invalid NDArray file format)" % path)
    (tmp_path / "junk.params").write_bytes(b"not a params file at all" * 4)
    with pytest.raises(ck.DamagedCheckpoint, match=r"junk.params: damaged checkpoint file"):
        ck.load_params(_net(2), str(tmp_path / "junk.params"))
    # a whole file of another network: "does not match", one line
    other = gluon.nn.Dense(5, in_units=4)
    other.initialize()
    other.save_parameters(str(tmp_path / "other.params"))
    with pytest.raises(UserError) as e:
        ck.load_params(_net(2), str(tmp_path / "other.params"))
    assert "other.params: does not match the network of its config (" in str(e.value)
    assert not isinstance(e.value, ck.DamagedCheckpoint) and "\n" not in str(e.value)


def test_the_predictor_names_a_damaged_checkpoint(shapes_dataset, tmp_path):
    from helpers.tiny import build_tiny_checkpoint
    from mxmask.predictor import load_network
    cfg = build_tiny_checkpoint(shapes_dataset, str(tmp_path))
    path = str(tmp_path / "model.params")
    _truncate(path)
    with pytest.raises(UserError, match=r"damaged checkpoint file, truncated or corrupt") as e:
        load_network(cfg, path, [mx.cpu()])
    assert "does not match" not in str(e.value) and "Traceback" not in str(e.value)


@pytest.mark.parametrize("failure", ["mxnet", "enospc", "silent"])
def test_a_failed_mxnet_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    """MXNet's writer fails with MXNetError, Python's with OSError; a buffered write that loses
    its tail without an error is caught by reading the file back."""
    net = _net(1)
    trainer = _trainer(net)
    ck.save_checkpoint(str(tmp_path), net, trainer, 10, 100)
    before = (tmp_path / "model.params").read_bytes()
    original = gluon.Block.save_parameters

    def save_parameters(self, path, *a, **kw):
        original(self, path, *a, **kw)
        if failure == "mxnet":
            raise mx.base.MXNetError("Traceback (most recent call last):\n  File \"../3rdparty/"
                                     "dmlc-core/src/io/local_filesys.cc\", line 38\nMXNetError: "
                                     "Check failed: std: :fwrite(ptr, 1, size, fp_) == size: "
                                     "FileStream.Write incomplete")
        if failure == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        _truncate(path)
    monkeypatch.setattr(gluon.Block, "save_parameters", save_parameters)
    with pytest.raises(ck.WRITE_ERRORS) as e:
        ck.save_checkpoint(str(tmp_path), _net(2), trainer, 20, 100)
    if failure == "silent":
        assert e.value.errno == errno.EIO
        assert "model.params was written incompletely" in str(e.value)
    if failure == "mxnet":
        assert ck.error_text(e.value) == ("Check failed: std: :fwrite(ptr, 1, size, fp_) == size: "
                                          "FileStream.Write incomplete")
    assert ck.read_progress(str(tmp_path))["iter"] == 10
    assert (tmp_path / "model.params").read_bytes() == before
    assert ck.resume_point(str(tmp_path))[:1] == (10,)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".staging")]


def test_the_run_lock_excludes_a_second_run_and_takes_over_a_dead_ones(tmp_path):
    import socket
    import subprocess
    import sys
    out = str(tmp_path / "run")
    notes = []
    lock = ck.RunLock(out, notes.append)
    lock.acquire()
    path = os.path.join(out, ck.LOCK)
    assert open(path).read() == "%d %s\n" % (os.getpid(), socket.gethostname())
    with pytest.raises(UserError) as e:
        ck.RunLock(out).acquire()
    assert str(e.value) == ("%s is in use by another mxmask train (pid %d on %s): wait for it to "
                            "end, or remove %s if it is gone"
                            % (out, os.getpid(), socket.gethostname(), path))
    lock.release()
    assert not os.path.exists(path)
    # a holder on another host cannot be checked: refused
    with open(path, "w") as f:
        f.write("1 some-other-host\n")
    with pytest.raises(UserError, match=r"in use by another mxmask train \(pid 1 on "
                                        r"some-other-host\)"):
        ck.RunLock(out).acquire()
    # a dead process of this host: taken over, with a note
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(path, "w") as f:
        f.write("%d %s\n" % (dead.pid, socket.gethostname()))
    with ck.RunLock(out, notes.append):
        assert open(path).read().split()[0] == str(os.getpid())
    assert notes == ["%s: taking over the lock of mxmask train pid %d on %s, which no longer "
                     "runs" % (out, dead.pid, socket.gethostname())]
    assert not os.path.exists(path)
