"""Test helper (not a test module): the check that a verb fails the way users are promised.

``one_line_exit_2(capsys, argv, *pieces)``: ``mxmask.cli.main(argv)`` returns 2 and prints one
line on stderr holding every one of ``pieces``, and no traceback anywhere.
"""
from mxmask.cli import main


def one_line_exit_2(capsys, argv, *pieces):
    """``main(argv)`` returns 2 and prints one line holding ``pieces``, no traceback."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for piece in pieces:
        assert piece in lines[0], (piece, lines[0])
