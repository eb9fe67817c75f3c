"""The table, the ratios and the chart of ``mxmask bench``.

    peer_ratios(mxmask_record, peer_record)  -> {"speedup": peer / mxmask median, ...}
    format_table(result, settings)           -> the printed lines
    write_chart(path, result, settings)      -> a PNG of the stage times

In: the result record of :func:`mxmask.bench.run_bench` (``mxmask`` and, with ``--against``,
the peer's record) and its settings. Out: text lines, ratio dicts (above 1: mxmask is faster)
and a chart file.
"""

import numpy as np

from ..utils import atomic_write_bytes
from .peers import PEERS

__all__ = ["peer_ratios", "format_table", "write_chart"]


# what each peer's paste_s times
_PASTE_NAMES = {"gluoncv": "paste/rle", "torchvision": "postprocess"}


_NAME_WIDTH = 30
# the short names of --dtype in the table and chart
_DTYPE_LABELS = {"float32": "fp32", "bfloat16": "bf16", "int8": "int8"}


def _row(name, s, note=""):
    """One table line: the name, median, min and max seconds of stats ``s``, and ``note``."""
    return "%-*s %9.3f %9.3f %9.3f%s" % (_NAME_WIDTH, name, s["median"], s["min"], s["max"],
                                          note)


def peer_ratios(m, peer, keypoint_heads=True):
    """mxmask's speedups over a peer (peer median / mxmask median: above 1 mxmask is faster).

    Args:
        m: mxmask's record.
        peer: the peer's record (``total_s``, ``network_s``, optionally ``train_step_s`` and
            ``keypoint_head_per_rois``).
        keypoint_heads: compare the keypoint heads on 10 / 100 rois (False when the two were
            timed in different precisions).

    Returns:
        ``{"speedup": totals, "network_speedup": networks}``, plus ``train_speedup`` and
        ``keypoint_head_speedup`` (``{count: ratio}``) where both records have the figure.
    """
    def ratio(a, b):
        return a["median"] / b["median"]
    out = {"speedup": ratio(peer["total_s"], m["total_s"]),
           "network_speedup": ratio(peer["network_s"], m["network_s"])}
    if "train_step_s" in peer and "train_step_s" in m:
        out["train_speedup"] = ratio(peer["train_step_s"], m["train_step_s"])
    theirs = peer.get("keypoint_head_per_rois", {}) if keypoint_heads else {}
    kp = {c: ratio(theirs[c], s) for c, s in m.get("keypoint_head_per_rois", {}).items()
          if c in theirs}
    if kp:
        out["keypoint_head_speedup"] = kp
    return out


def _peer_lines(peer, result, settings):
    """The table lines of ``result[peer]`` and the speedups (``result``'s top-level ratios)."""
    ps, rec = settings.get(peer, {}), result[peer]
    lines = ["%s %s: %s" % (peer, ps.get("model", ""), ", ".join(
        "%s=%s" % kv for kv in ps.items() if kv[0] != "model"))]
    lines.append(_row("%s network" % peer, rec["network_s"]))
    lines.append(_row("%s %s" % (peer, _PASTE_NAMES.get(peer, "paste")), rec["paste_s"]))
    lines.append(_row("%s total" % peer, rec["total_s"]))
    if "detections_per_image" in rec:
        lines.append("%s detections/image %.0f" % (peer, rec["detections_per_image"]))
    if "gmac" in rec:
        lines.append("%s network %.2f GMAC (%s): %.1f GFLOP/s" % (
            peer, rec["gmac"], ", ".join("%s %.2f" % kv for kv in rec["gmac_stages"].items()),
            rec["gflop_per_s"]))
    gmacs = rec.get("keypoint_head_gmac_per_rois", {})
    for count, s in rec.get("keypoint_head_per_rois", {}).items():
        note = ("   %7.2f GMAC, %.1f GFLOP/s" % (gmacs[count], 2 * gmacs[count] / s["median"])
                if count in gmacs else "")
        lines.append(_row("%s keypoint %s rois" % (peer, count), s, note))
    if "train_step_s" in rec:
        note = "   (%.2f images/s" % rec["train_images_per_s"]
        if "rpn_targets_s" in rec:
            note += "; RPN targets %.3f s of it" % rec["rpn_targets_s"]["median"]
        lines.append(_row("%s train step" % peer, rec["train_step_s"], note + ")"))
    line = "speedup (%s / mxmask median): inference %.2fx (networks alone %.2fx)" % (
        peer, result["speedup"], result["network_speedup"])
    if "train_speedup" in result:
        line += ", train step %.2fx" % result["train_speedup"]
    for count, r in result.get("keypoint_head_speedup", {}).items():
        line += ", keypoint head %s rois %.2fx" % (count, r)
    lines.append(line)
    return lines


