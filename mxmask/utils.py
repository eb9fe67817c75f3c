"""Small shared helpers: atomic file writes, the user-facing error, short name lists.

Files that must survive a crash are written with ``atomic_write_*`` (a temp file in the same
folder, fsynced, then ``os.replace``); errors caused by the user's input raise
:class:`UserError`, which the CLI prints as one line with exit code 2.
"""
import json
import os
import tempfile


def _umask():
    """The process's current umask (read by setting it and putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


class UserError(Exception):
    """An error caused by the user's input (a file, a field, an option).

    The CLI prints ``str(err)`` as one line and exits with code 2; no traceback is shown.
    """


def _atomic_write(path, write_fn, mode):
    """``write_fn(f)`` into a temp file beside ``path``, fsync, then ``os.replace`` onto it."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + ".", dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path, text):
    """Write ``text`` to ``path`` through a temp file in the same folder and ``os.replace``.

    Args:
        path (str): the file; its folder is created when missing.
        text (str): the contents.

    A crash at any moment leaves either the old file or the new one, never a partial file.
    """
    _atomic_write(path, lambda f: f.write(text), "w")


def atomic_write_bytes(path, data):
    """Write bytes to ``path`` atomically, as :func:`atomic_write_text`.

    Args:
        path (str): the file.
        data (bytes): the contents.
    """
    _atomic_write(path, lambda f: f.write(data), "wb")


def atomic_write_json(path, obj, indent=None):
    """Write an object as json to ``path`` atomically, as :func:`atomic_write_text`.

    Args:
        path (str): the file.
        obj: anything ``json.dumps`` takes.
        indent (int or None): passed to ``json.dumps``.
    """
    atomic_write_text(path, json.dumps(obj, indent=indent))


def shorten_names(names, limit=6):
    """A sorted, shortened list of names for a one-line error.

    Args:
        names: iterable of str.
        limit (int): how many names to show.

    Returns:
        str: ``a, b, c, ... (N more)``.
    """
    names = sorted(names)
    text = ", ".join(names[:limit])
    if len(names) > limit:
        text += ", ... (%d more)" % (len(names) - limit)
    return text
