"""Converters from other frameworks' weight files into mxmask checkpoint folders.

- :mod:`mxmask.convert.gluoncv`: GluonCV ``mask_rcnn_fpn_resnet50_v1b_coco`` parameters (a file
  written by GluonCV's ``net.save_parameters``) -> a checkpoint folder of preset
  ``gluoncv_mask_rcnn_r50_fpn`` (``mxmask convert gluoncv SRC.params --out CKPT``).
- :mod:`mxmask.convert.torchvision`: a torchvision ``maskrcnn_resnet50_fpn`` or
  ``keypointrcnn_resnet50_fpn`` state dict (``torch.save``) -> a checkpoint folder of preset
  ``torchvision_mask_rcnn_r50_fpn`` / ``torchvision_keypoint_rcnn_r50_fpn`` (``mxmask convert
  torchvision SRC.pth --out CKPT [--arch A]``), read by :mod:`mxmask.convert.torch_file` without
  torch.
- :mod:`mxmask.convert.common`: what they share (COCO tables, the mismatch report, the
  checkpoint writer, ``import_gluoncv``).

A converted folder is an ordinary checkpoint (``config.yaml``, ``model.params``,
``progress.json`` with ``iter`` 0 and the ``source`` file), so ``mxmask predict``, ``eval`` and
``export`` take it as they take a trained run.
"""
