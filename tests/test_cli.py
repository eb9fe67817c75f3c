"""The `mxmask` command as a user runs it: help, data verbs, and one-line errors with exit 2."""
import json
import os
import subprocess
import sys

import pytest

from mxmask.cli import main, parse_ctx
from mxmask.utils import UserError


def run(*args, cwd=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "mxmask"] + list(args), cwd=cwd, timeout=timeout,
                          capture_output=True, text=True)


def test_help_lists_the_verbs():
    out = run("--help")
    assert out.returncode == 0
    for verb in ("data", "train", "eval", "predict"):
        assert verb in out.stdout


def test_data_shapes_then_check(tmp_path):
    out = run("data", "shapes", str(tmp_path / "s"), "--train", "3", "--val", "2", "--size", "96")
    assert out.returncode == 0, out.stderr
    assert os.path.exists(tmp_path / "s" / "annotations" / "train.json")
    assert len(os.listdir(tmp_path / "s" / "images" / "val")) == 2
    check = run("data", "check", str(tmp_path / "s" / "annotations" / "train.json"),
                "--images", str(tmp_path / "s" / "images" / "train"))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "figure" in check.stdout and "OK" in check.stdout


def test_data_check_of_a_broken_dataset_is_exit_2_with_one_line_per_problem(tmp_path, shapes_dataset):
    ann = os.path.join(shapes_dataset, "annotations", "val.json")
    data = json.load(open(ann))
    data["annotations"][0]["category_id"] = 999
    data["images"][1]["width"] = -5
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    out = run("data", "check", str(bad), "--images", os.path.join(shapes_dataset, "images", "val"))
    assert out.returncode == 2
    problems = [line for line in out.stdout.splitlines() if str(bad) in line]
    assert any("999" in line and "category_id" in line for line in problems)
    assert any("width" in line for line in problems)
    assert "Traceback" not in out.stdout + out.stderr


def test_training_on_a_broken_dataset_is_one_clear_line(tmp_path):
    bad = tmp_path / "train.json"
    bad.write_text('{"images": [], "annotations": [{"id": 1}]')   # truncated json
    out = run("train", "--set", "data.train_ann=%s" % bad, "--set",
              "data.train_images=%s" % tmp_path, "--out", str(tmp_path / "run"))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(bad) in lines[0]


def test_unknown_config_key_is_exit_2_and_suggests():
    out = run("train", "--set", "solver.max_iters=5")
    assert out.returncode == 2
    assert "solver.max_iter" in out.stderr and "Traceback" not in out.stderr


def test_parse_ctx():
    assert [str(c) for c in parse_ctx("cpu:3")] == ["cpu(0)", "cpu(1)", "cpu(2)"]
    assert [str(c) for c in parse_ctx("cpu")] == ["cpu(0)"]
    with pytest.raises(UserError, match="expected cpu"):
        parse_ctx("tpu:1")
    with pytest.raises(UserError, match="GPU"):
        parse_ctx("gpu:0,7")


def test_main_without_a_verb_prints_help(capsys):
    assert main([]) == 0
    assert "VERB" in capsys.readouterr().out
