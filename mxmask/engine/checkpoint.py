"""Checkpoint folders: crash-safe saving, loading and resuming.

In: a network, its ``gluon.Trainer`` and the iteration; or a checkpoint folder to read.
Out: a checkpoint folder (the run's ``output_dir``) that holds, as the contract says:

    config.yaml        the full resolved config
    model.params       the network weights of the last checkpoint
    trainer.states     the optimizer state of the last checkpoint
    progress.json      {"iter": N, "max_iter": M, "checkpoint": "iter_0000N", ...}
    iter_NNNNNNN/      the last checkpoints' model.params and trainer.states
    metrics.json       after evaluation
    .mxmask-train.lock while a run writes into it (:class:`RunLock`)

A crash or a full disk at any moment leaves the previous checkpoint complete
(:func:`save_checkpoint`: every file is read back before it replaces the last one), and
``train --resume`` starts from the newest checkpoint that reads back whole
(:func:`resume_point`); a damaged file is named as damaged (:class:`DamagedCheckpoint`).
Evaluation, prediction and export read the config back with
:func:`load_checkpoint_config`, which only lets test-time settings change.
"""
import errno
import glob
import json
import os
import pickle
import shutil
import socket

import mxnet as mx

from ..config import ConfigError, dump_yaml, load_yaml, set_value
from ..utils import UserError, atomic_write_json

PROGRESS = "progress.json"
LOCK = ".mxmask-train.lock"

# what a failed write raises: Python's own writes give OSError (ENOSPC, EIO, EDQUOT), MXNet's
# (``save_parameters``, ``nd.save``) give MXNetError ("FileStream.Write incomplete")
WRITE_ERRORS = (OSError, mx.base.MXNetError)


class DamagedCheckpoint(UserError):
    """A checkpoint file that cannot be read back (truncated or corrupt)."""


def error_text(exc):
    """One line describing ``exc``, without the traceback MXNet puts inside its messages.

    Args:
        exc (BaseException): the error.

    Returns:
        str: for an MXNetError (whose text starts with ``Traceback`` and the C++ file) its
        last ``MXNetError: ...`` line without that prefix; otherwise the first line of
        ``str(exc)``; the exception's class name when the text is empty. At most 300
        characters.
    """
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    marked = [line for line in lines if line.startswith("MXNetError:")]
    if marked:
        return marked[-1][len("MXNetError:"):].strip()[:300]
    lines = [line for line in lines if not line.startswith(("Traceback (most recent", "File "))]
    return lines[0][:300] if lines else type(exc).__name__


