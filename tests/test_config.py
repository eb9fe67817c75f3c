"""The config tree: presets, YAML round trip, --set overrides and their errors."""
import pytest

from mxmask.config import (Config, ConfigError, dump_yaml, get_config, list_presets, load_yaml,
                           set_value)

PRESETS = ["shapes", "mask_rcnn_r50_fpn", "mask_rcnn_r101_fpn", "keypoint_rcnn_r50_fpn",
           "gluoncv_mask_rcnn_r50_fpn"]


def test_the_contract_presets_exist():
    assert set(PRESETS) <= set(list_presets())


@pytest.mark.parametrize("name", PRESETS)
def test_preset_yaml_round_trip_is_lossless(name, tmp_path):
    cfg = get_config(name)
    path = tmp_path / "config.yaml"
    dump_yaml(cfg, str(path))
    assert load_yaml(str(path)) == cfg
    assert dump_yaml(load_yaml(str(path))) == dump_yaml(cfg)


def test_presets_differ_where_the_design_says():
    d2, gcv = get_config("mask_rcnn_r50_fpn"), get_config("gluoncv_mask_rcnn_r50_fpn")
    assert (d2.model.rpn.conv_channels, gcv.model.rpn.conv_channels) == (256, 1024)
    assert (d2.model.fpn.p6, gcv.model.fpn.p6) == ("maxpool", "conv")
    assert (d2.model.box_plus_one, gcv.model.box_plus_one) == (False, True)
    assert gcv.model.box_head.pooler_resolution == 14 and gcv.model.box_head.pool_then_avgpool
    assert (gcv.model.box_head.aligned, gcv.model.box_head.sampling_ratio) == (False, 2)
    assert gcv.test.score_thresh == 0.01 and not gcv.model.clip_boxes
    assert get_config("mask_rcnn_r101_fpn").model.backbone.depth == 101
    kp = get_config("keypoint_rcnn_r50_fpn")
    assert kp.model.keypoint_on and len(kp.test.keypoint_oks_sigmas) == 17


def test_set_overrides_with_type_conversion():
    cfg = get_config("shapes", ["solver.max_iter=7", "solver.base_lr=1e-3", "model.mask_on=false",
                                "input.min_size_train=[100, 120]", "input.min_size_train=96",
                                "test.keypoint_decode=bicubic"])
    assert cfg.solver.max_iter == 7 and isinstance(cfg.solver.max_iter, int)
    assert cfg.solver.base_lr == 1e-3 and cfg.model.mask_on is False
    assert cfg.input.min_size_train == [96]
    assert cfg.test.keypoint_decode == "bicubic"


@pytest.mark.parametrize("assignment, words", [
    ("solver.max_itr=3", ["unknown config key 'solver.max_itr'", "solver.max_iter"]),
    ("modle.mask_on=true", ["unknown config key", "model"]),
    ("solver.max_iter=ten", ["solver.max_iter", "expected an integer", "'ten'"]),
    ("model.mask_on=3", ["model.mask_on", "expected true or false"]),
    ("test.keypoint_decode=cubic", ["test.keypoint_decode", "bicubic", "taylor"]),
    ("solver=3", ["solver is a section"]),
    ("solver.max_iter", ["expected key=value"]),
])
def test_bad_overrides_are_one_clear_line(assignment, words):
    with pytest.raises(ConfigError) as err:
        set_value(Config(), assignment)
    message = str(err.value)
    assert "\n" not in message
    for w in words:
        assert w in message


def test_unknown_key_in_a_file_names_the_file_and_suggests(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("_base_: shapes\nsolver:\n  base_lrr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        get_config(str(path))
    assert str(path) in str(err.value) and "solver.base_lr" in str(err.value)


def test_user_file_builds_on_a_preset(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("_base_: mask_rcnn_r50_fpn\nsolver: {max_iter: 10}\n")
    cfg = get_config(str(path))
    assert cfg.solver.max_iter == 10 and cfg.model.backbone.depth == 50


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError) as err:
        get_config("mask_rcnn_r51_fpn")
    assert "mask_rcnn_r50_fpn" in str(err.value)


def test_shapes_preset_carries_the_sigmas_of_the_shapes_keypoints():
    from mxmask.data.shapes import KEYPOINT_NAMES, KEYPOINT_OKS_SIGMAS
    sigmas = get_config("shapes").test.keypoint_oks_sigmas
    assert len(sigmas) == len(KEYPOINT_NAMES)
    assert sigmas == [float(s) for s in KEYPOINT_OKS_SIGMAS]
