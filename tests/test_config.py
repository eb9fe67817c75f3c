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
    ("solver.max_iter=0", ["solver.max_iter", "> 0", "got 0"]),
    ("solver.ims_per_batch=-2", ["solver.ims_per_batch", "> 0", "-2"]),
    ("data.num_workers=-1", ["data.num_workers", ">= 0", "-1"]),
    ("test.score_thresh=nan", ["test.score_thresh", "[0, 1]", "nan"]),
    ("test.score_thresh=1.5", ["test.score_thresh", "[0, 1]", "1.5"]),
    ("test.nms_thresh=-0.1", ["test.nms_thresh", "[0, 1]"]),
    ("test.mask_thresh=.nan", ["test.mask_thresh", "[0, 1]", "nan"]),
    ("test.mask_box_thresh=1", ["test.mask_box_thresh", "[0, 1)"]),
    ("model.rpn.fg_iou_thresh=2", ["model.rpn.fg_iou_thresh", "[0, 1]"]),
    ("model.box_head.positive_fraction=nan", ["model.box_head.positive_fraction", "[0, 1]"]),
    ("input.flip_prob=1.01", ["input.flip_prob", "[0, 1]"]),
    ("input.copy_paste_prob=-1", ["input.copy_paste_prob", "[0, 1]"]),
    ("solver.base_lr=nan", ["solver.base_lr", "expected a number", "nan"]),
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


def test_every_range_names_a_numeric_key_whose_default_is_in_range():
    from mxmask.config import RANGES, _in_range
    cfg = Config()
    for key, bounds in RANGES.items():
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        assert isinstance(node, (int, float)) and _in_range(node, bounds), key


def test_range_edges_are_accepted():
    cfg = get_config("shapes", ["test.score_thresh=0", "test.nms_thresh=1",
                                "test.mask_box_thresh=0.99", "data.num_workers=0",
                                "solver.max_iter=1", "input.flip_prob=1"])
    assert (cfg.test.score_thresh, cfg.test.mask_box_thresh, cfg.data.num_workers) == (0.0, 0.99, 0)


def test_a_value_out_of_range_in_a_file_names_the_file_and_key(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("_base_: shapes\nsolver: {max_iter: 0}\n")
    with pytest.raises(ConfigError) as err:
        get_config(str(path))
    assert str(err.value).startswith(str(path) + ": solver.max_iter: expected a value > 0")


@pytest.mark.parametrize("text, got", [("- a\n- b\n", "got a list"), ("5\n", "single value 5"),
                                       ("just words\n", "single value 'just words'")])
def test_a_yaml_file_that_is_not_a_mapping_is_one_line_naming_it(tmp_path, text, got):
    path = tmp_path / "list.yaml"
    path.write_text(text)
    for load in (load_yaml, get_config):
        with pytest.raises(ConfigError) as err:
            load(str(path))
        message = str(err.value)
        assert "\n" not in message and message.startswith(str(path) + ": ") and got in message


def test_aligned_pooling_without_clipped_boxes_is_refused_naming_both_keys(tmp_path):
    with pytest.raises(ConfigError) as err:
        get_config("shapes", ["model.clip_boxes=false"])
    assert "model.box_head.aligned" in str(err.value) and "model.clip_boxes" in str(err.value)
    path = tmp_path / "config.yaml"
    path.write_text("model: {clip_boxes: false}\n")      # aligned: true is the default
    with pytest.raises(ConfigError) as err:
        load_yaml(str(path))
    assert str(err.value).startswith(str(path) + ": model.box_head.aligned")
    # the legacy pooler copes with boxes that leave the image (the GluonCV preset)
    cfg = get_config("shapes", ["model.box_head.aligned=false", "model.clip_boxes=false"])
    assert not cfg.model.clip_boxes


@pytest.mark.parametrize("name", list_presets())
def test_every_shipped_preset_loads_and_its_saved_config_loads_back(name, tmp_path):
    cfg = get_config(name)
    path = tmp_path / "config.yaml"
    dump_yaml(cfg, str(path))
    assert load_yaml(str(path)) == cfg


def test_a_config_saved_without_recent_keys_still_loads(tmp_path):
    """A checkpoint's config.yaml written before a key existed gets that key's default."""
    path = tmp_path / "config.yaml"
    path.write_text("seed: 3\nsolver: {max_iter: 10, ims_per_batch: 2}\n"
                    "model: {clip_boxes: true, box_head: {aligned: true}}\n")
    cfg = load_yaml(str(path))
    assert cfg.seed == 3 and cfg.test.mask_box_thresh == 0.0
