"""Small shared helpers: atomic file writes, the user-facing error, short name lists.

Files that must survive a crash are written with ``atomic_write_*`` (a temp file in the same
folder, fsynced, then ``os.replace``); errors caused by the user's input raise
:class:`UserError`, which the CLI prints as one line with exit code 2. The verbs check their
output paths with ``check_output_file``, ``check_output_dir`` and ``check_output_prefix`` before
any work starts.
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


def _make_folder(folder, path, option, expected):
    """Create ``folder`` (and its missing parents), or raise a one-line UserError naming
    ``path``, the value the user gave to ``option``, which ``expected`` describes."""
    existing = folder
    while not os.path.exists(existing):           # the nearest existing ancestor
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if os.path.exists(existing) and not os.path.isdir(existing):
        raise UserError("%s: %s expects %s, but %s is a file" % (path, option, expected, existing))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise UserError("%s: %s expects %s, but %s cannot be created: %s"
                        % (path, option, expected, folder, err.strerror or err)) from err
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError("%s: %s expects %s, but %s is read-only (permission denied)"
                        % (path, option, expected, folder))


def check_output_dir(path, option):
    """Check, before any work starts, that ``path`` can be the output folder of ``option``.

    Creates the folder (and its missing parents) when it is missing.

    Args:
        path (str): the folder.
        option (str): the option or argument that gave it, for the message (e.g. ``--out``).

    Returns:
        str: ``path``.

    Raises:
        UserError: one line naming ``path`` when it is a file, lies under a file, cannot be
        created or is not writable.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError("%s: %s expects a folder, but this is a file" % (path, option))
    _make_folder(os.path.abspath(path), path, option, "a writable folder")
    return path


def check_output_file(path, option):
    """Check, before any work starts, that ``path`` can be the output file of ``option``.

    Creates the file's missing parent folders; does not create the file.

    Args:
        path (str): the file.
        option (str): the option or argument that gave it, for the message (e.g. ``--json``).

    Returns:
        str: ``path``.

    Raises:
        UserError: one line naming ``path`` when it is a folder, its folder lies under a file,
        cannot be created or is not writable.
    """
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        raise UserError("%s: %s expects a file, but this is a folder" % (path, option))
    # the files are written through a temp file and os.replace, so the folder's permissions
    # decide, not those of an existing file
    _make_folder(os.path.dirname(os.path.abspath(path)), path, option,
                 "a file in a writable folder")
    return path


def check_output_prefix(prefix, suffixes, option):
    """Check, before any work starts, that the files ``prefix + suffix`` can be written.

    Args:
        prefix (str): a file prefix such as ``export/model``.
        suffixes: the suffixes of the files written, e.g. ``("-symbol.json", ...)``.
        option (str): the option that gave the prefix, for the message.

    Returns:
        list of str: the files.

    Raises:
        UserError: one line naming the prefix when it is a folder, or naming the file as in
        :func:`check_output_file`.
    """
    if not os.path.basename(prefix) or os.path.isdir(prefix):
        raise UserError("%s: %s expects a file prefix such as export/model (the files are "
                        "PREFIX%s, ...), not a folder" % (prefix, option, suffixes[0]))
    return [check_output_file(prefix + suffix, option) for suffix in suffixes]


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