def format_table(result, settings):
    """The printed table of ``mxmask bench``.

    Args:
        result: :func:`mxmask.bench.run_bench`'s record.
        settings: its ``settings`` (the scalar ones head the table).

    Returns:
        the text: one row per stage (median, min, max seconds; GMAC), the totals, detections
        per image and peak RSS, the network's GMAC and GFLOP/s, the keypoint head on 10 / 100
        rois, the training step, then the peer's rows and speedups and the ResNet-50 rows
        when present.
    """
    flat = [(k, v) for k, v in settings.items() if not isinstance(v, dict)]
    lines = ["mxmask bench: %s" % ", ".join("%s=%s" % kv for kv in flat),
             "%-*s %9s %9s %9s" % (_NAME_WIDTH, "stage", "median s", "min s", "max s")]
    m = result["mxmask"]
    stage_gmac = m.get("gmac_stages", {})
    int8 = m.get("int8_stages", {})
    for name, s in m["stages"].items():
        note = "   %7.2f GMAC" % stage_gmac[name] if name in stage_gmac else ""
        if name in int8:
            note += "   int8 %.3f s (%.2fx)" % (int8[name]["median"],
                                             s["median"] / int8[name]["median"])
        lines.append(_row(name, s, note))
    if "plain_total_s" in m:
        lines.append(_row("total fp32 plain", m["plain_total_s"]))
        variant = "total %s%s" % (_DTYPE_LABELS[settings["dtype"]],
                                  " fused" if settings["fuse"] else "")
    else:
        variant = "total"
    lines.append(_row(variant, m["total_s"]))
    if "plain_total_s" in m:
        lines.append("%s / fp32 plain (median): %.2fx faster; detections/image %.0f" % (
            variant, m["plain_total_s"]["median"] / m["total_s"]["median"],
            m["optimized_detections_per_image"]))
    if "int8" in settings:
        q = settings["int8"]
        lines.append("int8: %d conv/fc layers quantized, %s calibration on %d image(s) of %s; "
                     "float32 besides the proposal generator: %s"
                     % (q["quantized_layers"], q["calib_mode"], q["calib_num"],
                        q["calibrated_on"], ", ".join(q["float32_nodes"]) or "nothing"))
    if settings.get("test_flip"):
        lines.append("test.flip: the total includes the mirror image's backbone and head "
                     "passes; the stages time the image's own pass")
    lines.append("detections/image %.0f, peak RSS %.0f MB" % (m["detections_per_image"],
                                                             m["peak_rss_mb"]))
    if "gmac" in m:
        lines.append("network %.2f GMAC in %.3f s (median, no paste): %.1f GFLOP/s"
                     % (m["gmac"], m["network_s"]["median"], m["gflop_per_s"]))
    for count, s in m.get("keypoint_head_per_rois", {}).items():
        gmac = m["keypoint_head_gmac_per_rois"][count]
        lines.append(_row("keypoint head %s rois" % count, s,
                          "   %7.2f GMAC, %.1f GFLOP/s" % (gmac, 2 * gmac / s["median"])))
    if "train_step_s" in m:
        lines.append(_row("train step", m["train_step_s"],
                          "   (%.2f images/s, convolutions in %s)"
                          % (m["train_images_per_s"], settings.get("train_amp", "float32"))))
    for peer in PEERS:
        if peer in result:
            lines.extend(_peer_lines(peer, result, settings))
    if "resnet50" in result:
        r = result["resnet50"]
        lines.append(_row("resnet50 fp32", r["plain_s"], "   %7.2f GMAC, %.1f GFLOP/s"
                          % (r["gmac"], r["gflop_per_s"]["plain"])))
        lines.append(_row("resnet50 mkldnn", r["mkldnn_s"], "   %7.2f GMAC, %.1f GFLOP/s"
                          % (r["gmac"], r["gflop_per_s"]["mkldnn"])))
        if "int8_s" in r:
            lines.append(_row("resnet50 int8", r["int8_s"], "   %7.2f GMAC, %.1f GOP/s"
                              % (r["gmac"], r["gflop_per_s"]["int8"])))
    return "\n".join(lines)


def write_chart(path, result, settings):
    """Write a horizontal bar chart (PNG, matplotlib's Agg backend) of mxmask's stage medians
    (min-max as error bars), its total and, when present, the peer's (GluonCV's or
    torchvision's) total, titled with preset, size and batch. The stages are those of the
    plain fp32 network; with --fuse / --dtype bfloat16 the plain total and the optimised total
    are both drawn, each named.

    Args:
        path: the PNG file, written atomically.
        result, settings: :func:`mxmask.bench.run_bench`'s record and its settings.
    """
    import io
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    m = result["mxmask"]
    bars = [(name, s, "#4c72b0") for name, s in m["stages"].items()]
    if "plain_total_s" in m:
        optimised = "%s%s" % (_DTYPE_LABELS[settings["dtype"]],
                              " fused" if settings["fuse"] else "")
        bars.append(("mxmask total, fp32 plain", m["plain_total_s"], "#1f3a60"))
        bars.append(("mxmask total, %s" % optimised, m["total_s"], "#0b1d33"))
    else:
        bars.append(("mxmask total", m["total_s"], "#1f3a60"))
    for peer in PEERS:
        if peer in result:
            bars.append(("%s total" % peer, result[peer]["total_s"], "#dd8452"))
    bars.reverse()                                    # first stage on top
    fig = Figure(figsize=(8, 1.2 + 0.45 * len(bars)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    pos = np.arange(len(bars))
    med = np.array([s["median"] for _, s, _ in bars])
    err = np.array([[s["median"] - s["min"] for _, s, _ in bars],
                    [s["max"] - s["median"] for _, s, _ in bars]])
    ax.barh(pos, med, xerr=err, color=[c for _, _, c in bars], capsize=3)
    ax.set_yticks(pos)
    ax.set_yticklabels([n for n, _, _ in bars])
    top = med + err[1]
    for y, v, t in zip(pos, med, top):
        ax.text(t, y, "  %.3f s" % v, va="center", fontsize=8)
    ax.set_xlim(0, top.max() * 1.25 or 1)
    ax.set_xlabel("seconds (median of %d runs; bars: min-max)" % settings["runs"])
    ax.set_title("mxmask bench: %s, %s, batch %d" % (settings["preset"], settings["size"],
                                                      settings["batch"]))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