def _fsync_dir(path):
    """fsync a folder (so that a rename in it is durable); errors are ignored."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path):
    """fsync a file's contents."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _link_or_copy(src, dst):
    """Atomically make ``dst`` have the contents of ``src`` (hard link, else copy)."""
    tmp = dst + ".tmp-link"
    if os.path.exists(tmp):
        os.unlink(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
        _fsync_file(tmp)
    os.replace(tmp, dst)


def check_params_file(path):
    """Read a parameter file back whole.

    Args:
        path (str): a ``.params`` file (``save_parameters`` / ``nd.save``).

    Returns:
        dict: its arrays by name.

    Raises:
        DamagedCheckpoint: the file is truncated or corrupt (MXNet cannot read it).
    """
    try:
        loaded = mx.nd.load(path)
    except mx.base.MXNetError as e:
        raise DamagedCheckpoint("%s: damaged checkpoint file, truncated or corrupt (%s)"
                                % (path, error_text(e)))
    if not isinstance(loaded, dict):
        raise DamagedCheckpoint("%s: damaged checkpoint file (unnamed arrays, not a parameter "
                                "file)" % path)
    return loaded


def check_states_file(path):
    """Read an optimizer state file (``gluon.Trainer.save_states``, a pickle) back whole.

    Args:
        path (str): the ``trainer.states`` file.

    Raises:
        DamagedCheckpoint: the file is truncated or corrupt.
    """
    try:
        with open(path, "rb") as f:
            pickle.loads(f.read())
    except OSError:
        raise
    except Exception as e:  # UnpicklingError, EOFError, ValueError, ... of a damaged pickle
        raise DamagedCheckpoint("%s: damaged checkpoint file, truncated or corrupt (%s)"
                                % (path, error_text(e)))


def save_config(cfg, out_dir):
    """Write the full resolved config as ``out_dir/config.yaml``, creating the folder.

    Args:
        cfg: the config.
        out_dir (str): the checkpoint folder.
    """
    os.makedirs(out_dir, exist_ok=True)
    dump_yaml(cfg, os.path.join(out_dir, "config.yaml"))


def save_checkpoint(out_dir, net, trainer, iteration, max_iter, extra=None, keep=2):
    """Save the weights and optimizer state of ``iteration`` crash-safely.

    The parameters and optimizer states are written into a fresh staging folder, fsynced, and
    the folder is renamed to ``iter_NNNNNNN`` (a rename is atomic). Only then is
    ``progress.json`` replaced (atomically) to point at it, and ``model.params`` /
    ``trainer.states`` are replaced by hard links to the new files. A crash or a full disk at
    any moment leaves the previous checkpoint complete and ``progress.json`` pointing at it.

    Args:
        out_dir (str): the checkpoint folder.
        net (gluon.Block): its ``save_parameters`` writes ``model.params``.
        trainer (gluon.Trainer or None): its ``save_states`` writes ``trainer.states``
            (None: weights only, as the converters write).
        iteration (int), max_iter (int): recorded in ``progress.json``.
        extra (dict or None): more ``progress.json`` fields.
        keep (int): how many ``iter_*`` folders to keep (the newest; <= 0 keeps all).

    Returns:
        str: the ``iter_NNNNNNN`` folder written.
    """
    os.makedirs(out_dir, exist_ok=True)
    name = "iter_%07d" % iteration
    final = os.path.join(out_dir, name)
    staging = os.path.join(out_dir, ".staging-" + name)
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        params = os.path.join(staging, "model.params")
        net.save_parameters(params)
        _fsync_file(params)
        # read back: MXNet's buffered writer can lose the tail of a small file on a full disk
        # without an error, and a checkpoint that cannot be read must not replace a good one
        _written(check_params_file, params)
        if trainer is not None:
            states = os.path.join(staging, "trainer.states")
            trainer.save_states(states)
            _fsync_file(states)
            _written(check_states_file, states)
        _fsync_dir(staging)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(staging, final)
        _fsync_dir(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    progress = {"iter": int(iteration), "max_iter": int(max_iter), "checkpoint": name}
    progress.update(extra or {})
    atomic_write_json(os.path.join(out_dir, PROGRESS), progress, indent=1)
    _link_or_copy(os.path.join(final, "model.params"), os.path.join(out_dir, "model.params"))
    if trainer is not None:
        _link_or_copy(os.path.join(final, "trainer.states"), os.path.join(out_dir, "trainer.states"))
    _prune(out_dir, keep, current=name)
    return final


def _written(check, path):
    """``check(path)``, a file just written; damage there is a failed write (OSError EIO)."""
    try:
        check(path)
    except DamagedCheckpoint as e:
        raise OSError(errno.EIO, "%s was written incompletely: it does not read back"
                      % os.path.basename(path)) from e


def _prune(out_dir, keep, current):
    """Remove all but the newest ``keep`` ``iter_*`` folders (never ``current``)."""
    folders = sorted(glob.glob(os.path.join(out_dir, "iter_*")))
    for folder in folders[:-keep] if keep > 0 else []:
        if os.path.basename(folder) != current:
            shutil.rmtree(folder, ignore_errors=True)


def read_progress(out_dir):
    """The progress record of a checkpoint folder.

    Returns:
        dict or None: ``progress.json`` (at least integer ``iter`` and ``max_iter``), or None
        when there is none yet.

    Raises:
        UserError: when the file is unreadable or lacks those fields.
    """
    path = os.path.join(out_dir, PROGRESS)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            progress = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError("%s: unreadable progress record (%s)" % (path, e))
    for key in ("iter", "max_iter"):
        if not isinstance(progress.get(key), int):
            raise UserError("%s: field '%s' must be an integer" % (path, key))
    return progress


def checkpoint_files(out_dir):
    """The weight and optimizer files of the last checkpoint in ``out_dir``.

    The ``iter_*`` folder that ``progress.json`` points at, else the top-level files; a folder
    with only ``model.params`` works too.

    Returns:
        tuple: ``(params path, states path or None)``.

    Raises:
        UserError: when ``out_dir`` is not a checkpoint folder or its weights are missing.
    """
    progress = read_progress(out_dir)
    if progress is None:
        params = os.path.join(out_dir, "model.params")
        if os.path.exists(params):
            return params, None
        raise UserError("%s: not a checkpoint folder (no progress.json or model.params)" % out_dir)
    folder = os.path.join(out_dir, progress.get("checkpoint", ""))
    params = os.path.join(folder, "model.params")
    states = os.path.join(folder, "trainer.states")
    if not progress.get("checkpoint") or not os.path.exists(params):
        params = os.path.join(out_dir, "model.params")
        states = os.path.join(out_dir, "trainer.states")
    if not os.path.exists(params):
        raise UserError("%s: checkpoint weights are missing" % params)
    return params, (states if os.path.exists(states) else None)


def _iteration_of(folder):
    """The iteration of an ``iter_NNNNNNN`` folder name, or None."""
    name = os.path.basename(folder)
    try:
        return int(name[len("iter_"):]) if name.startswith("iter_") else None
    except ValueError:
        return None


def _check_checkpoint(params, states):
    """DamagedCheckpoint unless ``params`` (and ``states`` when given) read back whole."""
    if not os.path.exists(params):
        raise DamagedCheckpoint("%s: checkpoint weights are missing" % params)
    check_params_file(params)
    if states is not None:
        check_states_file(states)


def resume_point(out_dir):
    """The newest intact checkpoint of ``out_dir``, for ``train --resume``.

    The checkpoint ``progress.json`` points at comes first; when its ``model.params`` or
    ``trainer.states`` is damaged (truncated or corrupt, e.g. by a full disk or a copy cut
    short), the older ``iter_*`` folders are tried, newest first. A run resumed from one of
    them repeats the straight run from that iteration on (DEVELOPING.md, "Determinism and
    resume").

    Args:
        out_dir (str): the checkpoint folder.

    Returns:
        tuple or None: ``(iteration, params path, states path or None, note)``, where ``note``
        is None when the latest checkpoint is used and otherwise one line saying which one was
        damaged and which one is used; None when ``out_dir`` holds no checkpoint.

    Raises:
        DamagedCheckpoint: the latest checkpoint is damaged and no older one is intact.
        UserError: ``progress.json`` is unreadable.
    """
    progress = read_progress(out_dir)
    if progress is None:
        return None
    latest = int(progress["iter"])
    try:
        params, states = checkpoint_files(out_dir)
        _check_checkpoint(params, states)
        return latest, params, states, None
    except UserError as e:  # DamagedCheckpoint, or weights missing
        damage = e
    for folder in sorted(glob.glob(os.path.join(out_dir, "iter_*")), reverse=True):
        it = _iteration_of(folder)
        if it is None or it >= latest or not os.path.isdir(folder):
            continue
        p = os.path.join(folder, "model.params")
        s = os.path.join(folder, "trainer.states")
        s = s if os.path.exists(s) else None
        try:
            _check_checkpoint(p, s)
        except DamagedCheckpoint:
            continue
        note = ("%s: the checkpoint of iteration %d is damaged (%s); resuming from %s, the "
                "newest intact checkpoint" % (out_dir, latest, _detail(damage, out_dir), folder))
        return it, p, s, note
    raise DamagedCheckpoint("%s; no intact older iter_* checkpoint in %s to resume from"
                            % (damage, out_dir))


def _detail(err, out_dir):
    """``err``'s text with the folder prefix cut, for a line that names the folder already."""
    text = str(err)
    prefix = out_dir.rstrip(os.sep) + os.sep
    return text[len(prefix):] if text.startswith(prefix) else text


def load_params(net, path, ctx=None):
    """``net.load_parameters(path)`` with one-line errors.

    Args:
        net (gluon.Block): the network built from the checkpoint's config.
        path (str): its ``model.params``.
        ctx: contexts to load on (``load_parameters``'s ``ctx``).

    Raises:
        DamagedCheckpoint: the file is truncated or corrupt.
        UserError: the file reads but does not match the network (names or shapes).
    """
    try:
        net.load_parameters(path, ctx=ctx)
    except (AssertionError, mx.base.MXNetError) as e:
        # read the file on its own only when loading failed: a file that does not read back
        # is damaged, one that does belongs to another network
        check_params_file(path)
        raise UserError("%s: does not match the network of its config (%s)"
                        % (path, error_text(e)))


def load_states(trainer, path):
    """``trainer.load_states(path)`` with one-line errors.

    Args:
        trainer (gluon.Trainer): the trainer, its kvstore initialised.
        path (str): its ``trainer.states``.

    Raises:
        DamagedCheckpoint: the file is truncated or corrupt.
        UserError: the file reads but does not fit the optimizer or the parameters.
    """
    try:
        trainer.load_states(path)
    except Exception as e:  # a damaged pickle, or the state of another optimizer or network
        check_states_file(path)
        raise UserError("%s: does not match the optimizer or network of its config (%s: %s)"
                        % (path, type(e).__name__, error_text(e)))


class RunLock:
    """The lock that keeps two ``mxmask train`` runs from writing into one folder.

    ``acquire`` creates ``OUT/.mxmask-train.lock`` with ``O_EXCL`` and writes ``pid host``
    into it; ``release`` removes it. A lock left by a process of this host that no longer
    exists (a run killed with SIGKILL) is taken over, with a note; a live holder, or one on
    another host (whose pid cannot be checked from here), is a UserError naming it.

    Args:
        out_dir (str): the checkpoint folder (created when missing).
        log: called with the note about a stale lock.
    """

    def __init__(self, out_dir, log=print):
        self.path = os.path.join(out_dir, LOCK)
        self.out_dir = out_dir
        self.log = log
        self.held = False

    def acquire(self):
        """Take the lock.

        Raises:
            UserError: another run holds it, or the folder cannot be written.
        """
        try:
            os.makedirs(self.out_dir, exist_ok=True)
        except OSError as e:
            raise UserError("%s: cannot create the output folder (%s)" % (self.out_dir, e))
        me = "%d %s\n" % (os.getpid(), socket.gethostname())
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            except OSError as e:
                raise UserError("%s: cannot create the lock file (%s)" % (self.path, e))
            try:
                os.write(fd, me.encode())
            finally:
                os.close(fd)
            self.held = True
            return
        raise UserError("%s: another mxmask train took the lock first" % self.path)

    def check(self):
        """Raise, without taking the lock, when another live run holds it (a stale lock is
        left for :meth:`acquire` to take over).

        Raises:
            UserError: naming the holder, as :meth:`acquire`.
        """
        pid, host = self._holder()
        if pid is None and host is None or _stale(pid, host):
            return
        self._refuse(pid, host)

    def _refuse(self, pid, host):
        """The UserError naming the lock's holder."""
        holder = ("pid %d on %s" % (pid, host)) if pid is not None else repr(host)
        raise UserError("%s is in use by another mxmask train (%s): wait for it to end, or "
                        "remove %s if it is gone" % (self.out_dir, holder, self.path))

    def _holder(self):
        """``(pid, host)`` written in the lock file; ``(None, text)`` when unreadable."""
        try:
            with open(self.path) as f:
                text = f.read().strip()
        except FileNotFoundError:
            return None, None
        except OSError as e:
            return None, str(e)
        parts = text.split()
        if len(parts) >= 2 and parts[0].isdigit():
            return int(parts[0]), parts[1]
        return None, text

    def _take_over_if_stale(self):
        """Remove the lock when its holder is a dead process of this host; else UserError."""
        pid, host = self._holder()
        if pid is None and host is None:
            return                              # removed meanwhile: try again
        if _stale(pid, host):
            self.log("%s: taking over the lock of mxmask train pid %d on %s, which no longer "
                     "runs" % (self.out_dir, pid, host))
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            return
        self._refuse(pid, host)

    def release(self):
        """Remove the lock file if this process holds it."""
        if self.held:
            self.held = False
            pid, _ = self._holder()
            if pid == os.getpid():
                try:
                    os.unlink(self.path)
                except OSError:
                    pass

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def _stale(pid, host):
    """Whether a lock written by ``pid`` on ``host`` was left by a process of this host that
    no longer runs (a holder on another host cannot be checked, so it is never stale)."""
    return pid is not None and host == socket.gethostname() and not _alive(pid)


def _alive(pid):
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# input.* settings that only change the test-time preprocessing (data.transforms.TestTransform),
# not the network or its anchor constants, so a trained checkpoint may take them with --set
TEST_INPUT_KEYS = ("input.resize_rule", "input.resize_interp", "input.normalize")


def load_checkpoint_config(ckpt, overrides=()):
    """The config saved in a checkpoint folder, with test-time overrides.

    Args:
        ckpt (str): the checkpoint folder, or the path of a config.yaml.
        overrides: ``key=value`` strings (``--set``) of ``test.*`` settings and of the
            test-time preprocessing (:data:`TEST_INPUT_KEYS`); the weights fix everything
            else, so any other key is a ConfigError.

    Returns:
        the config.

    Raises:
        UserError: when ``config.yaml`` is missing.
    """
    path = ckpt if ckpt.endswith((".yaml", ".yml")) else os.path.join(ckpt, "config.yaml")
    if not os.path.exists(path):
        raise UserError("%s: not a checkpoint folder (config.yaml is missing)" % ckpt)
    cfg = load_yaml(path)
    for assignment in overrides or ():
        key = assignment.split("=", 1)[0].strip()
        if not key.startswith("test.") and key not in TEST_INPUT_KEYS:
            raise ConfigError("--set %s: only test.* settings and %s can change for a trained "
                              "checkpoint (its weights fix the rest of %s)"
                              % (assignment, ", ".join(TEST_INPUT_KEYS), path))
        set_value(cfg, assignment)
    return cfg
