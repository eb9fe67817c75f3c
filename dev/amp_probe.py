"""Which mixed-precision training modes MXNet's AMP supports for mxmask's model on this machine.

    python dev/amp_probe.py [--preset shapes] [--size 160x192] [--ctx cpu]

Each probe runs in its own subprocess (some modes crash the process natively) and does two SGD
steps of the preset's training graph with ``mxnet.contrib.amp``:

    float16                 amp.init('float16'), hybridized
    float16 imperative      the same, not hybridized
    bfloat16                amp.init('bfloat16'), hybridized
    bfloat16 imperative     the same, not hybridized
    bfloat16 fp32-deconv    bfloat16 with Deconvolution kept in float32, hybridized

It prints one line per probe: ``ok`` with the losses, or how it failed (exception text or the
signal that killed it). docs/training.md ("Mixed precision") records the results, with their
machine and date.
"""
import argparse
import os
import subprocess
import sys

PROBES = [
    ("float16", "float16", True, False),
    ("float16 imperative", "float16", False, False),
    ("bfloat16", "bfloat16", True, False),
    ("bfloat16 imperative", "bfloat16", False, False),
    ("bfloat16 fp32-deconv", "bfloat16", True, True),
]

CHILD = r"""
import sys
import mxmask  # noqa: F401  (thread setting before mxnet)
import mxnet as mx
from mxnet.contrib import amp
dtype, hybridize, fp32_deconv, preset, h, w, ctx = sys.argv[1:8]
amp.init(target_dtype=dtype, fp32_ops=["Deconvolution"] if fp32_deconv == "1" else None)
from mxnet import autograd, gluon
from mxmask.bench import build_bench_model, synthetic_train_batch
from mxmask.cli import parse_ctx
from mxmask.modeling.training import RCNNLoss
ctx = parse_ctx(ctx)[0]
cfg, net = build_bench_model(preset, ctx=ctx)
# MXNet's own kernels: loading mxmask's compiled ones (mx.library.load) regenerates the operator
# functions and so silently undoes amp.init's patching (every mode would then run in float32)
loss_net = RCNNLoss(net, cfg, kernels="mxnet")
if hybridize == "1":
    loss_net.hybridize(static_alloc=True)
params = {k: v for k, v in net.collect_params().items() if v.grad_req != "null"}
trainer = gluon.Trainer(params, "sgd", {"learning_rate": 1e-3, "momentum": 0.9, "wd": 1e-4})
amp.init_trainer(trainer)
batch = synthetic_train_batch(cfg, (int(h), int(w)), 2)
keys = ["data", "im_info", "gt_boxes", "gt_labels", "gt_crowd", "gt_masks", "gt_keypoints"]
inputs = {k: mx.nd.array(batch[k], ctx=ctx) for k in keys if k in batch}
for _ in range(2):
    with autograd.record():
        losses = loss_net(**inputs)
        total = mx.nd.add_n(*losses.values())
        with amp.scale_loss(total, trainer) as scaled:
            autograd.backward(scaled)
    trainer.step(2)
print("LOSSES " + " ".join("%s=%.4f" % (k, v.asscalar()) for k, v in losses.items()))
"""


def run_probe(name, dtype, hybridize, fp32_deconv, preset, size, ctx, timeout=600):
    """Run one probe in a child process: ``ok: <losses>``, ``crashed: killed by signal N``,
    ``failed (exit N): <last error line>`` or ``timed out after N s``.
    """
    h, w = size.lower().split("x")
    cmd = [sys.executable, "-c", CHILD, dtype, "1" if hybridize else "0",
           "1" if fp32_deconv else "0", preset, h, w, ctx]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timed out after %d s" % timeout
    if r.returncode == 0:
        line = [l for l in r.stdout.splitlines() if l.startswith("LOSSES")]
        return "ok: " + (line[-1][7:] if line else "(no losses printed)")
    if r.returncode < 0:
        return "crashed: killed by signal %d" % -r.returncode
    lines = [l.strip() for l in r.stderr.splitlines() if l.strip()]
    errors = [l for l in lines if "Error" in l or "Check failed" in l]
    return "failed (exit %d): %s" % (r.returncode, (errors or lines or ["?"])[-1][:300])


def main(argv=None):
    """Run every probe of :data:`PROBES` and print one line each."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="shapes")
    p.add_argument("--size", default="160x192", help="input HxW")
    p.add_argument("--ctx", default="cpu", help="cpu or gpu:0")
    args = p.parse_args(argv)
    for name, dtype, hybridize, fp32_deconv in PROBES:
        print("%-22s %s" % (name, run_probe(name, dtype, hybridize, fp32_deconv, args.preset,
                                                args.size, args.ctx)), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    main()
