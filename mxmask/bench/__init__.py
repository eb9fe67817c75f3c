"""``mxmask bench``: inference and training-step speed by stage, beside GluonCV or torchvision.

    run_bench(preset="mask_rcnn_r50_fpn", size="800x1344", runs=5, against="torchvision")

In: a preset (random weights) or a checkpoint, an input size, batch, runs and warm-up runs,
``--fuse`` / ``--dtype``, ``--train`` (a training step too), ``--against gluoncv|torchvision``.
Out: the printed table (:mod:`mxmask.bench.report`), a JSON record (``--json``) and a chart
(``--chart``). The pieces:

- :mod:`mxmask.bench.stages`: mxmask's own timings, stage by stage, and the training step;
- :mod:`mxmask.bench.peers`: GluonCV (this process) and torchvision (a torch interpreter),
  timed after mxmask on the same inputs, and the ResNet-50 convolution floor;
- :mod:`mxmask.bench.report`: the table, the peer ratios and the chart.

docs/benchmarks.md ("How ``mxmask bench`` measures") says what each row and field holds; the
figures live there too, each with its command, machine and date.
"""
import os

from .. import amx_enabled
from ..graph import check_anchors_cover, check_dtype
from ..utils import UserError, atomic_write_json
from .peers import PEERS, bench_gluoncv, bench_resnet50, bench_torchvision, torchvision_arch
from .report import format_table, peer_ratios, write_chart
from .stages import (bench_inference, bench_input, bench_input_size, bench_int8_stages,
                     bench_keypoint_head_rois, bench_optimized, bench_train_step,
                     build_bench_model, count_network_macs, gmac_record, keypoint_head_boxes,
                     synthetic_train_batch)

__all__ = ["run_bench", "build_bench_model", "bench_inference", "bench_input", "bench_input_size",
           "bench_train_step", "synthetic_train_batch", "keypoint_head_boxes",
           "bench_keypoint_head_rois", "bench_torchvision", "bench_gluoncv", "format_table",
           "peer_ratios", "write_chart"]


