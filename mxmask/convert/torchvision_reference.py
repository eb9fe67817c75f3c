"""torchvision's Mask R-CNN and Keypoint R-CNN as an outside reference, run by a torch interpreter.

This file imports torch, torchvision and numpy only, never mxnet or mxmask: mxmask runs it as a
program in a separate Python that has torch (``--torch-python``, ``MXMASK_TORCH_PYTHON``), so that
neither environment needs the other's packages. Each verb reads and writes plain files:

    build   --arch A --seed S --out M.pth
            torchvision's network A with seeded random weights, random FrozenBatchNorm
            statistics and prediction layers scaled so that scores and mask probabilities spread
            out; its ``state_dict`` saved with ``torch.save`` (what ``mxmask convert torchvision``
            reads).
    run     --arch A --weights M.pth --input X.npy --image-size H W --out OUT.npz
            the stages on a normalised, padded input tensor X (1, 3, Hp, Wp) whose valid part is
            H x W: FPN features ``p2``..``p6``, ``proposals``, and the detections ``boxes``,
            ``labels``, ``scores`` (network-input pixels), ``mask_probs`` (N, 28, 28) of the
            label, or ``keypoints`` (N, K, 3) decoded and ``keypoint_logits`` (N, K, 56, 56).
    predict --arch A --weights M.pth --image FILE --out OUT.npz
            the whole model on an image file read with PIL, as torchvision's references do:
            ``input`` (the transform's padded tensor), ``image_size``, and the detections in
            image pixels, with ``masks`` pasted (N, H, W) probabilities.
    losses  --arch A --weights M.pth --input IN.npz --out OUT.npz
            torchvision's training losses of one step on the normalised, padded tensor ``x``
            (B, 3, Hp, Wp) of IN.npz, its valid ``image_size`` (B, 2), gt ``boxes`` (B, G, 4)
            in network-input pixels, ``labels`` (B, G) in torchvision's label space (< 0:
            padding) and ``masks`` (B, G, Hp, Wp) uint8 or ``keypoints`` (B, G, 17, 3); one
            image may come without the batch axis. Both samplers take every candidate, so
            the result is deterministic (:func:`training_losses`). OUT.npz: ``loss_objectness``,
            ``loss_rpn_box_reg``, ``loss_classifier``, ``loss_box_reg``, ``loss_mask`` or
            ``loss_keypoint``, the sampled counts, the proposals per image, and the positive
            rois the heads train on with their mask or keypoint targets.

``A`` is ``maskrcnn_resnet50_fpn`` (91 classes) or ``keypointrcnn_resnet50_fpn`` (2 classes, 17
keypoints); ``--score-thresh`` and ``--detections`` set ``box_score_thresh`` and
``box_detections_per_img``. The models are built as torchvision's builders build them for
pretrained weights (FrozenBatchNorm2d, three trainable stages).
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

ARCHS = ("maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn")


def build_model(arch, score_thresh=0.05, detections=100):
    """torchvision's ``arch`` with its default initialisation, in eval mode."""
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
    """torchvision's own initialisation under ``torch.manual_seed(seed)``, then random
    FrozenBatchNorm statistics and affine, non-zero biases, and the class and mask prediction
    layers scaled so that scores and mask probabilities spread out (near-equal scores would
    compare nothing)."""
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
    model = build_model(arch, score_thresh, detections)
    model.load_state_dict(torch.load(weights, map_location="cpu"))
    return model


def _hook(module, store, key):
    module.register_forward_hook(lambda m, i, o: store.__setitem__(key, o.detach().clone()))


@torch.no_grad()
def run_stages(model, x, image_size):
    """The network stages on a normalised (1, 3, Hp, Wp) tensor with valid size ``image_size``."""
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
    """The whole model on an image file (PIL, RGB, [0, 1]), detections in image pixels."""
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
    """The ``losses`` verb: :func:`training_losses` on ``--input``, saved to ``--out`` (npz of
    0-d arrays, ``proposals`` (B,)). Returns the exit code."""
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
    p = sub.add_parser("losses")
    p.add_argument("--arch", choices=ARCHS, required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
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
