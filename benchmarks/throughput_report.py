"""Figures O/T: the summary of the raw drains, the table and the plot (see benchmarks/throughput.py).

Pure functions of the report's ``drains`` and ``limits``; no broker. Every ratio
pairs two things measured in the same round of the same run (BENCHMARKS.md).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

README = Path(__file__).resolve().parent / "README.md"
KAFKA = "Apache Kafka 4.1.1 (KRaft, single node)"
EMBEDDED = "embedded (Tansu)"
#: issue 10, "Done when": (model, figure, comparison, threshold, wording)
TARGETS = (
    ("digits-linear", "worker_vs_lean_tasks_per_s", ">=", 0.9, "worker >= 0.9x the lean aiokafka loop's tasks/s"),
    ("digits-linear", "worker_vs_lean_cpu", "<=", 1.2, "worker CPU/task <= 1.2x the lean loop's"),
    ("digits-linear", "worker_vs_faust_tasks_per_s", ">=", 2.5, "worker >= 2.5x the faust take() agent's tasks/s"),
    ("digits", "worker_t_over_l", ">=", 0.35, "worker T/L >= 0.35"),
    ("minilm", "worker_t_over_l", ">=", 0.9, "worker T/L >= 0.9"),
)
#: the demo is limited by the worker when the lean loop drains this much faster on the same broker
DEMO_MARGIN = 1.25


def stat(values: list[float | None]) -> dict[str, float] | None:
    """Median, min, max and count of the values that are not None; None when there are none."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return None
    return {"median": float(np.median(v)), "min": min(v), "max": max(v), "n": len(v)}


def drain_figures(d: dict[str, Any]) -> dict[str, float | None]:
    """One drain's figures, None unless the drain is complete.

    Returns:
        ``tasks_per_s``: results between the interior ranks (see
        :func:`benchmarks.drain_io.interior`: 5 % and 95 % of the backlog) over the span between
        their record timestamps (stamped by the candidate's producer), s; ``cpu_us_per_task``: the
        process's CPU (us) between the polls that saw those counts, over the results in between;
        ``window_tasks_per_s``: the same results over the same polls' span; and
        ``tasks_per_s_first_last`` (first to last result: biased up by one batch, the first, whose
        service time it leaves out). A drain recorded without interior figures (before they
        existed) falls back to first-to-last.
    """
    keys = ("tasks_per_s", "cpu_us_per_task", "window_tasks_per_s", "tasks_per_s_first_last")
    out: dict[str, float | None] = dict.fromkeys(keys)
    w = d.get("window")
    if not d.get("complete") or not w:
        return out
    span_s = (d["last_ts_ms"] - d["first_ts_ms"]) / 1000.0
    if span_s > 0 and d["unique"] > 1:
        out["tasks_per_s_first_last"] = (d["unique"] - 1) / span_s
    it = d.get("interior_ts")
    if it is None:
        out["tasks_per_s"] = out["tasks_per_s_first_last"]
    elif it["closes_ms"] > it["opens_ms"]:
        out["tasks_per_s"] = (it["closes"] - it["opens"]) / ((it["closes_ms"] - it["opens_ms"]) / 1000.0)
    if w["results"] > 0:
        out["cpu_us_per_task"] = w["cpu_s"] * 1e6 / w["results"]
        out["window_tasks_per_s"] = w["results"] / w["s"] if w["s"] > 0 else None
    return out


