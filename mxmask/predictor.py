"""The predictor: a checkpoint in, COCO result entries out.

    predictor = Predictor("runs/shapes")                    # a checkpoint folder
    entries = predictor.predict_image("image.png")          # COCO result dicts, original pixels
    results, failures = predictor.predict_paths(["a.png", "b.jpg", "dir/"])

What goes in: image files (any size; folders are expanded to their image files) or HxWx3 uint8
RGB arrays, resized and normalised as the checkpoint's test-time input pipeline says
(:class:`mxmask.data.transforms.TestTransform`), through the hybridized network
(:func:`load_network`, or :func:`optimize_network` for ``fuse`` / ``dtype``) on one or several
contexts (:meth:`Predictor.run_batches`).

What comes out: COCO result entries (``image_id`` or ``file_name``, ``category_id``, ``bbox`` as
xywh, ``score``, ``segmentation`` RLE, ``keypoints``) in original-image pixels, with COCO category
ids taken from the checkpoint's config (``data.category_ids``; :mod:`mxmask.postprocess`).
"""
import os

import mxnet as mx
import numpy as np

from .config import unused_labels
from .data.images import IMAGE_EXTENSIONS, list_images  # noqa: F401 (mxmask.predictor API)
from .data.transforms import TestTransform, batchify_test, padded_size
from .engine.checkpoint import checkpoint_files, load_checkpoint_config, load_params
from .modeling.rcnn import build_model
from .postprocess import detections_to_coco
from .utils import UserError

def load_network(cfg, params, ctxs, hybridize=True, kernels="auto"):
    """Build the network of ``cfg`` and load its weights.

    On CPUs the in-process network runs the compiled RoIAlign and NMS of :mod:`mxmask.ops` where
    they load (``kernels="auto"``): MXNet's ``contrib.ROIAlign`` and ``box_nms`` outputs, bit for
    bit (docs/kernels.md); exported graphs keep MXNet's operators.

    Args:
        cfg: the checkpoint's config.
        params: the parameter file.
        ctxs: list of contexts.
        hybridize: hybridize with ``static_alloc``.
        kernels: as in :meth:`mxmask.modeling.rcnn.MaskRCNN.use_kernels`.

    Returns:
        the ``MaskRCNN``.

    Raises:
        UserError: the file is damaged (truncated or corrupt), or does not match the network
        of the config (:func:`mxmask.engine.checkpoint.load_params`).
    """
    net = build_model(cfg, ctx=ctxs)
    load_params(net, params, ctx=ctxs)
    net.use_kernels(kernels)
    if hybridize:
        net.hybridize(static_alloc=True)
    return net


def optimize_network(net, cfg, ctxs, fuse=False, dtype="float32"):
    """``net`` as ``mxmask export --fuse --dtype`` runs it (:func:`mxmask.graph.optimized_block`:
    MKLDNN fusion, bfloat16 or int8), so that evaluating it measures what a deployment gets. The
    int8 graph keeps ``net``'s kernels (the compiled RoIAlign and NMS where they load: the
    same outputs as an export's); the others are traced with MXNet's operators, which the
    bfloat16 conversion knows.

    Args:
        net: the loaded ``MaskRCNN``.
        cfg: its config; the example input that traces the graph is one zero image of the
            padded test size; int8 calibrates as ``cfg.test.int8`` says
            (:func:`mxmask.quantize.calibration_batches`).
        ctxs: exactly one CPU context (MKLDNN graphs run on the CPU).
        fuse: MKLDNN fusion.
        dtype: one of :data:`mxmask.graph.DTYPES`.

    Returns:
        a ``SymbolBlock`` with ``net``'s outputs that takes any size and batch.

    Raises:
        UserError: a bad ``dtype``, ``ctxs`` is not one CPU context, no calibration image.
    """
    from .graph import check_dtype, network_symbol, optimized_block
    check_dtype(dtype, ctxs, fuse=True)
    calib = None
    if dtype == "int8":
        from .quantize import calibration_batches
        calib = calibration_batches(cfg)
    h, w = padded_size(cfg.input.min_size_test, cfg.input.max_size_test,
                       cfg.input.size_divisibility)
    data = mx.nd.zeros((1, 3, h, w), ctx=ctxs[0])
    im_info = mx.nd.array([[h, w, 1.0]], ctx=ctxs[0])
    kernels = net.kernels if dtype == "int8" else "mxnet"
    block, _ = optimized_block(network_symbol(net, kernels), net.collect_params(), data,
                               im_info, fuse=fuse, dtype=dtype, calib=calib,
                               int8=cfg.test.int8)
    return block


