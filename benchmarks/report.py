"""Tables and plots of a batching benchmark report (see benchmarks/batching.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

README = Path(__file__).resolve().parent / "README.md"
PHASE_ORDER = ("quiet", "medium", "burst")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def table(report: dict[str, Any]) -> str:
    """A markdown table per model: every setting's overall figures and per-level mean latency."""
    lines = []
    for model, m in report["models"].items():
        lines.append(f"**{model}** (latency target {m['latency_target_s'] * 1000:.0f} ms; offline limit "
                     f"L = {max(m['offline_limit_per_s'].values()):.0f}/s at its best batch; pipeline capacity "
                     f"T = {m['capacity_per_s']:.0f}/s with {m.get('capacity_setting', 'adaptive')}; {m['trace_tasks']} tasks; "
                     f"median of {m.get('rounds', 1)} interleaved round(s), mean's min-max in brackets)")
        lines.append("")
        lines.append("| setting | mean ms | p50 ms | p99 ms | tasks/s | drain tasks/s | jitter | mean batch | "
                     "quiet mean ms | medium mean ms | burst mean ms |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, r in m["runs"].items():
            phases = [r["phases"].get(p, {}).get("mean_ms") for p in PHASE_ORDER]
            cells = [f"{v:.1f}" if v is not None else "-" for v in phases]
            sp = r.get("spread", {}).get("mean_ms")
            mean = f"{r['mean_ms']:.1f}" + (f" ({sp[0]:.0f}-{sp[1]:.0f})" if sp and r.get("rounds", 1) > 1 else "")
            lines.append(
                f"| {name} | {mean} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                f"{r['throughput_per_s']:.0f} | {_num(r.get('drain_per_s'))} | {r['jitter']:.2f} | "
                f"{r['mean_batch_size']:.1f} | "
                + " | ".join(cells) + " |"
            )
        v = m["verdict"]
        if "vs_default" in v:
            d = v["vs_default"]
            jr = f"{d['jitter_ratio']:.2f}x" if d["jitter_ratio"] else "-"
            lines.append("")
            drain = d.get("drain_throughput_change")
            lines.append(f"Adaptive vs fixed 32/10ms: mean latency {d['mean_latency_change']:+.0%}, "
                         f"p99 {d['p99_change']:+.0%}, throughput {d['throughput_change']:+.0%} over the trace"
                         + (f" and {drain:+.0%} while draining a backlog" if drain is not None else "")
                         + f", jitter {jr} lower.")
        losses = [f"{k} ({', '.join(c for c, ok in crit.items() if not ok)})"
                  for k, crit in v["beats_every_fixed"].items() if not all(crit.values())]
        lines.append(f"Beats every single fixed setting on mean, p99, throughput and drain throughput: "
                     f"{'yes' if not losses else 'no, not ' + '; '.join(losses)}.")
        levels = ", ".join(
            f"{p}: {x['adaptive_mean_ms']:.1f} vs {x['best_mean_ms']:.1f} ms ({x['best_fixed']})"
            + ("" if x["within_10pct"] else " **over 10 %**")
            for p, x in v["per_level"].items()
        )
        lines.append(f"Per level, adaptive vs the best fixed setting (mean latency): {levels}.")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict[str, Any], model: str, path: Path) -> None:
    """Latency and batch size over time on the bursty trace, plus mean latency per load level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = report["models"][model]
    runs = m["runs"]
    fixed = [k for k in runs if k != "adaptive"]
    best = min(fixed, key=lambda k: runs[k]["mean_ms"] or np.inf) if fixed else None  # over the whole trace
    shown = list(dict.fromkeys(k for k in ("adaptive", "fixed 32/10ms", best, "fixed 1/0ms") if k in runs))
    fig, axes = plt.subplots(3, 1, figsize=(10, 10))
    colors = {name: f"C{i}" for i, name in enumerate(runs)}  # one colour per setting in every panel
    for name in shown:
        tl = runs[name]["timeline"]
        axes[0].plot(tl["t_s"], tl["latency_ms"], label=name, color=colors[name])
        axes[1].plot(tl["t_s"], tl["batch_size"], label=name, color=colors[name])
    phase_s = m["phase_s"]
    from benchmarks.batching import PHASES

    for ax in axes[:2]:
        for k in range(len(PHASES) * m["repeats"]):
            name = PHASES[k % len(PHASES)][0]
            if name == "burst":
                ax.axvspan(k * phase_s, (k + 1) * phase_s, color="tab:red", alpha=0.08)
        ax.legend()
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean end-to-end latency (ms, 0.25 s bins)")
    axes[0].set_yscale("log")
    axes[0].set_title(f"{model}: bursty trace through Kafka (red: burst at 2x capacity)")
    axes[1].set_ylabel("mean batch size")
    axes[1].set_xlabel("time since trace start (s)")
    names = list(runs)
    x = np.arange(len(PHASE_ORDER))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        vals = [runs[name]["phases"].get(p, {}).get("mean_ms", np.nan) for p in PHASE_ORDER]
        axes[2].bar(x + i * width, vals, width, label=name, color=colors[name])
    axes[2].set_xticks(x + 0.4 - width / 2, [f"{p}" for p in PHASE_ORDER])
    axes[2].set_yscale("log")
    axes[2].set_ylabel("mean latency (ms) per load level")
    axes[2].legend(fontsize=7, ncol=3)
    axes[2].grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def update_readme(report: dict[str, Any], stamp: str) -> None:
    """Replace the block between the result markers in benchmarks/README.md."""
    text = README.read_text()
    pics = "\n".join(f"![{m}](results/{stamp}-{m}-trace.png)" for m in report["models"])
    block = (f"<!-- results:start -->\nRun `{stamp}` on {report['machine']['cores']} cores, "
             f"torch {report['machine']['torch']} on {report['machine']['device']}, broker: {report['broker']}. "
             f"Raw data: `results/{stamp}-batching.json`.\n\n{table(report)}\n{pics}\n<!-- results:end -->")
    text = re.sub(r"<!-- results:start -->.*<!-- results:end -->", block, text, flags=re.S)
    README.write_text(text)
