"""torchvision's Mask R-CNN and Keypoint R-CNN as an outside reference, run by a torch interpreter.

This file imports torch, torchvision and numpy only, never mxnet or mxmask: mxmask runs it as a
program in a separate Python that has torch (``--torch-python``, ``MXMASK_TORCH_PYTHON``), so that
neither environment needs the other's packages. Each verb reads and writes plain files:

    build   --arch A --seed S --out M.pth         seeded random weights, saved (:func:`randomise`)
    run     --arch A --weights M.pth --input X.npy --image-size H W --out OUT.npz
                                                  the stages on a tensor (:func:`run_stages`)
    predict --arch A --weights M.pth --image FILE --out OUT.npz
                                                  the model on an image file (:func:`predict_file`)
    time    --arch A [--inputs X.npz] [--train] [--dtype D] ...
                                                  speed, one JSON line on stdout (:func:`time_verb`)
    losses  --arch A --weights M.pth --input IN.npz --out OUT.npz
                                                  one training step's losses (:func:`losses_verb`)

``A`` is ``maskrcnn_resnet50_fpn`` (91 classes) or ``keypointrcnn_resnet50_fpn`` (2 classes, 17
keypoints), built as torchvision's builders build them for pretrained weights
(:func:`build_model`); ``--score-thresh`` and ``--detections`` set ``box_score_thresh`` and
``box_detections_per_img``.
"""
import argparse
import os
import sys

