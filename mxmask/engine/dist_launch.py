"""Start a parameter-server (``dist_sync``) job: a drop-in for ``python -m mxnet.tools.launch``.

    python -m mxmask.engine.dist_launch -n WORKERS [-s SERVERS] [--launcher local|ssh|mpi|sge|yarn]
                                        [-H HOSTFILE] COMMAND ...

In: the number of workers and servers, a launcher and the command every process runs.
Out: the job's processes with the ``DMLC_*`` environment, and the launcher's exit code: 0 when
every worker exited 0, non-zero with one line naming the process that failed.

``--launcher local`` (one machine) is implemented here (:class:`LocalJob`), because MXNet
1.9.1's own launcher hangs on Python >= 3.9 and never ends a job whose worker died; any other
launcher is handed to ``mxnet.tools.launch`` with that bug patched (:func:`_mxnet_launch`).
docs/distributed.md shows how to use it.
"""
import argparse
import os
import signal
import socket
import subprocess
import sys
import time

from .. import usable_cores

GRACE = 5.0              # seconds between SIGTERM and SIGKILL when stopping the job
SERVER_EXIT_WAIT = 60.0  # seconds the servers/scheduler get to leave after the workers
POLL = 0.2


def free_port(host="127.0.0.1"):
    """A TCP port free on ``host`` right now (for the ps-lite scheduler)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def role_env(role, task_id, num_workers, num_servers, root_uri, root_port, base=None):
    """The environment of one process of a local ps-lite job.

    Args:
        role (str): ``scheduler``, ``server`` or ``worker``.
        task_id (int): the process's number within its role.
        num_workers, num_servers (int): the job's size.
        root_uri (str), root_port (int): the scheduler's address.
        base (dict or None): the environment to start from (default ``os.environ``).

    Returns:
        dict: ``base`` plus the ``DMLC_*`` variables, and ``OMP_NUM_THREADS`` when unset:
        ``cores // num_workers`` for a worker, 1 for the scheduler and servers.
    """
    env = dict(os.environ if base is None else base)
    env.update({
        "DMLC_ROLE": role,
        "DMLC_TASK_ID": str(task_id),
        "DMLC_NUM_WORKER": str(num_workers),
        "DMLC_NUM_SERVER": str(num_servers),
        "DMLC_PS_ROOT_URI": root_uri,
        "DMLC_PS_ROOT_PORT": str(root_port),
        "DMLC_JOB_CLUSTER": "local",
    })
    # ps-lite picks a node's own address from the first non-loopback interface unless told;
    # on one machine the loopback address always works (also with no network at all).
    env.setdefault("DMLC_NODE_HOST", root_uri)
    if "OMP_NUM_THREADS" not in env:
        # the workers of a local job share this machine's cores (mxmask/__init__.py would give
        # each process all of them); servers and the scheduler only move gradients
        share = usable_cores() // max(1, num_workers) if role == "worker" else 1
        env["OMP_NUM_THREADS"] = str(max(1, share))
    return env


def describe_exit(code):
    """How a process ended, for a message ("exited with code 1", "was killed by SIGKILL")."""
    if code is None:
        return "is running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "signal %d" % -code
        return "was killed by %s" % name
    return "exited with code %d" % code


class LocalJob:
    """The processes of a local job; :meth:`wait` supervises them and returns the exit code.

    :meth:`start` starts the scheduler, the servers and the workers as child processes (each
    in its own process group) with the ``DMLC_*`` variables (:func:`role_env`), on 127.0.0.1
    and a free port. When every worker has exited 0 the job succeeds; when a worker or a server
    exits with an error or a signal, everything else is stopped (SIGTERM, then SIGKILL after
    :data:`GRACE` seconds) and the exit code is non-zero, with one line naming the process.
    Worker *task* numbers are the launch order; ps-lite gives the kvstore ranks (``kv.rank``,
    which mxmask's messages show as "worker N") by the nodes' addresses, so the two can differ.

    Args:
        command (list[str]): what every process runs.
        num_workers, num_servers (int): at least 1 each.
        log: ``log(text)`` for the launcher's own lines (default: stderr).
        log_dir (str or None): when set, each process's output goes to
            ``LOG_DIR/{scheduler,server0,worker0,...}.log`` instead of the terminal.
    """

    def __init__(self, command, num_workers, num_servers=1, log=None, log_dir=None):
        if num_workers < 1 or num_servers < 1:
            raise ValueError("need at least one worker and one server")
        self.command = list(command)
        self.num_workers = num_workers
        self.num_servers = num_servers
        self.log = log or (lambda text: print("dist_launch: " + text, file=sys.stderr,
                                              flush=True))
        self.log_dir = log_dir   # when set: each process writes LOG_DIR/<name>.log
        self.procs = []          # (name, Popen)
        self._files = []

    def start(self):
        """Start the scheduler, the servers and the workers."""
        host = os.environ.get("DMLC_PS_ROOT_URI", "127.0.0.1")
        port = int(os.environ.get("DMLC_PS_ROOT_PORT") or free_port(host))
        roles = [("scheduler", "scheduler", 0)] + \
            [("server %d" % i, "server", i) for i in range(self.num_servers)] + \
            [("worker task %d" % i, "worker", i) for i in range(self.num_workers)]
        for name, role, task in roles:
            env = role_env(role, task, self.num_workers, self.num_servers, host, port)
            out = None
            if self.log_dir:
                os.makedirs(self.log_dir, exist_ok=True)
                out = open(self.log_path(name), "wb")
                self._files.append(out)
            proc = subprocess.Popen(self.command, env=env, start_new_session=True,
                                    stdout=out, stderr=subprocess.STDOUT if out else None)
            self.procs.append((name, proc))
        self.log("started %d worker(s), %d server(s) and a scheduler on %s:%d (pids %s)"
                 % (self.num_workers, self.num_servers, host, port,
                    ", ".join("%s %d" % (n, p.pid) for n, p in self.procs)))

    def log_path(self, name):
        """``LOG_DIR/worker0.log`` for the process called "worker task 0"."""
        return os.path.join(self.log_dir, name.replace("task ", "").replace(" ", "") + ".log")

    def workers(self):
        """``(name, Popen)`` of the workers."""
        return [(n, p) for n, p in self.procs if n.startswith("worker")]

    def others(self):
        """``(name, Popen)`` of the scheduler and the servers."""
        return [(n, p) for n, p in self.procs if not n.startswith("worker")]

    def wait(self):
        """Supervise until the job ends; returns the launcher's exit code."""
        while True:
            for name, proc in self.procs:
                code = proc.poll()
                if code is not None and code != 0:
                    self.log("%s (pid %d) %s; stopping the job" % (name, proc.pid,
                                                                    describe_exit(code)))
                    self.stop()
                    return code if code > 0 else 128 - code
            # servers and the scheduler leave (code 0) once every worker has finalised its
            # kvstore, possibly while worker 0 still evaluates: only the workers decide
            if all(p.poll() == 0 for _, p in self.workers()):
                break
            time.sleep(POLL)
        deadline = time.monotonic() + SERVER_EXIT_WAIT
        while time.monotonic() < deadline and any(p.poll() is None for _, p in self.others()):
            time.sleep(POLL)
        left = [n for n, p in self.others() if p.poll() is None]
        if left:
            self.log("%s still running %d s after the workers finished; stopping them"
                     % (", ".join(left), SERVER_EXIT_WAIT))
        self.stop()
        return 0

    def stop(self):
        """SIGTERM every process group still running, SIGKILL after :data:`GRACE` seconds."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = [p for _, p in self.procs if p.poll() is None]
            for p in alive:
                try:
                    os.killpg(p.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + GRACE
            while time.monotonic() < deadline and any(p.poll() is None for p in alive):
                time.sleep(0.05)
        # the process groups may hold children of the processes (data loader workers)
        for _, p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.wait()
        for f in self._files:
            f.close()
        self._files = []


def _mxnet_launch(argv):
    """Hand over to ``mxnet.tools.launch`` with ``Thread.isAlive`` restored.

    On Python >= 3.9 the tracker of ``mxnet.tools.launch`` (``dmlc_tracker``) calls
    ``Thread.isAlive()``, which no longer exists. The launcher then dies right after starting
    the ps-lite scheduler, the workers never start, and the orphaned scheduler waits forever,
    holding the caller's stdout open: the job looks hung. Even when it starts, its local
    launcher waits forever on the scheduler once a worker dies (ps-lite has no failure
    detection that ends the others: with ``PS_HEARTBEAT_INTERVAL``/``PS_HEARTBEAT_TIMEOUT`` set,
    the surviving workers still block in their next push/pull).

    With ``ssh``, the hostfile lists one host per line (``host`` or ``host:port``), the same
    command must work on every host (same paths, a shared file system for the data and
    ``--out``), and passwordless ssh must work from this machine. A worker that dies there makes
    the others stop through their watchdog (``MXMASK_DIST_TIMEOUT``,
    :class:`mxmask.engine.trainer.Watchdog`); servers left behind can be stopped with
    ``python .../site-packages/mxnet/tools/kill-mxnet.py HOSTFILE USER 'mxmask train'`` (kill -9
    of the matching processes of USER on those hosts). dmlc's ssh launcher quotes the whole
    remote command in single quotes: the command's arguments must not contain spaces or single
    quotes (write ``--set input.min_size_train=[96,128]``).
    """
    import runpy
    import threading
    if not hasattr(threading.Thread, "isAlive"):
        threading.Thread.isAlive = threading.Thread.is_alive
    sys.argv = ["mxnet.tools.launch"] + list(argv)
    runpy.run_module("mxnet.tools.launch", run_name="__main__")
    return 0


def build_parser():
    """The argument parser of ``python -m mxmask.engine.dist_launch``.

    Returns:
        argparse.ArgumentParser: unknown options are passed on to ``mxnet.tools.launch``.
    """
    p = argparse.ArgumentParser(
        prog="python -m mxmask.engine.dist_launch",
        description="Launch a parameter-server job (drop-in for python -m mxnet.tools.launch).")
    p.add_argument("-n", "--num-workers", type=int, required=True)
    p.add_argument("-s", "--num-servers", type=int, help="default: the number of workers")
    p.add_argument("--launcher", default="local",
                   choices=["local", "ssh", "mpi", "sge", "yarn"])
    p.add_argument("-H", "--hostfile", help="hosts, one per line (ssh and mpi launchers)")
    p.add_argument("--log-dir", help="local launcher: write each process's output to "
                   "LOG_DIR/{scheduler,server0,worker0,...}.log instead of the terminal")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command every process runs")
    return p


def main(argv=None):
    """Run the launcher on ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    With the local launcher, SIGINT or SIGTERM to the launcher stops the whole job."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = build_parser().parse_known_args(argv)
    if not args.command:
        build_parser().error("no command to run")
    if args.launcher != "local":
        # "--" keeps the command whole (mxnet's parser would move its options, like -m, to
        # the end); other options (--env, --sync-dst-dir, ...) are passed through.
        opts = ["-n", str(args.num_workers), "--launcher", args.launcher]
        opts += ["-s", str(args.num_servers)] if args.num_servers else []
        opts += ["-H", args.hostfile] if args.hostfile else []
        if args.log_dir:
            build_parser().error("--log-dir works with the local launcher only")
        return _mxnet_launch(opts + extra + ["--"] + args.command)
    if args.num_workers < 1 or (args.num_servers is not None and args.num_servers < 1):
        build_parser().error("need at least one worker and one server")
    job = LocalJob(args.command, args.num_workers, args.num_servers or args.num_workers,
                   log_dir=args.log_dir)

    def on_signal(signum, _frame):
        job.log("received %s; stopping the job" % signal.Signals(signum).name)
        job.stop()
        sys.exit(128 + signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    job.start()
    return job.wait()


if __name__ == "__main__":
    sys.exit(main())
