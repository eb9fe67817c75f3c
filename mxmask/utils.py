"""Small shared helpers: atomic file writes, user-facing errors, logging setup."""
import json
import os
import tempfile


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


class UserError(Exception):
    """An error caused by the user's input (a file, a field, an option).

    The CLI prints ``str(err)`` as one line and exits with code 2; no traceback is shown.
    """


def _atomic_write(path, write_fn, mode):
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
    """Write ``text`` to ``path`` through a temp file in the same folder and ``os.replace``."""
    _atomic_write(path, lambda f: f.write(text), "w")


def atomic_write_bytes(path, data):
    _atomic_write(path, lambda f: f.write(data), "wb")


def atomic_write_json(path, obj, indent=None):
    atomic_write_text(path, json.dumps(obj, indent=indent))


def shorten_names(names, limit=6):
    """``a, b, c, ... (N more)``: a sorted, shortened list of names for a one-line error."""
    names = sorted(names)
    text = ", ".join(names[:limit])
    if len(names) > limit:
        text += ", ... (%d more)" % (len(names) - limit)
    return text
