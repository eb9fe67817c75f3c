"""Shared pytest fixtures.

``shapes_dataset``: the out dir (str) of a small synthetic shapes dataset generated once per
session (8 train / 4 val images at size 128, seed 0): ``images/{train,val}/*.png`` and
``annotations/{train,val}.json``.

``ckpt``: a random-init tiny shapes checkpoint (tests/helpers/tiny.py) in a temporary folder,
built once per test module (a module may define its own ``ckpt`` instead).
"""
import mxmask  # noqa: F401  (first, so that its OpenMP thread setting precedes `import mxnet`)
import pytest


@pytest.fixture(scope="session")
def shapes_dataset(tmp_path_factory):
    from mxmask.data.shapes import generate_shapes

    out_dir = str(tmp_path_factory.mktemp("shapes_dataset"))
    generate_shapes(out_dir, num_train=8, num_val=4, size=128, seed=0)
    return out_dir


@pytest.fixture(scope="module")
def ckpt(shapes_dataset, tmp_path_factory):
    from helpers.tiny import build_tiny_checkpoint

    out = str(tmp_path_factory.mktemp("tiny_ckpt"))
    build_tiny_checkpoint(shapes_dataset, out)
    return out
