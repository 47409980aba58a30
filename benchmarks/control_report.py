"""Tables and plots of a figure C report (see benchmarks/control.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

README = Path(__file__).resolve().parent / "README.md"
#: a result produced this long after a pause was acknowledged was fetched after it
LATE_S = 1.0
#: BENCHMARKS.md, figure C: p99 on loopback
TARGET_P99_MS = 100.0


def table(report: dict[str, Any]) -> str:
    """Markdown: p50 / p99 / max per broker and command, then the checks per broker."""
    lines = ["| broker | command | acked by every worker (ms) | acked, per worker (ms) | applied by every worker "
             "(ms) | every worker serving again (ms) |",
             "|---|---|---:|---:|---:|---:|"]

    def f(p: dict[str, Any] | None) -> str:
        if not p or p["p50"] is None:
            return "-"
        return " / ".join(f"{p[k]:.1f}" for k in ("p50", "p99", "max"))

    for r in report["brokers"].values():
        s = r["summary"]
        for cmd in ("pause", "resume"):
            c = s[cmd]
            lines.append(f"| {r['broker']} | {cmd} | {f(c['acked_all'])} | {f(c['acked_per_worker'])} | "
                         f"{f(c['applied_all'])} | {f(c.get('serving_again_all'))} |")
    lines += ["", "Cells are p50 / p99 / max over the cycles (with so few samples p99 is close to the max).", ""]
    for r in report["brokers"].values():
        s = r["summary"]
        lines.append(
            f"- {r['broker']}: {len(r['cycles'])} cycles, {len(r['workers'])} workers, {r['rate_per_s']:.0f} "
            f"tasks/s offered. Results produced more than {LATE_S:.0f} s after a pause was acknowledged: "
            f"**{s['late_results']}**; results of tasks created after it, before the resume: "
            f"**{s['served_while_paused']}**; {r['tasks_sent']} tasks, {r['results']} results, {r['lost']} lost, "
            f"{r['duplicates']} duplicates. One broker hop (produce acks=all, read back) p50 "
            f"{s['echo']['p50']:.1f} ms: a pause round trip is {s['pause']['acked_over_two_echo_p50']:.1f}x two "
            f"hops. Target p99 < {TARGET_P99_MS:.0f} ms: acknowledged "
            f"{'met' if s['meets_target_acked'] else '**not met**'}, applied "
            f"{'met' if s['meets_target_applied'] else '**not met**'}.")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Per broker: latency per cycle (pause, resume; per worker dots) and results per 100 ms with pauses shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(report["brokers"])
    fig, axes = plt.subplots(2, len(kinds), figsize=(7 * len(kinds), 8), squeeze=False)
    for col, kind in enumerate(kinds):
        r = report["brokers"][kind]
        ax = axes[0][col]
        for cmd, color in (("pause", "C3"), ("resume", "C2")):
            xs = [row["cycle"] for row in r["cycles"]]
            ax.plot(xs, [row[cmd]["acked_max_ms"] for row in r["cycles"]], marker="o", color=color,
                    label=f"{cmd}: acked by every worker")
            for row in r["cycles"]:
                ys = list(row[cmd]["acked_ms"].values())
                ax.scatter([row["cycle"]] * len(ys), ys, s=8, color=color, alpha=0.35)
        ax.plot([row["cycle"] for row in r["cycles"]], [row["serving_again_all_ms"] for row in r["cycles"]],
                marker="x", linestyle=":", color="C2", label="resume: every worker serving again")
        ax.axhline(TARGET_P99_MS, color="grey", linestyle="--", label="target p99")
        ax.set_yscale("log")
        ax.set_title(f"{r['broker']}: control latency per cycle")
        ax.set_xlabel("cycle")
        ax.set_ylabel("issued -> acknowledged (ms, log)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax = axes[1][col]
        counts = r["results_per_100ms"]
        ax.plot(np.arange(len(counts)) * 0.1, np.asarray(counts) * 10.0, color="C0", lw=0.8)
        for row in r["cycles"]:
            ax.axvspan(row["paused_ms"] / 1000.0, row["resume_issued_ms"] / 1000.0, color="C3", alpha=0.12)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("results/s (100 ms bins; red: paused)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def update_readme(report: dict[str, Any], stamp: str) -> None:
    """Replace the block between the figure C markers in benchmarks/README.md."""
    m = report["machine"]
    block = (f"<!-- control:start -->\nRun `{stamp}` on {m['cores']} cores (shared with the broker, three workers "
             f"and the load generator), {m['platform']}. Raw data: `results/{stamp}-control.json`.\n\n"
             f"{table(report)}\n\n![figure C](results/{stamp}-control.png)\n<!-- control:end -->")
    text = README.read_text()
    README.write_text(re.sub(r"<!-- control:start -->.*<!-- control:end -->", lambda _: block, text, flags=re.S))
