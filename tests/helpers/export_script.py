"""Test helper (not a test module): scripts/predict_exported.py run on an export, and the check
that its result entries are mxmask's.

``run_script(prefix, image, tmp_path)`` runs the script as ``__main__`` in a fresh interpreter
on one image and returns its entries; it fails the test unless the script exits 0 without having
loaded any module of :data:`FORBIDDEN`. ``assert_same_entries(mine, theirs)`` compares the
script's entries with mxmask's (``Predictor.predict_image`` or ``mxmask predict``'s json).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "predict_exported.py")
# what the script must run without
FORBIDDEN = ("mxmask", "gluoncv", "yaml", "pycocotools", "PIL")


def run_script(prefix, image, tmp_path):
    """scripts/predict_exported.py run as __main__ on one image -> its entries (json); it must
    finish without loading any module of FORBIDDEN."""
    out = str(tmp_path / "script_results.json")
    # run the script as __main__ and list, after it finished, any forbidden module it loaded
    code = ("import runpy, sys\n"
            "sys.argv = sys.argv[1:]\n"
            "rc = 0\n"
            "try:\n"
            "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    rc = e.code\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in %r)\n"
            "print('LOADED', bad, file=sys.stderr)\n"
            "sys.exit(rc)\n" % (FORBIDDEN,))
    proc = subprocess.run([sys.executable, "-c", code, SCRIPT, prefix, image, "--out", out],
                          capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LOADED []" in proc.stderr, proc.stderr[-2000:]
    assert os.path.basename(image) + ": " in proc.stdout
    with open(out) as f:
        return json.load(f)


def assert_same_entries(mine, theirs):
    """The script's entries equal mxmask's: classes, scores, boxes, masks; keypoints (the
    script's argmax ones vs mxmask's heatmap-refined ones) in the same region."""
    pycocotools_mask = pytest.importorskip("pycocotools.mask")
    assert len(mine) == len(theirs) > 0
    for a, b in zip(mine, theirs):
        assert a["category_id"] == b["category_id"] and a["file_name"] == b["file_name"]
        assert abs(a["score"] - b["score"]) <= 1e-6
        np.testing.assert_allclose(a["bbox"], b["bbox"], atol=1e-3)
        rle = pycocotools_mask.frPyObjects(a["segmentation"], *a["segmentation"]["size"])
        ma, mb = pycocotools_mask.decode(rle), pycocotools_mask.decode(b["segmentation"])
        assert ma.shape == mb.shape and (ma == mb).all() and a["area"] == int(ma.sum())
        if "keypoints" in b:
            assert np.abs(np.array(a["keypoints"]) - b["keypoints"]).max() < 8.0
        else:
            assert "keypoints" not in a