def best_limit(limit: dict[str, dict[str, float]]) -> tuple[str, dict[str, float]]:
    """The batch size with the highest items/s of one figure-L measurement, and its figures."""
    return max(limit.items(), key=lambda kv: kv[1]["items_per_s"])


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(drains: list[dict[str, Any]], limits: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians (min-max) per broker, model and candidate; T/L and ratios paired by round; the targets."""
    out: dict[str, Any] = {"limits": {}, "brokers": {}}
    for model, per_round in limits.items():
        bests = [best_limit(lim) for lim in per_round]
        out["limits"][model] = {"items_per_s": stat([b[1]["items_per_s"] for b in bests]),
                                "cpu_us_per_item": stat([b[1]["cpu_us_per_item"] for b in bests]),
                                "best_batch": [int(b[0]) for b in bests]}
    figs = [(d, drain_figures(d)) for d in drains]
    index = {(d["broker"], d["model"], d["round"], d["candidate"]): f for d, f in figs}
    for d, f in figs:
        key = (d["broker"], d["model"], d["round"])
        per_round = limits.get(d["model"], [])
        lim = best_limit(per_round[min(d["round"], len(per_round) - 1)])[1]["items_per_s"] if per_round else None
        lean, faust = index.get((*key, "lean"), {}), index.get((*key, "faust"), {})
        f["t_over_l"] = _ratio(f["tasks_per_s"], lim)
        f["vs_lean_tasks_per_s"] = _ratio(f["tasks_per_s"], lean.get("tasks_per_s"))
        f["vs_lean_cpu"] = _ratio(f["cpu_us_per_task"], lean.get("cpu_us_per_task"))
        f["vs_faust_tasks_per_s"] = _ratio(f["tasks_per_s"], faust.get("tasks_per_s"))
    groups: dict[tuple[str, str, str], list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for d, f in figs:
        groups.setdefault((d["broker"], d["model"], d["candidate"]), []).append((d, f))
    for (broker, model, cand), rows in groups.items():
        cell = {k: stat([f[k] for _, f in rows]) for k in rows[0][1]}
        cell.update({"rounds": len(rows), "tasks": rows[0][0]["tasks"],
                     "complete": all(d["complete"] for d, _ in rows),
                     "duplicates": sum(d["duplicates"] for d, _ in rows),
                     "not_ok": sum(d["not_ok"] for d, _ in rows),
                     "committed_all": all(d["committed"] in (None, d["tasks"]) for d, _ in rows)})
        out["brokers"].setdefault(broker, {}).setdefault(model, {})[cand] = cell
    out["load_avg_1m"] = stat([d.get(k) for d in drains for k in ("load_avg_1m_before", "load_avg_1m_after")])
    out["targets"] = targets(out)
    out["demo"] = demo(out)
    return out


def _median(cell: dict[str, Any] | None, key: str) -> float | None:
    s = (cell or {}).get(key)
    return s["median"] if s else None


def targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 10's "Done when" figures on Apache Kafka, where this run measured them."""
    kafka = summary["brokers"].get(KAFKA, {})
    out = []
    for model, figure, op, threshold, wording in TARGETS:
        worker = kafka.get(model, {}).get("worker")
        key = {"worker_vs_lean_tasks_per_s": "vs_lean_tasks_per_s", "worker_vs_lean_cpu": "vs_lean_cpu",
               "worker_vs_faust_tasks_per_s": "vs_faust_tasks_per_s", "worker_t_over_l": "t_over_l"}[figure]
        value = _median(worker, key)
        if value is None:
            continue
        met = value >= threshold if op == ">=" else value <= threshold
        out.append({"model": model, "figure": figure, "value": value, "target": f"{op} {threshold}",
                    "wording": wording, "met": bool(met)})
    return out


def demo(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The embedded broker against Apache Kafka for the worker and the lean loop (digits-linear),
    and which one limits ``autoglm demo`` (the worker on the embedded broker)."""
    emb = summary["brokers"].get(EMBEDDED, {}).get("digits-linear", {})
    kafka = summary["brokers"].get(KAFKA, {}).get("digits-linear", {})
    we, le = _median(emb.get("worker"), "tasks_per_s"), _median(emb.get("lean"), "tasks_per_s")
    if we is None or le is None:
        return None
    wk, lk = _median(kafka.get("worker"), "tasks_per_s"), _median(kafka.get("lean"), "tasks_per_s")
    limiter = "the worker" if le >= DEMO_MARGIN * we else "the broker"
    return {"worker_embedded": we, "lean_embedded": le, "worker_kafka": wk, "lean_kafka": lk,
            "lean_over_worker_embedded": le / we, "worker_embedded_over_kafka": _ratio(we, wk),
            "lean_embedded_over_kafka": _ratio(le, lk), "limits_demo": limiter}


# -- presentation -----------------------------------------------------------------------------------------


def _cell(s: dict[str, float] | None, fmt: str = "{:,.0f}") -> str:
    if not s:
        return "-"
    text = fmt.format(s["median"])
    return text + (f" ({fmt.format(s['min'])}-{fmt.format(s['max'])})" if s["n"] > 1 else "")


def table(report: dict[str, Any]) -> str:
    """Markdown: per model, every candidate's tasks/s, CPU us/task, T/L and ratios; targets; the demo."""
    s, labels = report["summary"], {k: v["label"] for k, v in report["settings"]["candidates"].items()}
    lines: list[str] = []
    kafka = s["brokers"].get(KAFKA, {})
    for model, cands in kafka.items():
        lim = s["limits"].get(model, {})
        lines += [f"**{model}** (Apache Kafka; median of {max(c['rounds'] for c in cands.values())} round(s), "
                  "min-max in brackets; ratios paired by round)", "",
                  "| consumer | tasks | tasks/s | CPU us/task | T/L | tasks/s vs lean | CPU vs lean |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for cand, c in cands.items():
            flag = "" if c["complete"] and c["committed_all"] else " **incomplete**"
            lines.append(f"| {labels.get(cand, cand)}{flag} | {c['tasks']:,} | {_cell(c['tasks_per_s'])} | "
                         f"{_cell(c['cpu_us_per_task'])} | {_cell(c['t_over_l'], '{:.3f}')} | "
                         f"{_cell(c['vs_lean_tasks_per_s'], '{:.2f}x')} | {_cell(c['vs_lean_cpu'], '{:.2f}x')} |")
        if lim:
            lines.append(f"| the model alone, in-process (L), best batch {'/'.join(map(str, lim['best_batch']))} | - | "
                         f"{_cell(lim['items_per_s'])} | {_cell(lim['cpu_us_per_item'])} | 1 | - | - |")
        lines.append("")
    if s.get("load_avg_1m"):
        la = s["load_avg_1m"]
        lines += [f"Load average (1 min) of the machine around the drains: median {la['median']:.1f}, "
                  f"{la['min']:.1f}-{la['max']:.1f} (on {report.get('machine', {}).get('cores', '?')} cores).", ""]
    if s["targets"]:
        lines.append("Issue 10's targets (Apache Kafka, medians): " + "; ".join(
            f"{t['model']} {t['wording']}: {t['value']:.2f} {'met' if t['met'] else '**not met**'}"
            for t in s["targets"]) + ".")
        lines.append("")
    d = s.get("demo")
    if d:
        lines += ["| digits-linear | Apache Kafka tasks/s | embedded (Tansu) tasks/s | embedded / Kafka |",
                  "|---|---:|---:|---:|",
                  f"| {labels.get('worker', 'worker')} | {d['worker_kafka'] or 0:,.0f} | {d['worker_embedded']:,.0f} | "
                  f"{d['worker_embedded_over_kafka'] or 0:.2f} |",
                  f"| {labels.get('lean', 'lean')} | {d['lean_kafka'] or 0:,.0f} | {d['lean_embedded']:,.0f} | "
                  f"{d['lean_embedded_over_kafka'] or 0:.2f} |", "",
                  f"On the embedded broker the lean loop drains {d['lean_over_worker_embedded']:.1f}x as fast as "
                  f"the worker: `autoglm demo` (the worker on the embedded broker) is limited by "
                  f"**{d['limits_demo']}**.", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Per model: tasks/s (log) and CPU us/task per candidate, min-max whiskers; L and the model's CPU as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["summary"]
    kafka = s["brokers"].get(KAFKA, {})
    emb = s["brokers"].get(EMBEDDED, {})
    models = list(kafka)
    if not models:
        return
    fig, axes = plt.subplots(2, len(models), figsize=(5.5 * len(models), 8), squeeze=False)
    for col, model in enumerate(models):
        cells = [(c, v) for c, v in kafka[model].items()] + [(f"{c}\n(embedded)", v) for c, v in
                                                              emb.get(model, {}).items()]
        names = [c for c, _ in cells]
        for row, key, limit_key, ylabel in ((0, "tasks_per_s", "items_per_s", "tasks/s (log)"),
                                            (1, "cpu_us_per_task", "cpu_us_per_item", "CPU us per task (log)")):
            ax = axes[row][col]
            med = [v[key]["median"] if v[key] else np.nan for _, v in cells]
            lo = [m - v[key]["min"] if v[key] else 0 for m, (_, v) in zip(med, cells)]
            hi = [v[key]["max"] - m if v[key] else 0 for m, (_, v) in zip(med, cells)]
            colors = ["C3" if n.startswith("worker") else "C0" for n in names]
            bars = ax.bar(range(len(cells)), med, yerr=[lo, hi], color=colors, capsize=3)
            ax.bar_label(bars, labels=["" if np.isnan(m) else f"{m:,.0f}" for m in med], fontsize=7,
                         label_type="center", color="white")
            lim = s["limits"].get(model, {}).get(limit_key)
            if lim:
                ax.axhline(lim["median"], color="grey", linestyle="--", label="the model alone (L, best batch)")
                ax.legend(fontsize=8)
            ax.set_xticks(range(len(cells)), names, fontsize=8, rotation=30)
            ax.set_yscale("log")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3, axis="y")
        axes[0][col].set_title(f"{model}: backlog drains (median, min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def update_readme(report: dict[str, Any], stamp: str) -> None:
    """Replace the block between the figure O/T markers in benchmarks/README.md (appended when missing)."""
    m = report["machine"]
    block = (f"<!-- throughput:start -->\nRun `{stamp}` on {m['cores']} cores ({m.get('cpu', '')}), shared with the "
             f"broker; torch {m['torch']} on {m['device']}, {m['torch_threads']} torch thread(s); aiokafka "
             f"{m['aiokafka']}, faust {m['faust']}, confluent-kafka {m['confluent_kafka']} (librdkafka "
             f"{m['librdkafka']}). Command: `{report['command']}`. Raw data: `results/{stamp}-throughput.json`."
             f"\n\n{table(report)}\n![figure O/T](results/{stamp}-throughput.png)\n<!-- throughput:end -->")
    text = README.read_text()
    if "<!-- throughput:start -->" not in text:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    else:
        text = re.sub(r"<!-- throughput:start -->.*<!-- throughput:end -->", lambda _: block, text, flags=re.S)
    README.write_text(text)