# run as a program, this file's folder is first on sys.path, and mxmask's own converter module
# there (torchvision.py) would shadow the torchvision package
sys.path[:] = [p for p in sys.path
               if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from torchvision.models.detection import KeypointRCNN, MaskRCNN  # noqa: E402
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor  # noqa: E402
from torchvision.models.detection.image_list import ImageList  # noqa: E402
from torchvision.ops import misc as misc_ops  # noqa: E402

# the --arch values
ARCHS = ("maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn")


def build_model(arch, score_thresh=0.05, detections=100):
    """torchvision's ``arch`` with its default initialisation, in eval mode.

    Built as torchvision's builders build it for pretrained weights: a ResNet-50 with
    FrozenBatchNorm2d and three trainable stages, FPN, and the arch's heads.

    Args:
        arch: one of :data:`ARCHS`.
        score_thresh, detections: ``box_score_thresh`` and ``box_detections_per_img``.

    Returns:
        the ``MaskRCNN`` or ``KeypointRCNN`` module.
    """
    body = torchvision.models.resnet50(weights=None, norm_layer=misc_ops.FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(body, 3)
    kwargs = dict(box_score_thresh=score_thresh, box_detections_per_img=detections)
    if arch == "maskrcnn_resnet50_fpn":
        model = MaskRCNN(backbone, num_classes=91, **kwargs)
    elif arch == "keypointrcnn_resnet50_fpn":
        model = KeypointRCNN(backbone, num_classes=2, num_keypoints=17, **kwargs)
    else:
        raise SystemExit("unknown arch %r (expected one of %s)" % (arch, ", ".join(ARCHS)))
    return model.eval()


def randomise(model, arch, seed):
    """Seeded random weights for a comparison (the ``build`` verb saves the result's
    ``state_dict`` with ``torch.save``, what ``mxmask convert torchvision`` reads).

    torchvision's own initialisation under ``torch.manual_seed(seed)``, then random
    FrozenBatchNorm statistics and affine, non-zero biases, and the class and mask prediction
    layers scaled (:data:`SPREAD`) so that scores and mask probabilities spread out (near-equal
    scores would compare nothing).

    Args:
        model: :func:`build_model`'s network.
        arch: its arch.
        seed: the seed.

    Returns:
        ``model``, its weights replaced.
    """
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters") and not isinstance(module, misc_ops.FrozenBatchNorm2d):
            module.reset_parameters()
    gen = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in state.items():
            shape = tensor.shape
            if name.endswith("running_mean"):
                tensor.copy_(torch.randn(shape, generator=gen) * 0.1)
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(shape, generator=gen) * 1.5 + 0.5)
            elif name.startswith("backbone.body.") and tensor.dim() == 1 and name.endswith("weight"):
                tensor.copy_(torch.rand(shape, generator=gen) + 0.5)
            elif tensor.dim() == 1:                                       # biases, BN beta
                tensor.copy_(torch.randn(shape, generator=gen) * 0.01)
        for key, factor in SPREAD[arch].items():
            state[key] *= factor
        bias = state["roi_heads.box_predictor.cls_score.bias"]
        bias.copy_(torch.randn(bias.shape, generator=gen))
    model.load_state_dict(state)
    return model


# prediction layers scaled so that class scores, mask probabilities and keypoint heatmaps
# spread out (a two-class box head needs less to spread than a 91-class one)
SPREAD = {"maskrcnn_resnet50_fpn": {"rpn.head.cls_logits.weight": 30.0,
                                    "roi_heads.box_predictor.cls_score.weight": 300.0,
                                    "roi_heads.mask_predictor.mask_fcn_logits.weight": 2000.0},
          "keypointrcnn_resnet50_fpn": {"rpn.head.cls_logits.weight": 30.0,
                                        "roi_heads.box_predictor.cls_score.weight": 30.0,
                                        "roi_heads.keypoint_predictor.kps_score_lowres.weight": 300.0}}


def load(arch, weights, score_thresh, detections):
    """:func:`build_model` with the state dict of the file ``weights``."""
    model = build_model(arch, score_thresh, detections)
    model.load_state_dict(torch.load(weights, map_location="cpu"))
    return model


def _hook(module, store, key):
    """Record a copy of ``module``'s output in ``store[key]`` at each forward."""
    module.register_forward_hook(lambda m, i, o: store.__setitem__(key, o.detach().clone()))


@torch.no_grad()
def run_stages(model, x, image_size):
    """The network stages on a normalised tensor (the ``run`` verb).

    Args:
        model: the network, eval mode.
        x: (1, 3, Hp, Wp) normalised, padded input tensor.
        image_size: (H, W), its valid part.

    Returns:
        dict of numpy arrays: the FPN features ``p2``..``p6``, ``proposals`` (P, 4), and the
        detections ``boxes`` (N, 4), ``labels``, ``scores`` (network-input pixels), then
        ``mask_probs`` (N, 28, 28) of the label, or ``keypoints`` (N, K, 3) decoded,
        ``keypoints_scores`` and ``keypoint_logits`` (N, K, 56, 56).
    """
    out, seen = {}, {}
    if model.roi_heads.has_keypoint():
        _hook(model.roi_heads.keypoint_predictor, seen, "keypoint_logits")
    images = ImageList(x, [tuple(image_size)])
    features = model.backbone(x)
    for key, name in zip(["0", "1", "2", "3", "pool"], ["p2", "p3", "p4", "p5", "p6"]):
        out[name] = features[key]
    proposals, _ = model.rpn(images, features)
    out["proposals"] = proposals[0]
    detections, _ = model.roi_heads(features, proposals, images.image_sizes)
    det = detections[0]
    for key in ("boxes", "labels", "scores", "keypoints", "keypoints_scores"):
        if key in det:
            out[key] = det[key]
    if "masks" in det:
        out["mask_probs"] = det["masks"][:, 0]
    out.update(seen)
    return {k: v.numpy() for k, v in out.items()}


@torch.no_grad()
def predict_file(model, path):
    """The whole model on an image file, as torchvision's references run it (the ``predict``
    verb).

    Args:
        model: the network, eval mode.
        path: the image, read with PIL as RGB in [0, 1].

    Returns:
        dict of numpy arrays: ``input`` (the transform's padded tensor), ``image_size``, and
        the detections in image pixels (``boxes``, ``labels``, ``scores``, ``keypoints``,
        ``keypoints_scores``), with ``masks`` the pasted (N, H, W) probabilities.
    """
    from PIL import Image
    image = Image.open(path).convert("RGB")
    tensor = torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1)
    images, _ = model.transform([tensor])
    det = model([tensor])[0]
    out = {"input": images.tensors.numpy(), "image_size": np.array(images.image_sizes[0])}
    for key in ("boxes", "labels", "scores", "keypoints", "keypoints_scores"):
        if key in det:
            out[key] = det[key].numpy()
    if "masks" in det:
        out["masks"] = det["masks"][:, 0].numpy()
    return out


# --------------------------------------------------------------------------------------------
# time: torchvision's speed (the torch side of ``mxmask bench --against torchvision``)
# --------------------------------------------------------------------------------------------
# the roi counts the keypoint head is timed on, as mxmask's bench times its own
TIME_KEYPOINT_ROIS = (10, 100)
# FLOP counter modules -> the stage names of the record (torch's ModuleTracker names a module by
# its path from the outermost module called, here the model's children)
TIME_GMAC_GROUPS = {"backbone+fpn": ("BackboneWithFPN",), "rpn": ("RegionProposalNetwork",),
                    "box_head": ("RoIHeads.box_head", "RoIHeads.box_predictor"),
                    "mask_head": ("RoIHeads.mask_head", "RoIHeads.mask_predictor"),
                    "keypoint_head": ("RoIHeads.keypoint_head", "RoIHeads.keypoint_predictor")}


