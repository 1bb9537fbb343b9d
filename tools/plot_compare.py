#!/usr/bin/python3
"""Draws DIR/compare.png from the DIR/summary.json and DIR/metrics.csv that
tools/compare writes: test accuracy against wall time and against examples
seen, and training loss against wall time, one curve per mode.

  /usr/bin/python3 tools/plot_compare.py runs/20261126-120000
"""
import csv
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"bsp": "#1f77b4", "ssp:1": "#2ca02c", "ssp:2": "#17becf", "ssp:3": "#bcbd22",
          "async": "#d62728", "async-sa": "#ff7f0e", "local": "#7f7f7f"}


def smooth(values, window):
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def main(out_dir):
    with open(os.path.join(out_dir, "summary.json")) as f:
        summary = json.load(f)
    losses = {}
    with open(os.path.join(out_dir, "metrics.csv")) as f:
        for row in csv.DictReader(f):
            if row["record"] == "step" and row["loss"]:
                losses.setdefault(row["mode"], []).append((float(row["wall_s"]), float(row["loss"])))
    settings = summary["settings"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), constrained_layout=True)
    ax_t, ax_e, ax_l = axes
    target = settings.get("target_accuracy")
    accs = [p["test_accuracy"] for m in summary["modes"] for p in m.get("curve", [])
            if p.get("test_accuracy") is not None]
    for m in summary["modes"]:
        mode = m["mode"]
        color = COLORS.get(mode)
        pts = [p for p in m.get("curve", []) if p.get("test_accuracy") is not None]
        if pts:
            ax_t.plot([p["wall_s"] for p in pts], [p["test_accuracy"] for p in pts],
                      marker="o", markersize=4, label=mode, color=color)
            ax_e.plot([p["examples"] / 1000 for p in pts], [p["test_accuracy"] for p in pts],
                      marker="o", markersize=4, label=mode, color=color)
        pts = sorted(losses.get(mode, []))
        if pts:
            window = max(1, len(pts) // 60)
            ax_l.plot([p[0] for p in pts], smooth([p[1] for p in pts], window), label=mode,
                      color=color, linewidth=1.4)
    for ax in (ax_t, ax_e):
        if target:
            ax.axhline(target, color="black", linestyle=":", linewidth=1)
        ax.set_ylabel("test accuracy")
        if accs:  # zoom on the measured range (and the target)
            lo = min(accs + ([target] if target else []))
            hi = max(accs + ([target] if target else []))
            pad = max(0.01, 0.1 * (hi - lo))
            ax.set_ylim(bottom=max(0.0, lo - pad), top=min(1.0, hi + pad))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        ax.set_xlim(left=0)
    ax_t.set_xlabel("wall time (s)")
    ax_t.set_title("Test accuracy vs wall time")
    ax_e.set_xlabel("examples seen, all workers (thousands)")
    ax_e.set_title("Test accuracy vs examples seen")
    ax_l.set_xlabel("wall time (s)")
    ax_l.set_ylabel("training loss (moving average, log scale)")
    ax_l.set_yscale("log")
    ax_l.set_title("Training loss vs wall time")
    ax_l.grid(alpha=0.3)
    ax_l.legend(loc="upper right")
    strag = settings.get("stragglers") or {}
    sub = (f"{settings['model']} on Fashion-MNIST, {settings['ps']} ps + {settings['workers']} workers, "
           f"global batch {settings['global_batch']}, {settings['optimizer']}"
           + (f" lr {settings['lr']}" if settings.get("lr") else "")
           + (", stragglers " + ", ".join(f"worker {k} x{v:g}" for k, v in strag.items()) if strag else "")
           + f" — {summary.get('date', '')}")
    fig.suptitle("distval: synchronous vs asynchronous training\n" + sub, fontsize=11)
    path = os.path.join(out_dir, "compare.png")
    fig.savefig(path, dpi=110)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
