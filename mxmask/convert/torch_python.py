"""The user's torch interpreter, running :mod:`mxmask.convert.torchvision_reference` as a program.

mxmask's environment never imports torch (GluonCV refuses to import beside torch >= 2), so the
torchvision side of a comparison runs in a separate Python that has torch and torchvision.

In: the interpreter's path (``--torch-python PATH``; when not given, the environment variable
``MXMASK_TORCH_PYTHON``), a verb of ``torchvision_reference.py`` and its arguments.

Out:

- :func:`find_torch_python`: the interpreter's absolute path and the torch / torchvision
  versions it imports; a one-line UserError saying how to provide one when it is not set, does
  not exist, does not run, or cannot import torch and torchvision.
- :func:`run_reference`: the verb's stdout; a one-line UserError (the last line of its stderr)
  when it fails.
- :func:`run_reference_json`: the same, parsed as the one JSON object the verb prints.
"""
import json
import os
import subprocess

from ..utils import UserError

# the environment variable naming the interpreter, the program it runs, and the hint every
# UserError about the interpreter ends with
ENV_VAR = "MXMASK_TORCH_PYTHON"
REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchvision_reference.py")
HOW = ("pass --torch-python PATH or set %s to a Python with torch and torchvision, for example "
       "made with: python3 -m venv tv && tv/bin/pip install torch torchvision" % ENV_VAR)
# what the probe prints: one JSON line with the versions
_PROBE = ("import json, torch, torchvision; "
          "print(json.dumps({'torch': torch.__version__, 'torchvision': torchvision.__version__}))")


def find_torch_python(path=None, feature="the torchvision comparison", timeout=300):
    """Check the torch interpreter before any work starts.

    Args:
        path: the interpreter (``--torch-python``); None or "" reads ``MXMASK_TORCH_PYTHON``.
        feature: what needs it, for the message (``"mxmask bench --against torchvision"``).
        timeout: seconds the import of torch and torchvision may take.

    Returns:
        ``(python, {"torch": version, "torchvision": version})``, ``python`` absolute.

    Raises:
        UserError: one line naming the interpreter (or its absence) and how to provide one.
    """
    source = "--torch-python"
    if not path:
        path, source = os.environ.get(ENV_VAR, ""), ENV_VAR
    if not path:
        raise UserError("%s runs torchvision in a separate Python: %s" % (feature, HOW))
    where = "%s %s" % (source, path) if source != ENV_VAR else "%s=%s" % (source, path)
    python = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(python):
        raise UserError("%s: no such file; %s" % (where, HOW))
    if not os.access(python, os.X_OK):
        raise UserError("%s: not executable; %s" % (where, HOW))
    try:
        proc = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True,
                              timeout=timeout)
    except (OSError, subprocess.SubprocessError) as e:
        raise UserError("%s: does not run (%s); %s" % (where, _one_line(str(e)), HOW))
    versions = _parse_json(proc.stdout) if proc.returncode == 0 else None
    if not isinstance(versions, dict) or not {"torch", "torchvision"} <= set(versions):
        raise UserError("%s: cannot import torch and torchvision (%s); %s"
                        % (where, _last_line(proc.stderr) or "no version printed", HOW))
    return python, versions


def run_reference(python, verb, args=(), what=None):
    """Run ``python torchvision_reference.py VERB ARGS...`` to its end.

    Args:
        python: the interpreter from :func:`find_torch_python`.
        verb: ``time``, ``run``, ...
        args: the verb's arguments (converted with ``str``).
        what: the failing step's name in the message (default ``"torchvision_reference.py
            VERB"``).

    Returns:
        the program's stdout (its stderr is kept for the error message only).

    Raises:
        UserError: the program exits with a non-zero code; the line is its stderr's last line.
    """
    cmd = [python, REFERENCE, verb] + [str(a) for a in args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError("%s failed (exit %d, %s): %s" % (
            what or "torchvision_reference.py %s" % verb, proc.returncode, python,
            _last_line(proc.stderr) or "no message"))
    return proc.stdout


def run_reference_json(python, verb, args=(), what=None):
    """:func:`run_reference`, its stdout parsed as one JSON object (UserError when it is not)."""
    out = run_reference(python, verb, args, what)
    record = _parse_json(out)
    if not isinstance(record, dict):
        raise UserError("%s printed no JSON object (%s): %r" % (
            what or "torchvision_reference.py %s" % verb, python, _one_line(out)[:200]))
    return record


def _parse_json(text):
    """The last non-empty line of ``text`` as JSON; None when it is not JSON."""
    lines = [x for x in text.splitlines() if x.strip()]
    try:
        return json.loads(lines[-1]) if lines else None
    except ValueError:
        return None


def _last_line(text):
    """The last non-blank line of ``text``, stripped; "" when there is none."""
    lines = [x.strip() for x in (text or "").splitlines() if x.strip()]
    return lines[-1] if lines else ""


def _one_line(text):
    """``text`` with its whitespace runs, newlines included, made single spaces."""
    return " ".join((text or "").split())
