#!/usr/bin/python3
"""Renders bench/results.json (written by tarn-bench report) as one PNG:
S1 and S3 times per profile, S2 times, and every target as value/target.

usage: bench-chart.py RESULTS_JSON OUT_PNG
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")  # no display on the test machines
import matplotlib.pyplot as plt  # noqa: E402

PROFILES = ["loopback", "rtt50", "rtt100", "rtt200", "local"]


def by(records, scenario):
    """{variant: {profile: secs}} of the variants that ran to the end."""
    out = {}
    for r in records:
        if r["scenario"] == scenario and r["ok"] and "secs" in r["metrics"]:
            out.setdefault(r["variant"], {})[r["profile"]] = r["metrics"]["secs"]
    return out


def failed(records, scenario):
    return sorted({f'{r["profile"]} {r["variant"]}' for r in records if r["scenario"] == scenario and not r["ok"]})


def grouped(ax, data, title, records, scenario):
    profiles = [p for p in PROFILES if any(p in v for v in data.values())]
    variants = sorted(data)
    width = 0.8 / max(len(variants), 1)
    for i, variant in enumerate(variants):
        xs = [j + i * width for j, p in enumerate(profiles) if p in data[variant]]
        ys = [data[variant][p] for p in profiles if p in data[variant]]
        bars = ax.bar(xs, ys, width, label=variant)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(profiles))], profiles)
    ax.set_ylabel("seconds")
    ax.set_title(title)
    if variants:
        ax.legend(fontsize=7, loc="upper left")
    bad = failed(records, scenario)
    if bad:
        # Below the axis: a failed variant has no bar, only its name.
        ax.set_xlabel("FAILED: " + ", ".join(bad), fontsize=7, color="crimson", wrap=True)


def targets(ax, checks):
    rows = [c for c in checks if c.get("target") is not None]
    labels, values, colors = [], [], []
    for c in rows:
        labels.append(f'{c["scenario"]} {c["profile"]}: {c["name"]}')
        if c["value"] is None:
            values.append(0.0)
            colors.append("lightgrey")
            continue
        # value/target for <= targets, target/value for >= targets: below 1 passes.
        v = c["value"] / c["target"] if c["op"] == "le" else c["target"] / max(c["value"], 1e-12)
        values.append(v)
        colors.append("seagreen" if c["verdict"] == "PASS" else "crimson")
    ax.barh(range(len(rows)), values, color=colors)
    for i, c in enumerate(rows):
        if c["value"] is None:
            ax.text(0.02, i, "FAILED", va="center", fontsize=7, color="crimson")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("share of the target used (< 1 passes; grey: FAILED, not measured)")
    ax.set_title("Targets of issue 5")


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        results = json.load(f)
    records, checks = results["records"], results["checks"]
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    grouped(axes[0][0], by(records, "S1"), "S1 pull + create + run of multi", records, "S1")
    grouped(axes[0][1], by(records, "S3"), "S3 one pull vs 20 concurrent pulls", records, "S3")
    grouped(axes[1][0], by(records, "S2"), "S2 whole image: tarn background vs skopeo", records, "S2")
    targets(axes[1][1], checks)
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)


if __name__ == "__main__":
    main()
