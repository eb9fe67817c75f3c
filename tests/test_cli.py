"""The `mxmask` command as a user runs it: help, data verbs, and one-line errors with exit 2."""
import json
import os
import subprocess
import sys

import pytest

from helpers.cli_errors import one_line_exit_2
from mxmask.cli import main, parse_ctx
from mxmask.utils import UserError


def _num_gpus():
    import mxnet as mx
    try:
        return mx.context.num_gpus()
    except mx.base.MXNetError:
        return 0


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
    # cpu:0 is CPU number 0, one context (it was "0 CPU contexts": nothing to train on)
    assert [str(c) for c in parse_ctx("cpu:0")] == ["cpu(0)"]
    assert [str(c) for c in parse_ctx("cpu:1")] == ["cpu(0)"]
    for bad in ("cpu:-1", "gpu:-1", "gpu:0,0", "gpu:a", "cpu:1.5"):
        with pytest.raises(UserError, match="--ctx"):
            parse_ctx(bad)
    with pytest.raises(UserError, match="expected cpu"):
        parse_ctx("tpu:1")
    with pytest.raises(UserError, match="GPU"):
        parse_ctx("gpu:0,7")


def test_main_without_a_verb_prints_help(capsys):
    assert main([]) == 0
    assert "VERB" in capsys.readouterr().out


@pytest.mark.skipif(_num_gpus() > 0, reason="the machine has a GPU")
@pytest.mark.parametrize("verb", [["train"], ["eval", "CKPT"], ["predict", "CKPT", "IMAGE"]])
def test_a_gpu_context_without_a_gpu_is_one_line(tmp_path, capsys, ckpt, verb):
    argv = [a.replace("CKPT", ckpt).replace("IMAGE", str(tmp_path / "x.png")) for a in verb]
    if verb == ["train"]:
        argv += ["--out", str(tmp_path / "run")]
    one_line_exit_2(capsys, argv + ["--ctx", "gpu:0"], "--ctx gpu:0", "0 GPU(s)")


def test_predict_refuses_a_score_threshold_outside_0_1(tmp_path, capsys, ckpt, shapes_dataset):
    image = os.path.join(shapes_dataset, "images", "val",
                         sorted(os.listdir(os.path.join(shapes_dataset, "images", "val")))[0])
    for value in ("nan", "1.5", "-0.1"):
        one_line_exit_2(capsys, ["predict", ckpt, image, "--out", str(tmp_path / "r.json"),
                                  "--score-thresh", value], "--score-thresh", "[0, 1]")


@pytest.mark.parametrize("args, piece", [(["--batch", "0"], "--batch must be at least 1"),
                                         (["--runs", "0"], "--runs must be at least 1")])
def test_bench_refuses_an_empty_batch_or_no_runs(capsys, args, piece):
    one_line_exit_2(capsys, ["bench", "--preset", "shapes", "--size", "64x64"] + args, piece)


@pytest.mark.parametrize("assignment, key", [("solver.max_iter=0", "solver.max_iter"),
                                             ("test.score_thresh=nan", "test.score_thresh"),
                                             ("model.clip_boxes=false", "model.clip_boxes")])
def test_train_refuses_settings_out_of_range_before_anything_runs(tmp_path, capsys, assignment,
                                                                  key):
    one_line_exit_2(capsys, ["train", "--set", assignment, "--out", str(tmp_path / "run")], key)
    assert not os.path.exists(tmp_path / "run" / "model.params")


def test_train_with_a_config_that_is_a_yaml_list_is_one_line(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text("- solver.max_iter: 3\n")
    one_line_exit_2(capsys, ["train", "--config", str(path), "--out", str(tmp_path / "run")],
                    str(path), "mapping")


def test_train_on_cpu_0_trains_and_evaluates(tmp_path, capsys, shapes_dataset):
    """``--ctx cpu:0`` is one CPU context (CPU number 0), as ``--ctx cpu``."""
    from helpers.tiny import TINY
    paths = ["data.%s_%s=%s" % (split, kind, os.path.join(shapes_dataset, folder, name))
             for split in ("train", "val")
             for kind, folder, name in (("ann", "annotations", split + ".json"),
                                        ("images", "images", split))]
    sets = TINY + paths + ["solver.max_iter=1", "solver.checkpoint_period=1"]
    argv = ["train", "--ctx", "cpu:0", "--out", str(tmp_path / "run")]
    for assignment in sets:
        argv += ["--set", assignment]
    assert main(argv) == 0
    assert os.path.exists(tmp_path / "run" / "metrics.json")
    assert "Traceback" not in "".join(capsys.readouterr())


def test_bench_of_a_checkpoint_checks_the_overridden_config(capsys, ckpt):
    one_line_exit_2(capsys, ["bench", "--ckpt", ckpt, "--size", "64x64", "--set",
                              "model.clip_boxes=false"],
                     "model.clip_boxes", "model.box_head.aligned")