def run_bench(preset="mask_rcnn_r50_fpn", ckpt=None, size="800x1344", batch=1, runs=5,
              warmup=2, train=False, overrides=(), json_path=None, fuse=False, dtype="float32",
              against=None, resnet50=False, chart_path=None, kernels="auto", torch_python=None,
              out=print):
    """``mxmask bench``: time mxmask (and a peer), print the table, return the record.

    Args:
        preset: preset name, built with random weights (:func:`build_bench_model`); unused
            when ``ckpt`` is given.
        ckpt: a checkpoint folder, measured with its own weights.
        size: ``"HxW"``, rounded up to multiples of 32 (:func:`bench_input_size`).
        batch: images per forward; 1 with ``against="gluoncv"``.
        runs, warmup: timed and untimed runs of every figure.
        train: also time a training step (forward, backward, SGD update).
        overrides: ``key=value`` config overrides; with ``against`` ``test.flip=false`` is
            added (neither peer has test-time flip).
        json_path: write the record here as JSON.
        fuse, dtype: also time the MKLDNN-fused and/or bfloat16 or int8 graph built from the
            exported graph (:func:`bench_optimized`); the stages stay those of the plain fp32
            network. ``dtype="bfloat16"`` with ``train`` runs the step's convolutions in
            bfloat16 (``solver.amp``). int8 calibrates on ``test.int8.calib_images`` when
            ``overrides`` set it, else on the bench input.
        against: None, ``"gluoncv"`` or ``"torchvision"`` (:data:`PEERS`). GluonCV always
            runs in float32; torchvision in ``dtype``, and in bfloat16 (autocast,
            channels_last) against int8.
        resnet50: also time GluonCV's plain ResNet-50 (implied by ``against="gluoncv"``);
            with ``dtype="int8"`` its int8 graph too.
        chart_path: write a PNG bar chart of the stages here.
        kernels: ``auto``, ``mxmask`` or ``mxnet``: the in-process network's RoIAlign and NMS
            (:meth:`mxmask.modeling.rcnn.MaskRCNN.use_kernels`).
        torch_python: the torch interpreter of ``against="torchvision"`` (None:
            ``MXMASK_TORCH_PYTHON``).
        out: called with the table text.

    Returns:
        dict: ``settings``, ``mxmask`` (:func:`bench_inference`'s record plus GMAC, optimised
        totals and training figures), and with ``against`` the peer's record and the ratios
        of :func:`peer_ratios`, with ``resnet50`` its record. docs/benchmarks.md documents
        each field.

    Raises:
        UserError: a bad argument, a missing GluonCV or torch interpreter, an input larger
        than the anchors cover; all checked before any network is timed.
    """
    check_dtype(dtype)
    if dtype == "int8" and train:
        raise UserError("--dtype int8 is an inference precision; time the training step "
                        "with --dtype float32 or bfloat16")
    if against not in (None,) + PEERS:
        raise UserError("--against %s: expected one of %s" % (against, ", ".join(PEERS)))
    if runs < 1 or warmup < 0:
        raise UserError("--runs must be at least 1 and --warmup at least 0, got --runs %d "
                        "--warmup %d" % (runs, warmup))
    if batch < 1:
        raise UserError("--batch must be at least 1, got %d" % batch)
    if against == "gluoncv" and batch != 1:
        raise UserError("--against gluoncv: GluonCV's Mask R-CNN infers one image at a time; "
                        "use --batch 1")
    if against == "gluoncv" or resnet50:         # checked before any network is built
        from ..convert.common import import_gluoncv
        import_gluoncv("mxmask bench --against gluoncv" if against == "gluoncv"
                       else "mxmask bench --resnet50")
    if against == "torchvision":                 # checked before any network is built
        from ..convert.torch_python import find_torch_python
        torch_python, _ = find_torch_python(torch_python, "mxmask bench --against torchvision")
    hw = bench_input_size(size)
    if against:
        overrides = list(overrides) + ["test.flip=false"]    # neither peer has test-time flip
    cfg, net = build_bench_model(preset, ckpt, overrides, kernels=kernels)
    arch = torchvision_arch(cfg) if against == "torchvision" else None
    check_anchors_cover(size, hw, cfg, "input.max_size_train / max_size_test; add --set "
                        "input.max_size_test=%d" % max(hw))
    settings = {"preset": ckpt or preset, "size": "%dx%d" % hw, "batch": batch, "runs": runs,
                "warmup": warmup, "dtype": dtype, "fuse": bool(fuse),
                "max_dets": cfg.test.max_dets, "test_flip": bool(cfg.test.flip),
                "rpn_post_nms_topk_test": cfg.model.rpn.post_nms_topk_test,
                "omp_threads": os.environ.get("OMP_NUM_THREADS", "default"),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
                "against": against, "kernels": net.kernels, "amx": amx_enabled(),
                "isa_cap": os.environ.get("ONEDNN_MAX_CPU_ISA")
                or os.environ.get("DNNL_MAX_CPU_ISA") or "none"}
    result = {"settings": settings, "mxmask": bench_inference(cfg, net, hw, batch, runs, warmup)}
    m = result["mxmask"]
    if fuse or dtype != "float32":
        # stages stay those of the plain fp32 network; total is the optimised graph + paste
        network, record = bench_optimized(net, hw, batch, fuse, dtype, runs, warmup, cfg)
        m["optimized_detections_per_image"] = record["detections_per_image"]
        if dtype == "int8":
            m["int8_stages"] = bench_int8_stages(cfg, net, hw, batch, runs, warmup)
            settings["int8"] = {"calib_mode": record["calib_mode"],
                                "calib_num": record["calib_num"],
                                "calibrated_on": record["calibrated_on"],
                                "quantized_layers": len(record["quantized"]),
                                "float32_nodes": record["float32_nodes"]}
        paste = m["stages"]["paste/decode"]["median"]
        m["plain_total_s"], m["plain_network_s"] = m["total_s"], m["network_s"]
        m["network_s"] = network
        m["total_s"] = {k: v + paste for k, v in network.items()}
    m.update(gmac_record(count_network_macs(net, hw, batch), m["network_s"]["median"]))
    if train:
        if dtype == "bfloat16":
            cfg.solver.amp = "bfloat16"      # the training step's convolutions in bf16
        m.update(bench_train_step(cfg, net, hw, batch, runs, max(1, warmup)))
        settings["train_amp"] = m.pop("train_amp")      # what RCNNLoss resolved solver.amp to
    if against == "gluoncv":
        result["gluoncv"], settings["gluoncv"] = bench_gluoncv(cfg, hw, batch, runs, warmup,
                                                               train)
    elif against == "torchvision":      # after mxmask's timings: the two never run together
        # torchvision has no int8 detector: against int8 it runs its best CPU setting
        peer_dtype = "bfloat16" if dtype == "int8" else dtype
        result["torchvision"], settings["torchvision"] = bench_torchvision(
            torch_python, arch, cfg, hw, batch, runs, warmup, train, peer_dtype,
            train_dtype=settings.get("train_amp"))
    if against:
        # mxmask's keypoint heads on 10 / 100 rois are timed in the plain fp32 network (as its
        # stages), torchvision's in --dtype: their ratio only in fp32
        result.update(peer_ratios(m, result[against], keypoint_heads=dtype == "float32"))
    if resnet50 or against == "gluoncv":
        result["resnet50"] = bench_resnet50(hw, batch, runs, warmup, int8=dtype == "int8")
    out(format_table(result, settings))
    if json_path:
        atomic_write_json(json_path, result, indent=1)
    if chart_path:
        write_chart(chart_path, result, settings)
    return result
