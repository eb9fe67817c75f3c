"""mxmask.utils: the output-path checks every writing verb runs before it starts."""
import os

import pytest

from mxmask import utils
from mxmask.utils import UserError, check_output_dir, check_output_file, check_output_prefix


def _one_line(err):
    text = str(err.value)
    assert "\n" not in text
    return text


def test_output_dir_is_created_with_its_parents(tmp_path):
    path = str(tmp_path / "a" / "b" / "run")
    assert check_output_dir(path, "--out") == path
    assert os.path.isdir(path)
    assert check_output_dir(path, "--out") == path       # an existing folder is fine


def test_output_dir_refuses_a_file(tmp_path):
    path = tmp_path / "f"
    path.write_text("x")
    with pytest.raises(UserError) as err:
        check_output_dir(str(path), "--out")
    assert _one_line(err) == "%s: --out expects a folder, but this is a file" % path


def test_output_dir_under_a_file_names_the_file(tmp_path):
    blocker = tmp_path / "f"
    blocker.write_text("x")
    path = str(blocker / "sub" / "run")
    with pytest.raises(UserError) as err:
        check_output_dir(path, "--vis")
    assert _one_line(err) == "%s: --vis expects a writable folder, but %s is a file" % (
        path, blocker)


def test_output_dir_read_only(tmp_path, monkeypatch):
    # tests run as root here, for whom a chmod'ed folder stays writable: os.access says no
    monkeypatch.setattr(utils.os, "access", lambda path, mode: False)
    with pytest.raises(UserError) as err:
        check_output_dir(str(tmp_path), "--out-dir")
    assert _one_line(err) == ("%s: --out-dir expects a writable folder, but %s is read-only "
                              "(permission denied)" % (tmp_path, tmp_path))


def test_output_dir_that_cannot_be_created(tmp_path, monkeypatch):
    def refuse(path, exist_ok=False):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(utils.os, "makedirs", refuse)
    path = str(tmp_path / "new")
    with pytest.raises(UserError) as err:
        check_output_dir(path, "--out")
    assert _one_line(err) == ("%s: --out expects a writable folder, but %s cannot be created: "
                              "Permission denied" % (path, path))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into a chmod 555 folder; "
                           "test_output_dir_read_only covers it with os.access patched")
def test_output_file_in_a_chmod_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(UserError, match="read-only"):
            check_output_file(str(folder / "r.json"), "--out")
    finally:
        folder.chmod(0o755)


def test_output_file_creates_its_folder_but_not_the_file(tmp_path):
    path = str(tmp_path / "x" / "y" / "r.json")
    assert check_output_file(path, "--json") == path
    assert os.path.isdir(tmp_path / "x" / "y") and not os.path.exists(path)
    assert check_output_file("r.json", "--out") == "r.json"    # the current folder


def test_output_file_refuses_a_folder(tmp_path):
    with pytest.raises(UserError) as err:
        check_output_file(str(tmp_path), "--json")
    assert _one_line(err) == "%s: --json expects a file, but this is a folder" % tmp_path
    with pytest.raises(UserError, match="but this is a folder"):
        check_output_file(str(tmp_path / "new") + "/", "--json")


def test_output_file_under_a_file(tmp_path):
    blocker = tmp_path / "f"
    blocker.write_text("x")
    path = str(blocker / "r.json")
    with pytest.raises(UserError) as err:
        check_output_file(path, "--chart")
    assert _one_line(err) == ("%s: --chart expects a file in a writable folder, but %s is a file"
                              % (path, blocker))


def test_output_file_read_only_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(utils.os, "access", lambda path, mode: False)
    path = str(tmp_path / "r.json")
    with pytest.raises(UserError) as err:
        check_output_file(path, "--out")
    assert _one_line(err) == ("%s: --out expects a file in a writable folder, but %s is "
                              "read-only (permission denied)" % (path, tmp_path))


def test_output_prefix(tmp_path):
    suffixes = ("-symbol.json", "-0000.params")
    prefix = str(tmp_path / "exp" / "model")
    assert check_output_prefix(prefix, suffixes, "--out") == [prefix + s for s in suffixes]
    assert os.path.isdir(tmp_path / "exp")
    with pytest.raises(UserError) as err:
        check_output_prefix(str(tmp_path), suffixes, "--out")
    assert _one_line(err) == ("%s: --out expects a file prefix such as export/model (the files "
                              "are PREFIX-symbol.json, ...), not a folder" % tmp_path)
    (tmp_path / "exp" / "model-0000.params").mkdir()
    with pytest.raises(UserError, match="model-0000.params: --out expects a file, but this is"):
        check_output_prefix(prefix, suffixes, "--out")
