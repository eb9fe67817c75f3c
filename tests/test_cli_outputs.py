"""Every writing verb checks its output paths before it builds a model or runs anything.

A file where a folder is expected, a folder where a file is expected, or a path under a regular
file (a parent that cannot be created) gives exit 2 and one line naming the path. The read-only
case is tested on the helpers (tests/test_utils.py): the suite runs as root, for whom a chmod'ed
folder stays writable.
"""
import errno
import os
import subprocess
import sys

import pytest

from mxmask.cli import main


def _must_not_run(name):
    def fail(*args, **kwargs):
        raise AssertionError("%s ran although an output path is bad" % name)
    return fail


@pytest.fixture
def no_work(monkeypatch):
    """Every function a verb would do its work with fails the test when called."""
    import mxmask.bench
    import mxmask.convert.gluoncv
    import mxmask.data.shapes
    import mxmask.engine.checkpoint
    import mxmask.engine.evaluator
    import mxmask.engine.inference
    import mxmask.export
    import mxmask.predictor
    import mxmask.train
    for module, name in [(mxmask.predictor, "Predictor"), (mxmask.train, "run_training"),
                         (mxmask.bench, "run_bench"), (mxmask.export, "export_checkpoint"),
                         (mxmask.engine.checkpoint, "load_checkpoint_config"),
                         (mxmask.data.shapes, "generate_shapes"),
                         (mxmask.engine.evaluator, "evaluate_results"),
                         (mxmask.engine.inference, "evaluate_on_dataset"),
                         (mxmask.convert.gluoncv, "convert_gluoncv")]:
        monkeypatch.setattr(module, name, _must_not_run(name))


@pytest.fixture
def paths(tmp_path):
    """A regular file, a folder, and paths under the file (parents that cannot be created)."""
    afile = tmp_path / "a_file"
    afile.write_text("x")
    folder = tmp_path / "a_folder"
    folder.mkdir()
    image = tmp_path / "im.png"
    image.write_bytes(b"")
    return {"file": str(afile), "folder": str(folder), "under_file": str(afile / "sub" / "o"),
            "under_file.json": str(afile / "sub" / "o.json"), "tmp": str(tmp_path),
            "image": str(image)}


# (verb, option label in the message, what the path must be, argv for a path)
DIR_OPTIONS = [
    ("train", "--out", lambda p, t: ["train", "--out", p]),
    ("eval", "--out-dir", lambda p, t: ["eval", t["folder"], "--out-dir", p]),
    ("eval --results", "--out-dir",
     lambda p, t: ["eval", "--results", t["image"], "--ann", t["image"], "--out-dir", p]),
    ("predict", "--vis", lambda p, t: ["predict", t["folder"], t["image"], "--vis", p,
                                       "--out", os.path.join(t["tmp"], "r.json")]),
    ("predict", "--cutout", lambda p, t: ["predict", t["folder"], t["image"], "--cutout", p,
                                          "--out", os.path.join(t["tmp"], "r.json")]),
    ("data shapes", "data shapes OUT", lambda p, t: ["data", "shapes", p]),
    ("convert gluoncv", "--out", lambda p, t: ["convert", "gluoncv", t["image"], "--out", p]),
]
FILE_OPTIONS = [
    ("eval", "--out", lambda p, t: ["eval", t["folder"], "--out", p]),
    ("predict", "--out", lambda p, t: ["predict", t["folder"], t["image"], "--out", p]),
    ("bench", "--json", lambda p, t: ["bench", "--json", p]),
    ("bench", "--chart", lambda p, t: ["bench", "--chart", p]),
]


def _one_error_line(capsys, path):
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("mxmask: error: %s: " % path), lines[0]
    return lines[0]


@pytest.mark.parametrize("verb,option,argv", DIR_OPTIONS, ids=[v + " " + o for v, o, _ in
                                                               DIR_OPTIONS])
def test_a_file_where_a_folder_is_expected(verb, option, argv, paths, no_work, capsys):
    assert main(argv(paths["file"], paths)) == 2
    line = _one_error_line(capsys, paths["file"])
    assert line.endswith("%s expects a folder, but this is a file" % option)


@pytest.mark.parametrize("verb,option,argv", DIR_OPTIONS, ids=[v + " " + o for v, o, _ in
                                                               DIR_OPTIONS])
def test_a_folder_under_a_file(verb, option, argv, paths, no_work, capsys):
    assert main(argv(paths["under_file"], paths)) == 2
    line = _one_error_line(capsys, paths["under_file"])
    assert line.endswith("%s expects a writable folder, but %s is a file"
                         % (option, paths["file"]))