class Predictor:
    """Runs a trained model on images.

    Each image is resized as at test time (``input.min_size_test`` / ``max_size_test``, with
    the checkpoint's ``input.resize_rule``, ``resize_interp`` and ``normalize``), normalised
    and padded to a multiple of ``input.size_divisibility``, run through the network, and its
    outputs are post-processed (:func:`mxmask.postprocess.detections_to_coco`): boxes mapped
    back to the original image, masks pasted and RLE-encoded, keypoints decoded with
    ``test.keypoint_decode``.

    Args:
        ckpt: a checkpoint folder (config.yaml + params); None with ``cfg`` and ``net``.
        ctx: a context or a list of them (default CPU).
        score_thresh: drop detections below it (default ``test.score_thresh``).
        params: the parameter file (default the checkpoint's last weights).
        cfg: a config instead of the checkpoint's.
        net: an in-memory network instead of the checkpoint's (training's evaluation).
        fuse, dtype: run the network as an optimised export does (:func:`optimize_network`).
        overrides: ``key=value`` settings applied to the checkpoint's config
            (:func:`mxmask.engine.checkpoint.load_checkpoint_config`).

    Raises:
        UserError: a bad config or parameter file, a ``score_thresh`` outside [0, 1].
    """

    def __init__(self, ckpt, ctx=None, score_thresh=None, params=None, cfg=None, net=None,
                 fuse=False, dtype="float32", overrides=()):
        if score_thresh is not None and not 0.0 <= score_thresh <= 1.0:  # NaN included
            raise UserError("--score-thresh: expected a value in [0, 1], got %r" % score_thresh)
        self.cfg = cfg if cfg is not None else load_checkpoint_config(ckpt, overrides)
        self.ctxs = list(ctx) if isinstance(ctx, (list, tuple)) else [ctx or mx.cpu()]
        from .graph import check_dtype
        check_dtype(dtype, self.ctxs, fuse)     # before any network is built
        if net is None:
            params = params or checkpoint_files(ckpt)[0]
            net = load_network(self.cfg, params, self.ctxs)
        else:
            net.use_kernels("auto")
        self.output_names = list(net.output_names)
        if fuse or dtype != "float32":
            net = optimize_network(net, self.cfg, self.ctxs, fuse, dtype)
        self.net = net
        self.transform = TestTransform(self.cfg)
        self.score_thresh = self.cfg.test.score_thresh if score_thresh is None else score_thresh
        if not 0.0 <= self.cfg.test.mask_box_thresh < 1.0:
            raise UserError("test.mask_box_thresh: expected a probability in [0, 1) (0: the box "
                            "head's boxes), got %r" % self.cfg.test.mask_box_thresh)
        d = self.cfg.data
        if len(d.category_ids) != self.cfg.model.num_classes:
            raise UserError("checkpoint config: data.category_ids has %d ids but the model has %d "
                            "classes" % (len(d.category_ids), self.cfg.model.num_classes))
        self.category_ids = list(d.category_ids)
        self.class_names = dict(zip(d.category_ids, d.class_names))
        self.unused_labels = unused_labels(self.cfg)
        self.keypoint_category_ids = list(d.keypoint_category_ids) or None

    # ----------------------------------------------------------------------------------------
    def forward(self, batch, ctx):
        """Run one test batch on ``ctx``.

        Args:
            batch: a test batch (numpy dict with ``data`` (B, 3, Hp, Wp) and ``im_info`` (B, 3)).
            ctx: the context.

        Returns:
            list of NDArrays, the network outputs in the order of ``output_names`` (DEVELOPING.md,
            "Network outputs"); not waited for.
        """
        data = mx.nd.array(batch["data"], ctx=ctx)
        im_info = mx.nd.array(batch["im_info"], ctx=ctx)
        outputs = self.net(data, im_info)
        return outputs if isinstance(outputs, (list, tuple)) else [outputs]

    def to_entries(self, outputs, batch, names=None):
        """COCO result entries of a batch's outputs.

        Args:
            outputs: :meth:`forward`'s outputs.
            batch: the test batch (``im_info``, ``orig_size``, ``image_id``).
            names: file names per image; the entries then carry ``file_name`` instead of
                ``image_id``.

        Returns:
            list (per image) of lists of COCO result dicts.
        """
        arrays = [o.asnumpy() for o in outputs]
        per_image = []
        for i in range(len(batch["data"])):
            out = {name: a[i] for name, a in zip(self.output_names, arrays)}
            key = {"file_name": names[i]} if names is not None else {}
            per_image.append(detections_to_coco(
                out, batch["im_info"][i], batch["orig_size"][i], int(batch["image_id"][i]),
                self.category_ids, score_thresh=self.score_thresh,
                mask_thresh=self.cfg.test.mask_thresh,
                mask_box_thresh=self.cfg.test.mask_box_thresh,
                keypoint_decode=self.cfg.test.keypoint_decode,
                keypoint_category_ids=self.keypoint_category_ids,
                mask_paste=self.cfg.test.mask_paste,
                keypoint_offset=self.cfg.data.keypoint_offset,
                unused_labels=self.unused_labels, **key))
        return per_image

    def run_batches(self, batches, names_of=None):
        """Run test batches on every context.

        Consecutive batches are sent to the contexts in turn before any result is read, so that
        MXNet's engine runs them in parallel; each image's results are produced exactly once.

        Args:
            batches: an iterable of test batches.
            names_of: ``batch -> file names``, or None for ``image_id`` entries.

        Yields:
            ``(batch, entries per image)``, in the order of ``batches``.
        """
        pending = []
        for batch in batches:
            ctx = self.ctxs[len(pending) % len(self.ctxs)]
            pending.append((batch, self.forward(batch, ctx)))
            if len(pending) == len(self.ctxs):
                for b, outs in pending:
                    yield b, self.to_entries(outs, b, names_of(b) if names_of else None)
                pending = []
        for b, outs in pending:
            yield b, self.to_entries(outs, b, names_of(b) if names_of else None)

    # ----------------------------------------------------------------------------------------
    def prepare(self, image, image_id=0):
        """A test batch of one image.

        Args:
            image: HxWx3 uint8 RGB.
            image_id: the batch's ``image_id``.

        Returns:
            the batch (``data`` (1, 3, Hp, Wp), ``im_info``, ``image_id``, ``orig_size``).

        Raises:
            UserError: ``image`` is not HxWx3.
        """
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise UserError("expected an HxWx3 RGB image, got shape %s" % (image.shape,))
        data, im_info = self.transform.apply_image(image.astype(np.uint8, copy=False))
        return batchify_test([(data, im_info, image_id, np.array(image.shape[:2], np.int64))],
                             self.cfg.input.size_divisibility)

    def predict_array(self, image, image_id=0, file_name=None):
        """COCO result entries of one image.

        Args:
            image: HxWx3 uint8 RGB.
            image_id: the entries' ``image_id``.
            file_name: when given, the entries carry it instead of ``image_id``.

        Returns:
            list of COCO result dicts in the image's pixels.
        """
        batch = self.prepare(image, image_id)
        names = [file_name] if file_name is not None else None
        return self.to_entries(self.forward(batch, self.ctxs[0]), batch, names)[0]

    def predict_image(self, path):
        """COCO result entries of one image file, keyed by its ``file_name`` (base name).

        Raises:
            UserError: the file is not a readable image.
        """
        from .data.images import read_image
        return self.predict_array(read_image(path), file_name=os.path.basename(path))

    def predict_paths(self, paths, on_image=None):
        """Run the model on files and folders (:func:`list_images`).

        Args:
            paths: image files and folders.
            on_image: called as ``on_image(path, image, entries)`` for each image that worked.

        Returns:
            ``(all entries, failures)``: an unreadable image is reported in ``failures`` as
            ``(path, message)`` and skipped; the others are still processed.
        """
        from .data.images import read_image
        results, failures = [], []
        for path in list_images(paths):
            try:
                image = read_image(path)
            except UserError as e:
                failures.append((path, str(e)))
                continue
            entries = self.predict_array(image, file_name=os.path.basename(path))
            results.extend(entries)
            if on_image is not None:
                on_image(path, image, entries)
        return results, failures
