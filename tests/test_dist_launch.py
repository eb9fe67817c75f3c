"""Distributed training (kvstore dist_sync, 2 workers + 1 server on localhost).

- ``scripts/train_dist.sh`` trains the tiny model: it finishes, both workers end with the same
  weights (equal to worker 0's checkpoint), the loss goes down, worker 0 evaluates.
- A worker killed mid-run: the launcher stops the whole job and exits non-zero at once.
- Without the launcher's supervision (the ssh case), the surviving worker's watchdog ends it
  with a clear message after ``MXMASK_DIST_TIMEOUT`` seconds.

Every process of a test carries the test's temporary folder in its command line; whatever is
left of them when the test ends is killed by pid.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import mxnet as mx
import numpy as np
import pytest

from mxmask.engine.dist_launch import LocalJob
from helpers.tiny import tiny_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "train_dist.sh")


def processes_with(marker):
    """Pids of this user's processes whose command line contains ``marker``."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(pid))
    return pids


def kill_all(marker):
    for pid in processes_with(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def job_dir(tmp_path):
    yield tmp_path
    kill_all(str(tmp_path))


def wait_for_progress(out, at_least, proc, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(os.path.join(out, "progress.json")) as f:
                if json.load(f)["iter"] >= at_least:
                    return
        except (OSError, ValueError, KeyError):
            pass
        assert proc.poll() is None, "the job ended early (code %s)" % proc.poll()
        time.sleep(0.05)
    raise AssertionError("no checkpoint of iteration %d after %d s" % (at_least, timeout))


def start_script(ds, out, env_extra, *sets):
    env = dict(os.environ, PYTHON=sys.executable, **env_extra)
    return subprocess.Popen(["bash", SCRIPT, "2"] + tiny_args(ds, out, *sets), cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(proc, timeout):
    try:
        text, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)       # the launcher stops its job
        text, _ = proc.communicate(timeout=30)
        raise AssertionError("the job did not finish in %d s:\n%s" % (timeout,
                                                                       text.decode()[-3000:]))
    return text.decode()


def test_two_workers_train_in_sync(shapes_dataset, job_dir):
    out = str(job_dir / "run")
    proc = start_script(shapes_dataset, out,
                        {"MXMASK_DUMP_WORKER_PARAMS": "1", "MXMASK_DIST_TIMEOUT": "120"},
                        "solver.max_iter=8", "solver.checkpoint_period=4")
    log = finish(proc, 240)
    assert proc.returncode == 0, log[-3000:]
    assert "kvstore dist_sync, 2 worker(s), 8 iterations" in log
    assert not processes_with(str(job_dir)), "processes left behind"

    w0 = mx.nd.load(os.path.join(out, "worker0.params"))
    w1 = mx.nd.load(os.path.join(out, "worker1.params"))
    ckpt = mx.nd.load(os.path.join(out, "model.params"))
    assert w0.keys() == w1.keys() == ckpt.keys()
    start = mx.nd.load(os.path.join(out, "iter_0000004", "model.params"))
    moved = 0.0
    for k in w0:
        np.testing.assert_array_equal(w0[k].asnumpy(), w1[k].asnumpy(), err_msg=k)
        np.testing.assert_array_equal(w0[k].asnumpy(), ckpt[k].asnumpy(), err_msg=k)
        moved = max(moved, float((w0[k] - start[k]).abs().max().asscalar()))
    assert moved > 0                              # the last 4 steps changed the weights

    history = json.load(open(os.path.join(out, "history.json")))
    losses = history["losses"]
    assert history["iter"] == list(range(1, 9))
    assert losses["loss_cls"][-1] < 0.8 * losses["loss_cls"][0]
    assert losses["loss_rpn_cls"][-1] < losses["loss_rpn_cls"][0]
    assert os.path.exists(os.path.join(out, "metrics.json"))   # worker 0 evaluated
    assert json.load(open(os.path.join(out, "progress.json")))["iter"] == 8


def worker_pids(launcher_pid):
    """The worker processes started by the launcher (their DMLC_ROLE), by launch order."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % pid) as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != launcher_pid:
                continue
            with open("/proc/%s/environ" % pid, "rb") as f:
                env = dict(x.split(b"=", 1) for x in f.read().split(b"\0") if b"=" in x)
        except (OSError, ValueError, IndexError):
            continue
        if env.get(b"DMLC_ROLE") == b"worker":
            found.append((int(env[b"DMLC_TASK_ID"]), int(pid)))
    return [pid for _, pid in sorted(found)]


def test_a_killed_worker_stops_the_whole_job(shapes_dataset, job_dir):
    out = str(job_dir / "run")
    proc = start_script(shapes_dataset, out, {"MXMASK_DIST_TIMEOUT": "120"},
                        "solver.max_iter=1000", "solver.checkpoint_period=2")
    try:
        wait_for_progress(out, 2, proc)
        workers = worker_pids(proc.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        t0 = time.monotonic()
        log = finish(proc, 60)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert elapsed < 30, elapsed
    assert "worker task 1 (pid %d) was killed by SIGKILL; stopping the job" % workers[1] in log
    time.sleep(0.5)
    assert not processes_with(str(job_dir)), "processes left behind"


def test_without_supervision_the_watchdog_ends_a_waiting_worker(shapes_dataset, job_dir,
                                                                 monkeypatch):
    out = str(job_dir / "run")
    timeout = 20
    monkeypatch.setenv("MXMASK_DIST_TIMEOUT", str(timeout))
    cmd = [sys.executable, "-m", "mxmask", "train", "--kvstore", "dist_sync"] + tiny_args(
        shapes_dataset, out, "solver.max_iter=1000", "solver.checkpoint_period=2")
    monkeypatch.chdir(ROOT)
    job = LocalJob(cmd, 2, 1, log_dir=str(job_dir / "logs"), log=lambda _: None)
    job.start()
    try:
        workers = dict(job.workers())
        wait_for_progress(out, 2, workers["worker task 0"])
        workers["worker task 1"].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        code = workers["worker task 0"].wait(timeout=timeout + 60)
        elapsed = time.monotonic() - t0
        text = open(job.log_path("worker task 0")).read()
    finally:
        job.stop()
    assert code == 3, text[-2000:]
    assert elapsed < timeout + 30
    assert "took longer than %d s (MXMASK_DIST_TIMEOUT); another process of the distributed " \
           "job has probably died or hangs" % timeout in text


def test_the_scripts_pass_their_arguments(tmp_path):
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "train.sh"), "--help"], cwd=ROOT,
                       env=dict(os.environ, PYTHON=sys.executable), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "--kvstore" in r.stdout and "train_dist.sh" in r.stdout
    r = subprocess.run(["bash", SCRIPT, "two"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "usage:" in r.stderr


def test_mxnet_tools_launch_works_through_the_isalive_shim(tmp_path):
    """The path of the ssh/mpi/sge/yarn launchers: mxnet.tools.launch with Thread.isAlive
    restored (its local launcher stands in for ssh here). Without the shim it dies at once and
    leaves a scheduler waiting forever."""
    script = tmp_path / "pushpull.py"
    script.write_text(
        "import mxnet as mx\n"
        "kv = mx.kv.create('dist_sync')\n"
        "out = mx.nd.zeros((2,))\n"
        "kv.init(3, mx.nd.zeros((2,)))\n"
        "kv.pushpull(3, mx.nd.ones((2,)) * (kv.rank + 1), out=out)\n"
        "print('rank %d sum %s' % (kv.rank, out.asnumpy().tolist()), flush=True)\n")
    code = ("import sys; from mxmask.engine.dist_launch import _mxnet_launch; "
            "sys.exit(_mxnet_launch(sys.argv[1:]))")
    cmd = [sys.executable, "-c", code, "-n", "2", "-s", "1", "--launcher", "local", "--",
           sys.executable, str(script)]
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        kill_all(str(script))
    assert r.returncode == 0, r.stderr[-2000:]
    # Both workers share the launcher's stdout, so their lines may interleave mid-line.
    assert sorted(re.findall(r"rank \d sum \[[^\]]*\]", r.stdout)) == \
        ["rank 0 sum [3.0, 3.0]", "rank 1 sum [3.0, 3.0]"]
