"""What several test modules share; test modules import from here, never from each other.

- :mod:`helpers.export_script`: scripts/predict_exported.py run on an export, and the
  comparison of its entries with mxmask's.
- :mod:`helpers.numpy_reference`: numpy GroupNorm and RoIAlign (MXNet's sampling rules).
- :mod:`helpers.tiny`: the tiny checkpoint on the synthetic dataset (conftest's session fixture)
  and the tiny model `mxmask train` runs in the trainer, resume and distributed tests.
- :mod:`helpers.torch_files`: a writer of ``torch.save``'s zip format with the standard library
  and numpy, for the converter tests (CI has no torch).
"""