@pytest.mark.parametrize("verb,option,argv", FILE_OPTIONS, ids=[v + " " + o for v, o, _ in
                                                                FILE_OPTIONS])
def test_a_folder_where_a_file_is_expected(verb, option, argv, paths, no_work, capsys):
    assert main(argv(paths["folder"], paths)) == 2
    line = _one_error_line(capsys, paths["folder"])
    assert line.endswith("%s expects a file, but this is a folder" % option)


@pytest.mark.parametrize("verb,option,argv", FILE_OPTIONS, ids=[v + " " + o for v, o, _ in
                                                                FILE_OPTIONS])
def test_a_file_under_a_file(verb, option, argv, paths, no_work, capsys):
    path = paths["under_file.json"]
    assert main(argv(path, paths)) == 2
    line = _one_error_line(capsys, path)
    assert line.endswith("%s expects a file in a writable folder, but %s is a file"
                         % (option, paths["file"]))


def test_eval_default_results_in_the_checkpoint(paths, no_work, capsys):
    # no --out: the results json goes to OUT_DIR/results.json, here a folder
    os.mkdir(os.path.join(paths["folder"], "results.json"))
    assert main(["eval", paths["folder"]]) == 2
    path = os.path.join(paths["folder"], "results.json")
    assert _one_error_line(capsys, path).endswith("--out expects a file, but this is a folder")


@pytest.mark.parametrize("bad", ["folder", "file_in_folder", "under_file"])
def test_export_prefix(bad, paths, no_work, capsys):
    prefix = {"folder": paths["folder"], "under_file": paths["under_file"],
              "file_in_folder": os.path.join(paths["folder"], "m")}[bad]
    if bad == "file_in_folder":                    # one of the four files is a folder
        os.mkdir(prefix + "-meta.json")
    assert main(["export", paths["folder"], "--out", prefix, "--size", "64x64"]) == 2
    if bad == "folder":
        line = _one_error_line(capsys, prefix)
        assert "--out expects a file prefix such as export/model" in line
    elif bad == "file_in_folder":
        line = _one_error_line(capsys, prefix + "-meta.json")
        assert line.endswith("--out expects a file, but this is a folder")
    else:
        line = _one_error_line(capsys, prefix + "-symbol.json")
        assert line.endswith("but %s is a file" % paths["file"])


def test_train_checks_the_configs_output_dir(paths, no_work, capsys):
    assert main(["train", "--set", "output_dir=%s" % paths["file"]]) == 2
    line = _one_error_line(capsys, paths["file"])
    assert line.endswith("output_dir expects a folder, but this is a file")


def test_a_late_write_error_is_one_line(ckpt, shapes_dataset, tmp_path, monkeypatch, capsys):
    """An OSError while writing after the checks (here a full disk) ends in one line, exit 2."""
    import mxmask.utils

    def disk_full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    monkeypatch.setattr(mxmask.utils, "atomic_write_json", disk_full)
    image = os.path.join(shapes_dataset, "images", "val", "000001.png")
    out = str(tmp_path / "r.json")
    assert main(["predict", ckpt, image, "--out", out]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert lines == ["mxmask: error: %s: %s" % (out, os.strerror(errno.ENOSPC))]


def test_in_a_real_process_no_traceback(tmp_path):
    """The command as a user runs it: a folder given to bench --json fails at once, before the
    benchmark builds its model."""
    out = subprocess.run([sys.executable, "-m", "mxmask", "bench", "--json", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "mxmask: error: %s: --json expects a file, but this is a folder" % tmp_path]
    assert out.stdout == ""


def test_a_failing_mxnet_write_in_export_is_one_line(ckpt, tmp_path, monkeypatch, capsys):
    """MXNet reports a failed file write as an MXNetError holding a C++ traceback; export turns
    it into one line naming the prefix and the reason."""
    import mxnet as mx

    def disk_full(path, *args, **kwargs):
        raise mx.base.MXNetError('Traceback (most recent call last):\n  File "local_filesys.cc", '
                                 'line 209\nLocalFileSystem: Check failed: allow_null: :Open "%s":'
                                 ' No space left on device' % path)
    monkeypatch.setattr(mx.nd, "save", disk_full)
    prefix = str(tmp_path / "exp" / "model")
    assert main(["export", ckpt, "--out", prefix, "--no-check"]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert lines == ["mxmask: error: %s: the export could not be written: No space left on device"
                     % prefix]
    assert not os.listdir(tmp_path / "exp")              # the staging folder is gone
