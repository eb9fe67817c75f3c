#!/usr/bin/env python
"""Where the time of a preset's int8 graph goes, operator by operator (MXNet's profiler).

In:  a preset (random weights, as ``mxmask bench`` builds it), an input size, runs.
Out: the int8 graph's median seconds per run, then MXNet's aggregate table of the profiled runs
     (operator, count, total and mean milliseconds), sorted by total time; totals cover all
     ``--runs`` runs. Bulk execution is turned off so that each operator is its own entry.

    python dev/profile_int8.py mask_rcnn_r50_fpn --size 800x1344
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python dev/profile_int8.py mask_rcnn_r50_fpn

The graph is calibrated on the bench input, as ``mxmask bench --dtype int8`` does. Time on an
idle machine only.
"""
import argparse
import os
import sys
import time

os.environ["MXNET_EXEC_BULK_EXEC_INFERENCE"] = "0"      # before MXNet loads: one entry per op
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("preset")
    p.add_argument("--size", default="800x1344", help="input HxW (default 800x1344)")
    p.add_argument("--runs", type=int, default=2, help="profiled runs (default 2)")
    p.add_argument("--rows", type=int, default=40, help="operator rows printed (default 40)")
    args = p.parse_args(argv)

    import mxnet as mx
    from mxmask.bench.stages import bench_input, bench_input_size, build_bench_model
    from mxmask.graph import network_symbol, optimized_block
    cfg, net = build_bench_model(args.preset)
    hw = bench_input_size(args.size)
    data, im_info = bench_input(hw, 1)
    net.hybridize(static_alloc=True, static_shape=True)
    net(data, im_info)
    block, _ = optimized_block(network_symbol(net, net.kernels), net.collect_params(), data,
                               im_info, dtype="int8", calib=[(data, im_info)],
                               int8=cfg.test.int8)
    times = []
    for _ in range(2 + args.runs):
        t0 = time.perf_counter()
        block(data, im_info)
        mx.nd.waitall()
        times.append(time.perf_counter() - t0)
    print("%s %dx%d int8: %.3f s per run (median of %d)"
          % (args.preset, hw[0], hw[1], sorted(times[2:])[len(times[2:]) // 2], args.runs))
    mx.profiler.set_config(profile_all=True, aggregate_stats=True,
                           filename=os.devnull)
    mx.profiler.set_state("run")
    for _ in range(args.runs):
        block(data, im_info)
        mx.nd.waitall()
    mx.profiler.set_state("stop")
    table = mx.profiler.dumps(reset=True, format="table", sort_by="total", ascending=False)
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "operator")
    print("\n".join(lines[start:start + 3 + args.rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