def time_inputs(arch, size=(800, 1344), batch=1, train_size=None, objects=2, seed=0):
    """The ``time`` verb's own inputs, when it is not given any (``mxmask bench`` passes it the
    arrays it times mxmask on).

    Args:
        arch: one of :data:`ARCHS`.
        size: (H, W) of the inference input.
        batch: images per forward / training step.
        train_size: (h, w) of the training batch; None: no training arrays.
        objects: gt instances per training image.
        seed: numpy seed.

    Returns:
        dict of numpy arrays: ``data`` (batch, 3, H, W) normal(0, 1) (a normalised image); with
        ``train_size`` ``train_data`` (batch, 3, h, w), ``gt_boxes`` (batch, objects, 4) xyxy of
        0.2 to 0.5 of the image side, ``gt_labels`` (batch, objects) 0 (mxmask's first class,
        torchvision's label 1), ``gt_masks`` (batch, objects, h, w) the boxes filled with 1,
        ``gt_keypoints`` (batch, objects, 17, 3) visible points inside the boxes; for the
        keypoint arch ``keypoint_boxes_N`` (1, N, 4) for N in :data:`TIME_KEYPOINT_ROIS`.
    """
    rng = np.random.RandomState(seed)
    h, w = size
    out = {"data": rng.normal(0, 1, (batch, 3, h, w)).astype(np.float32)}

    def boxes(count, bh, bw):
        sw, sh = rng.uniform(0.2, 0.5, count) * bw, rng.uniform(0.2, 0.5, count) * bh
        x1, y1 = rng.uniform(0, bw - sw), rng.uniform(0, bh - sh)
        return np.stack([x1, y1, x1 + sw, y1 + sh], axis=1).astype(np.float32)
    if train_size is not None:
        th, tw = train_size
        gt = np.stack([boxes(objects, th, tw) for _ in range(batch)])
        masks = np.zeros((batch, objects, th, tw), np.float32)
        kps = np.zeros((batch, objects, 17, 3), np.float32)
        for b in range(batch):
            for j, (x1, y1, x2, y2) in enumerate(gt[b]):
                masks[b, j, int(y1):int(y2), int(x1):int(x2)] = 1
                kps[b, j, :, 0] = rng.uniform(x1, x2, 17)
                kps[b, j, :, 1] = rng.uniform(y1, y2, 17)
                kps[b, j, :, 2] = 2
        out.update(train_data=rng.normal(0, 1, (batch, 3, th, tw)).astype(np.float32),
                   gt_boxes=gt, gt_labels=np.zeros((batch, objects), np.float32),
                   gt_masks=masks, gt_keypoints=kps)
    if arch == "keypointrcnn_resnet50_fpn":
        for count in TIME_KEYPOINT_ROIS:
            out["keypoint_boxes_%d" % count] = boxes(count, h, w)[None]
    return out


def _time_runs(fn, runs, warmup):
    """``fn()`` ``warmup`` times untimed, then ``runs`` times timed: (last output, seconds)."""
    import time
    for _ in range(warmup):
        fn()
    times, out = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, times


def _time_precision(dtype):
    """``(memory format, autocast context factory)`` of a ``time`` precision: ``float32``
    contiguous without autocast; ``bfloat16`` channels_last under bf16 autocast."""
    import contextlib
    if dtype not in ("float32", "bfloat16"):
        raise SystemExit("--dtype %s: expected float32 or bfloat16" % dtype)
    if dtype == "bfloat16":
        return torch.channels_last, lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return torch.contiguous_format, contextlib.nullcontext


def _time_stats(times):
    """``{"median", "min", "max"}`` seconds."""
    return {"median": float(np.median(times)), "min": float(min(times)), "max": float(max(times))}


