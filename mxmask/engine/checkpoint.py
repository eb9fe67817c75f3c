"""Checkpoint folders: crash-safe saving, loading and resuming.

In: a network, its ``gluon.Trainer`` and the iteration; or a checkpoint folder to read.
Out: a checkpoint folder (the run's ``output_dir``) that holds, as the contract says:

    config.yaml        the full resolved config
    model.params       the network weights of the last checkpoint
    trainer.states     the optimizer state of the last checkpoint
    progress.json      {"iter": N, "max_iter": M, "checkpoint": "iter_0000N", ...}
    iter_NNNNNNN/      the last checkpoints' model.params and trainer.states
    metrics.json       after evaluation

A crash or a full disk at any moment leaves the previous checkpoint complete
(:func:`save_checkpoint`). Evaluation, prediction and export read the config back with
:func:`load_checkpoint_config`, which only lets test-time settings change.
"""
import glob
import json
import os
import shutil

from ..config import ConfigError, dump_yaml, load_yaml, set_value
from ..utils import UserError, atomic_write_json

PROGRESS = "progress.json"


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
        if trainer is not None:
            states = os.path.join(staging, "trainer.states")
            trainer.save_states(states)
            _fsync_file(states)
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
