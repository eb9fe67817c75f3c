"""mxmask bench: the table and the JSON record on a tiny model."""
import json

from mxmask.cli import main


def test_bench_writes_stages_and_totals(tmp_path, capsys):
    path = tmp_path / "bench.json"
    code = main(["bench", "--preset", "shapes", "--size", "96x120", "--runs", "2", "--warmup", "1",
                 "--train", "--json", str(path), "--set", "test.max_dets=10"])
    assert code == 0
    result = json.loads(path.read_text())
    m = result["mxmask"]
    assert set(m["stages"]) == {"backbone+fpn", "rpn+proposals", "box_head+nms", "mask_head",
                                "keypoint_head", "paste/decode"}
    for s in list(m["stages"].values()) + [m["total_s"], m["train_step_s"]]:
        assert 0 < s["min"] <= s["median"] <= s["max"]
    assert m["detections_per_image"] == 10          # the raised class bias fills max_dets
    assert result["settings"]["size"] == "96x128"   # rounded up to a multiple of 32
    assert m["peak_rss_mb"] > 0 and m["train_images_per_s"] > 0
    assert "keypoint_head" in capsys.readouterr().out


def test_bench_fused_and_bf16_variants(tmp_path):
    for extra in (["--fuse"], ["--fuse", "--dtype", "bfloat16"]):
        path = tmp_path / "bench.json"
        assert main(["bench", "--preset", "shapes", "--size", "96x128", "--runs", "1",
                     "--warmup", "1", "--json", str(path), "--set", "test.max_dets=5"] + extra) == 0
        result = json.loads(path.read_text())
        m = result["mxmask"]
        assert result["settings"]["fuse"] is True
        assert result["settings"]["dtype"] == (extra[-1] if len(extra) > 1 else "float32")
        assert m["total_s"]["median"] > 0 and m["plain_total_s"]["median"] > 0