def _time_targets(inputs, arch):
    """mxmask's training-batch arrays -> torchvision's list of target dicts (rows with label
    < 0 are padding and dropped; mxmask's label ``l`` is torchvision's ``l + 1``)."""
    targets = []
    for b in range(len(inputs["gt_boxes"])):
        keep = inputs["gt_labels"][b] >= 0
        target = {"boxes": torch.from_numpy(inputs["gt_boxes"][b][keep].astype(np.float32)),
                  "labels": torch.from_numpy(inputs["gt_labels"][b][keep].astype(np.int64) + 1)}
        if arch == "maskrcnn_resnet50_fpn":
            target["masks"] = torch.from_numpy((inputs["gt_masks"][b][keep] > 0.5)
                                               .astype(np.uint8))
        else:
            kps = inputs["gt_keypoints"][b][keep].astype(np.float32)
            if kps.shape[1] != 17:
                raise SystemExit("gt_keypoints has %d keypoints per instance; %s has 17"
                                 % (kps.shape[1], arch))
            target["keypoints"] = torch.from_numpy(kps)
        targets.append(target)
    return targets


def count_gmac(model, x, image_sizes):
    """Multiply-accumulates (GMAC) of one inference pass (torch's FLOP counter: convolutions,
    transposed convolutions and matrix products; FLOP / 2): ``(total, {stage: GMAC})`` with the
    stages of :data:`TIME_GMAC_GROUPS` (and ``other`` for anything outside them)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        features = model.backbone(x)
        proposals, _ = model.rpn(ImageList(x, image_sizes), features)
        model.roi_heads(features, proposals, image_sizes)
    by_module = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    total = counter.get_total_flops()
    stages = {}
    for stage, modules in TIME_GMAC_GROUPS.items():
        if any(m in by_module for m in modules):
            stages[stage] = sum(by_module.get(m, 0) for m in modules) / 2e9
    other = total / 2e9 - sum(stages.values())
    if other > 1e-9:
        stages["other"] = other
    return total / 2e9, stages


def time_model(arch, inputs, dtype="float32", runs=5, warmup=2, train=False, score_thresh=0.0,
               detections=100, seed=0, train_dtype=None):
    """torchvision's inference (and training step) speed, in this process.

    The network is timed on the normalised, padded input tensor through ``model.backbone``,
    ``model.rpn`` and ``model.roi_heads``, the internals :func:`run_stages` calls:
    GeneralizedRCNNTransform's normalisation, resize and batching are never run (mxmask's
    network is also timed on a normalised tensor), and its ``postprocess`` (boxes to the image
    size, masks pasted into the image, keypoints rescaled; no RLE) is timed as the paste stage.

    Args:
        arch: one of :data:`ARCHS`; the model is :func:`build_model` + :func:`randomise`.
        inputs: arrays as :func:`time_inputs` returns them (``train_*`` / ``gt_*`` needed only
            with ``train``; ``keypoint_boxes_N`` only for the keypoint arch).
        dtype: ``float32``, or ``bfloat16``: torchvision's best CPU setting, the model and input
            in channels_last memory format and everything run under
            ``torch.autocast("cpu", dtype=torch.bfloat16)`` (the backward outside it, as
            torch's AMP recipe does).
        runs, warmup: timed and untimed runs of each figure (the training step warms up at
            least once).
        train: also time a training step: forward with the targets, backward, and an SGD
            update (lr 1e-4, momentum 0.9, weight decay 1e-4, as mxmask's bench step) of the
            trainable parameters.
        score_thresh, detections: ``box_score_thresh`` and ``box_detections_per_img`` (0.0 and
            100: the mask / keypoint head sees 100 boxes, as mxmask's heads see
            ``test.max_dets``).
        seed: :func:`randomise`'s seed.
        train_dtype: the training step's precision as ``dtype`` (None: ``dtype``; mxmask's
            bench passes the precision its own step's convolutions resolved to).

    Returns:
        dict: ``settings``; ``network_s``, ``paste_s``, ``total_s`` (per run network + paste):
        each ``{"median", "min", "max"}`` seconds; ``detections_per_image``; ``gmac`` and
        ``gmac_stages`` (:func:`count_gmac`); for the keypoint arch ``keypoint_head_per_rois``
        ``{"10": stats, "100": stats}`` (RoIAlign + keypoint head + predictor on exactly N
        boxes of the first image) and ``keypoint_head_gmac_per_rois``; with ``train``
        ``train_step_s`` and ``train_images_per_s``.
    """
    fmt, precision = _time_precision(dtype)
    train_dtype = train_dtype or dtype
    train_fmt, train_precision = _time_precision(train_dtype)
    model = randomise(build_model(arch, score_thresh, detections), arch, seed)
    x = torch.from_numpy(np.ascontiguousarray(inputs["data"], np.float32))
    batch, _, h, w = x.shape
    sizes = [(h, w)] * batch
    gmac, gmac_stages = count_gmac(model, x, sizes)
    model = model.to(memory_format=fmt)
    x = x.contiguous(memory_format=fmt)
    images = ImageList(x, sizes)

    def network():
        with torch.inference_mode(), precision():
            features = model.backbone(x)
            proposals, _ = model.rpn(images, features)
            dets, _ = model.roi_heads(features, proposals, sizes)
        return features, dets
    (features, dets), network_times = _time_runs(network, runs, warmup)

    def paste():
        with torch.inference_mode(), precision():       # postprocess replaces the dicts' values
            return model.transform.postprocess([dict(d) for d in dets], sizes, sizes)
    _, paste_times = _time_runs(paste, runs, 1)
    record = {"network_s": _time_stats(network_times), "paste_s": _time_stats(paste_times),
              "total_s": _time_stats([a + b for a, b in zip(network_times, paste_times)]),
              "detections_per_image": sum(len(d["boxes"]) for d in dets) / float(batch),
              "gmac": gmac, "gmac_stages": gmac_stages}

    heads = model.roi_heads
    if heads.has_keypoint():
        first = {k: v[:1] for k, v in features.items()}
        per_rois, gmac_rois = {}, {}
        for count in TIME_KEYPOINT_ROIS:
            boxes = torch.from_numpy(inputs["keypoint_boxes_%d" % count][0].astype(np.float32))

            def keypoint_head():
                with torch.inference_mode(), precision():
                    pooled = heads.keypoint_roi_pool(first, [boxes], sizes[:1])
                    return heads.keypoint_predictor(heads.keypoint_head(pooled))
            _, times = _time_runs(keypoint_head, runs, warmup)
            per_rois[str(count)] = _time_stats(times)
            from torch.utils.flop_counter import FlopCounterMode
            with FlopCounterMode(display=False) as counter:
                keypoint_head()
            gmac_rois[str(count)] = counter.get_total_flops() / 2e9
        record.update(keypoint_head_per_rois=per_rois, keypoint_head_gmac_per_rois=gmac_rois)
    del features, dets

    train_size = train_note = None
    if train:
        missing = [k for k in ("train_data", "gt_boxes", "gt_labels",
                               "gt_masks" if heads.has_mask() else "gt_keypoints")
                   if k not in inputs]
        if missing:
            raise SystemExit("--train: the inputs have no %s" % ", ".join(missing))
        tx = torch.from_numpy(np.ascontiguousarray(inputs["train_data"], np.float32))
        model = model.to(memory_format=train_fmt)
        tx = tx.contiguous(memory_format=train_fmt)
        train_sizes = [tuple(tx.shape[2:])] * tx.shape[0]
        train_images = ImageList(tx, train_sizes)
        targets = _time_targets(inputs, arch)
        if train_fmt == torch.channels_last and heads.has_keypoint():
            # keypointrcnn_loss views the logits as (N * K, H * W), which a channels_last
            # tensor refuses: the predictor's output is copied to the contiguous format
            heads.keypoint_predictor.register_forward_hook(lambda m, i, out: out.contiguous())
            train_note = "keypoint logits made contiguous for keypointrcnn_loss"
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with train_precision():
                features = model.backbone(tx)
                proposals, rpn_losses = model.rpn(train_images, features, targets)
                _, head_losses = model.roi_heads(features, proposals, train_sizes, targets)
                loss = sum(rpn_losses.values()) + sum(head_losses.values())
            loss.backward()
            optimizer.step()
            return float(loss.detach())
        _, times = _time_runs(step, runs, max(1, warmup))
        model.eval()
        record.update(train_step_s=_time_stats(times),
                      train_images_per_s=tx.shape[0] / float(np.median(times)))
        train_size = "%dx%d" % train_sizes[0]
    bf16 = dtype == "bfloat16"
    record["settings"] = {
        "arch": arch, "torch": torch.__version__, "torchvision": torchvision.__version__,
        "threads": torch.get_num_threads(), "dtype": dtype,
        "autocast": "bfloat16" if bf16 else None,
        "memory_format": "channels_last" if bf16 else "contiguous",
        "train_dtype": train_dtype if train else None,
        "size": "%dx%d" % (h, w), "batch": batch, "runs": runs, "warmup": warmup,
        "box_score_thresh": heads.score_thresh, "box_detections_per_img": heads.detections_per_img,
        "rpn_post_nms_top_n_test": model.rpn._post_nms_top_n["testing"],
        "input": "normalised padded tensor through backbone, rpn, roi_heads "
                 "(GeneralizedRCNNTransform bypassed; its postprocess is the paste)",
        "train_size": train_size, "train_note": train_note}
    return record


def add_time_arguments(p):
    """The ``time`` verb's options on the argparse subparser ``p``: ``--inputs X.npz`` (or
    ``--size H W --train-size H W`` for its own inputs), ``--train``, ``--dtype``,
    ``--train-dtype``, ``--runs``, ``--warmup``, ``--threads``; ``--score-thresh`` and
    ``--detections`` default to 0.0 and 100, so the heads see 100 boxes."""
    p.add_argument("--arch", choices=ARCHS, required=True)
    p.add_argument("--inputs", help="npz of the arrays time_inputs makes (mxmask bench writes "
                                    "its own); without it they are made at --size / --train-size")
    p.add_argument("--size", type=int, nargs=2, default=(800, 1344), metavar=("H", "W"))
    p.add_argument("--train-size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--train", action="store_true", help="also time a training step")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16: autocast(cpu, bfloat16) with channels_last")
    p.add_argument("--train-dtype", choices=("float32", "bfloat16"),
                   help="the training step's precision (default: --dtype)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--score-thresh", type=float, default=0.0)
    p.add_argument("--detections", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's)")


def time_verb(args):
    """The ``time`` verb: torchvision's speed on seeded random weights (``mxmask bench
    --against torchvision``): :func:`time_model` on ``--inputs`` or :func:`time_inputs`; prints
    the record as one JSON line on stdout. Returns the exit code."""
    import json
    if args.runs < 1 or args.warmup < 0:
        raise SystemExit("--runs must be at least 1 and --warmup at least 0")
    if args.inputs:
        with np.load(args.inputs) as f:
            inputs = {k: f[k] for k in f.files}
    else:
        inputs = time_inputs(args.arch, tuple(args.size), args.batch,
                             tuple(args.train_size) if args.train else None, seed=args.seed)
    record = time_model(args.arch, inputs, args.dtype, args.runs, args.warmup, args.train,
                        args.score_thresh, args.detections, args.seed, args.train_dtype)
    print(json.dumps(record))
    return 0


# --------------------------------------------------------------------------------------------
# losses: torchvision's training losses (the torch side of tests/test_torchvision_training.py)
# --------------------------------------------------------------------------------------------
# A sampler batch size no image reaches: BalancedPositiveNegativeSampler then keeps every
# candidate (see training_losses)
TAKE_ALL = 1 << 30


def loss_targets(arrays):
    """The ``losses`` verb's npz arrays -> (x (B, 3, Hp, Wp) tensor, [(h, w)] * B, targets).

    Args:
        arrays: dict of numpy arrays: ``x`` (B, 3, Hp, Wp) the normalised, padded input;
            ``image_size`` (B, 2) valid (h, w) of each image; ``boxes`` (B, G, 4) xyxy in
            network-input pixels; ``labels`` (B, G) in torchvision's label space (1.. for the
            classes), rows with a label < 0 are padding and dropped; ``masks`` (B, G, Hp, Wp)
            uint8 (mask arch) or ``keypoints`` (B, G, 17, 3) (x, y, v) (keypoint arch). One
            image may also come without the batch axis: ``image_size`` (2,), ``boxes`` (G, 4),
            ``labels`` (G,), ``masks`` (G, Hp, Wp), ``keypoints`` (G, 17, 3).

    Returns:
        the input tensor, the image sizes and one target dict per image as torchvision's
        training takes them: ``boxes`` float32, ``labels`` int64, ``masks`` uint8 cut to the
        image's valid (h, w) (GeneralizedRCNNTransform resizes the masks with the image and
        pads only the image), ``keypoints`` float32.
    """
    arrays = dict(arrays)
    if np.ndim(arrays["image_size"]) == 1:
        arrays = {k: (v if k == "x" else np.asarray(v)[None]) for k, v in arrays.items()}
    x = torch.from_numpy(np.ascontiguousarray(arrays["x"], np.float32))
    sizes = [(int(h), int(w)) for h, w in arrays["image_size"]]
    targets = []
    for b, (h, w) in enumerate(sizes):
        keep = np.asarray(arrays["labels"][b]) >= 0
        target = {"boxes": torch.from_numpy(arrays["boxes"][b][keep].astype(np.float32)),
                  "labels": torch.from_numpy(arrays["labels"][b][keep].astype(np.int64))}
        if "masks" in arrays:
            target["masks"] = torch.from_numpy(np.ascontiguousarray(
                arrays["masks"][b][keep][:, :h, :w], np.uint8))
        if "keypoints" in arrays:
            target["keypoints"] = torch.from_numpy(arrays["keypoints"][b][keep].astype(np.float32))
        targets.append(target)
    return x, sizes, targets


@torch.no_grad()
def training_losses(model, x, image_sizes, targets):
    """torchvision's loss dict of one training step, with deterministic samplers, and the mask
    or keypoint targets its loss was computed on.

    The model runs in training mode (``model.train()``: the RPN keeps its training
    ``pre_nms_top_n`` / ``post_nms_top_n`` of 2000, ``roi_heads`` samples rois, adds the gt boxes
    to the proposals and returns losses; FrozenBatchNorm2d has no training behaviour) through
    ``model.backbone``, ``model.rpn`` and ``model.roi_heads`` on the normalised, padded tensor,
    as :func:`run_stages` does: GeneralizedRCNNTransform (normalisation, resize, batching) is not
    run, and the targets are already in network-input pixels.

    Determinism: both ``BalancedPositiveNegativeSampler`` s (the RPN's anchors, the roi heads'
    proposals) are replaced by ones of ``batch_size_per_image = TAKE_ALL``. Such a sampler keeps
    ``num_pos = min(#positives, int(TAKE_ALL * positive_fraction))`` = every positive and
    ``num_neg = min(#negatives, TAKE_ALL - num_pos)`` = every negative, so ``randperm(n)[:n]``
    is a permutation of all n candidates and the 0/1 masks it writes, hence ``compute_loss``'s
    and ``subsample``'s ``torch.where`` index lists, do not depend on the random permutation:
    the sampled sets are "every anchor of label 0 or 1" and "every proposal or gt box of label
    >= 0", which another implementation can take exactly. The losses are torchvision's
    unchanged functions on those sets (the normalisers become the numbers of candidates).

    The head targets are recorded by wrapping ``roi_heads.maskrcnn_loss`` /
    ``keypointrcnn_loss`` (module attributes that ``RoIHeads.forward`` looks up at each call)
    for the duration of the step: the wrapper computes ``project_masks_on_boxes`` /
    ``keypoints_to_heatmap`` on the loss's own inputs, as the loss does, then calls the loss.

    Args:
        model: :func:`build_model`'s network with its weights loaded.
        x: (B, 3, Hp, Wp) float32 tensor.
        image_sizes: [(h, w)] valid size of each image.
        targets: one dict per image (:func:`loss_targets`).

    Returns:
        dict: floats ``loss_objectness``, ``loss_rpn_box_reg``, ``loss_classifier``,
        ``loss_box_reg`` and ``loss_mask`` or ``loss_keypoint``; the sampled counts over the
        batch ``rpn_positives``, ``rpn_negatives``, ``roi_positives``, ``roi_negatives``;
        ``proposals`` (B,) the RPN's proposals per image (before the gt boxes are added); and
        over the N positive rois the heads train on, image by image: ``head_image`` (N,),
        ``head_rois`` (N, 4), ``head_labels`` (N,), then ``mask_targets`` (N, M, M) or
        ``keypoint_heatmaps`` (N, K) (index y * S + x) and ``keypoint_valid`` (N, K).
    """
    from torchvision.models.detection import roi_heads as tv_heads
    from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
    counts, seen = {}, {}

    def counting(sampler, key):
        def sample(matched_idxs):
            pos, neg = sampler(matched_idxs)
            counts[key + "_positives"] = sum(int(p.sum()) for p in pos)
            counts[key + "_negatives"] = sum(int(n.sum()) for n in neg)
            return pos, neg
        return sample

    def record_rois(proposals, labels):
        seen["head_image"] = torch.cat([torch.full((len(p),), b) for b, p in enumerate(proposals)])
        seen["head_rois"] = torch.cat(proposals)
        seen["head_labels"] = torch.cat(labels)

    real_mask_loss, real_keypoint_loss = tv_heads.maskrcnn_loss, tv_heads.keypointrcnn_loss

    def mask_loss(mask_logits, proposals, gt_masks, gt_labels, matched_idxs):
        size = mask_logits.shape[-1]
        record_rois(proposals, [l[i] for l, i in zip(gt_labels, matched_idxs)])
        seen["mask_targets"] = torch.cat([tv_heads.project_masks_on_boxes(m, p, i, size)
                                          for m, p, i in zip(gt_masks, proposals, matched_idxs)])
        return real_mask_loss(mask_logits, proposals, gt_masks, gt_labels, matched_idxs)

    def keypoint_loss(keypoint_logits, proposals, gt_keypoints, matched_idxs):
        size = keypoint_logits.shape[-1]
        record_rois(proposals, [torch.ones(len(i), dtype=torch.int64) for i in matched_idxs])
        heat = [tv_heads.keypoints_to_heatmap(k[i], p, size)
                for p, k, i in zip(proposals, gt_keypoints, matched_idxs)]
        seen["keypoint_heatmaps"] = torch.cat([h for h, _ in heat])
        seen["keypoint_valid"] = torch.cat([v for _, v in heat])
        return real_keypoint_loss(keypoint_logits, proposals, gt_keypoints, matched_idxs)

    model.train()
    saved = []
    tv_heads.maskrcnn_loss, tv_heads.keypointrcnn_loss = mask_loss, keypoint_loss
    try:
        for owner, key in ((model.rpn, "rpn"), (model.roi_heads, "roi")):
            saved.append((owner, owner.fg_bg_sampler))
            owner.fg_bg_sampler = counting(BalancedPositiveNegativeSampler(
                TAKE_ALL, owner.fg_bg_sampler.positive_fraction), key)
        images = ImageList(x, list(image_sizes))
        features = model.backbone(x)
        proposals, losses = model.rpn(images, features, targets)
        _, head_losses = model.roi_heads(features, proposals, images.image_sizes, targets)
    finally:
        tv_heads.maskrcnn_loss, tv_heads.keypointrcnn_loss = real_mask_loss, real_keypoint_loss
        for owner, sampler in saved:
            owner.fg_bg_sampler = sampler
        model.eval()
    losses.update(head_losses)
    out = {name: float(value) for name, value in losses.items()}
    out.update(counts)
    out["proposals"] = [len(p) for p in proposals]
    out.update({k: v.numpy() for k, v in seen.items()})
    return out


def losses_verb(args):
    """The ``losses`` verb: torchvision's training losses of one step on the normalised, padded
    tensor of ``--input`` (:func:`loss_targets` gives its layout), with both samplers taking
    every candidate, so that the result is deterministic (:func:`training_losses`). Saved to
    ``--out``: the losses and counts as 0-d arrays, ``proposals`` (B,), and the positive rois
    the heads train on with their mask or keypoint targets. Returns the exit code."""
    model = load(args.arch, args.weights, 0.05, 100)
    with np.load(args.input) as f:
        x, sizes, targets = loss_targets({k: f[k] for k in f.files})
    key = "masks" if args.arch == "maskrcnn_resnet50_fpn" else "keypoints"
    if any(key not in t for t in targets):
        raise SystemExit("%s: %s needs %s" % (args.input, args.arch, key))
    out = training_losses(model, x, sizes, targets)
    np.savez(args.out, **{k: np.asarray(v) for k, v in out.items()})
    return 0


def main(argv=None):
    """The program: parses the verb and its options (``--threads``: ``torch.set_num_threads``)
    and runs it. Returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    for verb in ("build", "run", "predict"):
        p = sub.add_parser(verb)
        p.add_argument("--arch", choices=ARCHS, required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--score-thresh", type=float, default=0.05)
        p.add_argument("--detections", type=int, default=100)
        p.add_argument("--threads", type=int, default=0)
        if verb == "build":
            p.add_argument("--seed", type=int, default=0)
        else:
            p.add_argument("--weights", required=True)
        if verb == "run":
            p.add_argument("--input", required=True)
            p.add_argument("--image-size", type=int, nargs=2, required=True)
        if verb == "predict":
            p.add_argument("--image", required=True)
    add_time_arguments(sub.add_parser("time"))
    p = sub.add_parser("losses")
    p.add_argument("--arch", choices=ARCHS, required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.verb == "time":
        return time_verb(args)
    if args.verb == "losses":
        return losses_verb(args)
    if args.verb == "build":
        model = randomise(build_model(args.arch, args.score_thresh, args.detections), args.arch,
                          args.seed)
        torch.save(model.state_dict(), args.out)
        return 0
    model = load(args.arch, args.weights, args.score_thresh, args.detections)
    if args.verb == "run":
        x = torch.from_numpy(np.load(args.input).astype(np.float32))
        np.savez(args.out, **run_stages(model, x, args.image_size))
    else:
        np.savez(args.out, **predict_file(model, args.image))
    return 0


if __name__ == "__main__":
    sys.exit(main())
