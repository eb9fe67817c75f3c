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
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
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
