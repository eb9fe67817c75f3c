"""``python -m mxmask``: the ``mxmask`` command (:func:`mxmask.cli.main`)."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
