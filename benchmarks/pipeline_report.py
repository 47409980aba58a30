"""Figures, table and plot of the pipeline benchmark (see :mod:`benchmarks.pipeline`); pure, no broker.

Terms (every time in ms):

- **latency**: a task's ``created_ms`` (stamped by the load generator as it sends) to the
  receipt of its result by the benchmark's reader (wall clock, the same machine);
- **e2e**: the result's own ``end_to_end_ms`` (``created_ms`` to the moment the worker built the
  result, before it was produced);
- **steps**: the sum over the steps that ran of their ``queue_ms`` (worker receipt to the start
  of the step's forward: batching wait and the batches ahead) and ``inference_ms`` (the forward);
- **outside** = e2e - steps: the task's time in the worker outside any step, and in Kafka before
  the last step: the input topic (send -> fetch -> decode) plus, for a task that ran a later
  step, each intermediate hop (hop encode -> produce -> fetch -> decode);
- **results transit** = latency - e2e: the result's produce, the broker, the reader's fetch.

A **route** is the tuple of steps a task ran (``first`` or ``first+second`` in digits-routing);
a route of k steps crosses k + 1 Kafka topics (input, k - 1 hops, results).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

README = Path(__file__).resolve().parent / "README.md"
START, END = "<!-- pipeline:start -->", "<!-- pipeline:end -->"


# -- small helpers ----------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (numpy's linear interpolation) of ``values``; None when empty."""
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else None


def batch_mean(task_batch_sizes: Sequence[int]) -> float | None:
    """Mean batch size per batch from each task's ``batch_size``.

    A batch of ``s`` tasks appears ``s`` times among the tasks, so the per-task mean weighs a
    batch by its size; counting each task as ``1 / s`` of a batch gives the number of batches,
    and tasks / batches the mean per batch (the harmonic mean of the per-task sizes).
    None when empty; sizes must be >= 1.
    """
    if not len(task_batch_sizes):
        return None
    sizes = np.asarray(task_batch_sizes, dtype=float)
    if (sizes < 1).any():
        raise ValueError(f"batch sizes must be >= 1, got {sizes.min():g}")
    return float(len(sizes) / np.sum(1.0 / sizes))


def chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """``items`` in consecutive slices of ``size`` (the last one shorter); ``size`` >= 1."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    return [items[i:i + size] for i in range(0, len(items), size)]


def route_of(doc: dict[str, Any]) -> str:
    """The steps a result's task ran, joined by ``+`` in the order they ran (``-`` when none)."""
    return "+".join(s["step"] for s in doc.get("steps") or ()) or "-"


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``; None when either is missing or ``b`` is 0."""
    return a / b if a is not None and b else None


# -- the pipeline's results ------------------------------------------------------------------


def task_times(doc: dict[str, Any], received_ms: float, created_ms: float) -> dict[str, Any]:
    """One answered task's times (module docstring) from its result document and the clocks.

    Args:
        doc: the decoded result (``end_to_end_ms``, ``steps`` with ``queue_ms``/``inference_ms``).
        received_ms: wall-clock ms at which the reader got it.
        created_ms: the task's ``created_ms``.
    """
    steps = doc.get("steps") or ()
    e2e = float(doc.get("end_to_end_ms") or 0.0)
    in_steps = sum(float(s["queue_ms"]) + float(s["inference_ms"]) for s in steps)
    latency = received_ms - created_ms
    return {"route": route_of(doc), "latency_ms": latency, "e2e_ms": e2e, "steps_ms": in_steps,
            "outside_ms": e2e - in_steps, "results_transit_ms": latency - e2e,
            "steps": [{"step": s["step"], "batch_size": int(s["batch_size"]), "queue_ms": float(s["queue_ms"]),
                       "inference_ms": float(s["inference_ms"])} for s in steps]}


def latency_figures(tasks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Percentiles of :func:`task_times` records: overall, per route, per step.

    Returns:
        ``tasks``; ``latency_p50_ms``/``p99``, ``e2e_p50_ms``/``p99``, ``mean_ms``; ``routes``:
        per route ``tasks``, ``latency_p50_ms``, ``latency_p99_ms``, ``outside_p50_ms``,
        ``results_transit_p50_ms``, ``steps_p50_ms``; ``steps``: per step ``tasks``,
        ``queue_p50_ms``, ``inference_p50_ms``, ``batch_mean`` (per batch); ``hop_p50_ms``: the
        median ``outside`` of the longest route less the shortest's over the hops between them
        (what one intermediate hop adds; None with one route).
    """
    lat = [t["latency_ms"] for t in tasks]
    out: dict[str, Any] = {"tasks": len(tasks), "latency_p50_ms": pct(lat, 50), "latency_p99_ms": pct(lat, 99),
                           "mean_ms": float(np.mean(lat)) if lat else None,
                           "e2e_p50_ms": pct([t["e2e_ms"] for t in tasks], 50),
                           "e2e_p99_ms": pct([t["e2e_ms"] for t in tasks], 99),
                           "results_transit_p50_ms": pct([t["results_transit_ms"] for t in tasks], 50),
                           "routes": {}, "steps": {}}
    for route in sorted({t["route"] for t in tasks}, key=lambda r: (r.count("+"), r)):
        mine = [t for t in tasks if t["route"] == route]
        out["routes"][route] = {
            "tasks": len(mine), "latency_p50_ms": pct([t["latency_ms"] for t in mine], 50),
            "latency_p99_ms": pct([t["latency_ms"] for t in mine], 99),
            "outside_p50_ms": pct([t["outside_ms"] for t in mine], 50),
            "results_transit_p50_ms": pct([t["results_transit_ms"] for t in mine], 50),
            "steps_p50_ms": pct([t["steps_ms"] for t in mine], 50)}
    per_step: dict[str, list[dict[str, Any]]] = {}
    for t in tasks:
        for s in t["steps"]:
            per_step.setdefault(s["step"], []).append(s)
    for step, records in per_step.items():
        out["steps"][step] = {"tasks": len(records), "queue_p50_ms": pct([s["queue_ms"] for s in records], 50),
                              "queue_p99_ms": pct([s["queue_ms"] for s in records], 99),
                              "inference_p50_ms": pct([s["inference_ms"] for s in records], 50),
                              "batch_mean": batch_mean([s["batch_size"] for s in records])}
    routes = out["routes"]
    out["hop_p50_ms"] = None
    if len(routes) > 1:
        short, long_ = min(routes, key=lambda r: r.count("+")), max(routes, key=lambda r: r.count("+"))
        hops = long_.count("+") - short.count("+")
        if hops:
            out["hop_p50_ms"] = (routes[long_]["outside_p50_ms"] - routes[short]["outside_p50_ms"]) / hops
    return out


def step_batch_means(docs: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Per step, the mean batch size per batch (:func:`batch_mean`) over the results' ``steps``."""
    sizes: dict[str, list[int]] = {}
    for doc in docs:
        for s in doc.get("steps") or ():
            sizes.setdefault(s["step"], []).append(int(s["batch_size"]))
    return {step: batch_mean(v) for step, v in sizes.items()}


def drain_rate(timestamps_ms: Sequence[float], n: int, window: tuple[float, float] = (0.05, 0.95)) -> float | None:
    """Tasks/s of a backlog drain: the results ranked ``ceil(lo * n)`` to ``ceil(hi * n)`` (in time
    order) over the span of their record timestamps (see :func:`benchmarks.drain_io.interior`:
    start-up and the first and last batches bias nothing). None when fewer than ``n`` results or
    a zero span."""
    from benchmarks.drain_io import interior

    if len(timestamps_ms) < n or n < 2:
        return None
    opens, closes = interior(n, window)
    ts = sorted(timestamps_ms)
    span_s = (ts[closes - 1] - ts[opens - 1]) / 1000.0
    return (closes - opens) / span_s if span_s > 0 else None


# -- the in-process baseline ------------------------------------------------------------------


def baseline_figures(latencies_ms: Sequence[float], routes: Sequence[str]) -> dict[str, Any]:
    """One-at-a-time latencies of the in-process chain: overall and per route (as :func:`latency_figures`)."""
    out: dict[str, Any] = {"tasks": len(latencies_ms), "latency_p50_ms": pct(latencies_ms, 50),
                           "latency_p99_ms": pct(latencies_ms, 99),
                           "mean_ms": float(np.mean(latencies_ms)) if len(latencies_ms) else None, "routes": {}}
    for route in sorted(set(routes), key=lambda r: (r.count("+"), r)):
        mine = [v for v, r in zip(latencies_ms, routes) if r == route]
        out["routes"][route] = {"tasks": len(mine), "latency_p50_ms": pct(mine, 50), "latency_p99_ms": pct(mine, 99)}
    return out


# -- one round, the comparison ----------------------------------------------------------------


def compare(pipe: dict[str, Any], base: dict[str, Any], pipe_rate: float | None, base_rate: float | None,
            pipe_cpu_us: float | None = None, base_cpu_us: float | None = None) -> dict[str, Any]:
    """The round's ratios and overheads: pipeline (Kafka) against the in-process chain.

    Args:
        pipe, base: :func:`latency_figures` of the pipeline, :func:`baseline_figures` of the chain.
        pipe_rate, base_rate: tasks/s draining a backlog, in batches.
        pipe_cpu_us, base_cpu_us: CPU us per task while draining.

    Returns:
        ``p50_ratio``, ``p99_ratio``, ``throughput_ratio``, ``cpu_ratio`` (pipeline / in-process);
        ``overhead_p50_ms`` (pipeline p50 - in-process p50) and per route ``overhead_p50_ms``
        and ``per_topic_ms``: the route's overhead over the Kafka topics it crosses (steps + 1).
    """
    out: dict[str, Any] = {
        "p50_ratio": ratio(pipe["latency_p50_ms"], base["latency_p50_ms"]),
        "p99_ratio": ratio(pipe["latency_p99_ms"], base["latency_p99_ms"]),
        "throughput_ratio": ratio(pipe_rate, base_rate), "cpu_ratio": ratio(pipe_cpu_us, base_cpu_us),
        "overhead_p50_ms": (pipe["latency_p50_ms"] - base["latency_p50_ms"]
                            if pipe["latency_p50_ms"] is not None and base["latency_p50_ms"] is not None else None),
        "routes": {}}
    for route, r in pipe["routes"].items():
        b = base["routes"].get(route)
        if b is None or r["latency_p50_ms"] is None or b["latency_p50_ms"] is None:
            continue
        over = r["latency_p50_ms"] - b["latency_p50_ms"]
        out["routes"][route] = {"overhead_p50_ms": over, "topics": route.count("+") + 2,
                                "per_topic_ms": over / (route.count("+") + 2)}
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested dicts of numbers as ``{"a.b.c": number}`` (None and non-numbers left out)."""
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def median_rounds(rounds: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per flattened figure (:func:`flatten`) over the rounds: ``median``, ``min``, ``max``, ``n``."""
    flat = [flatten(r) for r in rounds]
    keys = dict.fromkeys(k for f in flat for k in f)
    out = {}
    for k in keys:
        vals = [f[k] for f in flat if k in f]
        out[k] = {"median": float(np.median(vals)), "min": min(vals), "max": max(vals), "n": len(vals)}
    return out


# -- the table -------------------------------------------------------------------------------


def _f(summary: dict[str, dict[str, float]], key: str, fmt: str = "{:.1f}", spread: bool = True) -> str:
    s = summary.get(key)
    if s is None:
        return "-"
    text = fmt.format(s["median"])
    if spread and s["n"] > 1:
        text += f" ({fmt.format(s['min'])}-{fmt.format(s['max'])})"
    return text


def table(report: dict[str, Any]) -> str:
    """Markdown: per pipeline, the headline figures (median over rounds, min-max in brackets), the
    overhead per route and per Kafka topic, and the per-step figures of the latency run."""
    lines: list[str] = []
    for name, case in report["pipelines"].items():
        s = case["summary"]
        n = len(case["rounds"])
        settings = case["settings"]
        lines += [f"**{name}** ({n} round(s); latency run: open-loop Poisson at {settings['rate_per_s']:g} tasks/s for "
                  f"{settings['latency_s']:g} s; drain: a backlog of {settings['drain_tasks']} tasks; in-process "
                  f"batches {_f(s, 'base.batch_sizes.' + case['steps'][0], '{:.0f}', False)}"
                  + "".join(f" / {_f(s, 'base.batch_sizes.' + st, '{:.0f}', False)}" for st in case['steps'][1:])
                  + " (the drain's mean per step))", "",
                  "| figure | pipeline on Kafka | in-process chain | pipeline / in-process |",
                  "|---|---:|---:|---:|",
                  f"| latency p50 ms | {_f(s, 'pipe.latency.latency_p50_ms')} | {_f(s, 'base.latency.latency_p50_ms', '{:.2f}')} "
                  f"| {_f(s, 'cmp.p50_ratio', '{:.1f}x', False)} |",
                  f"| latency p99 ms | {_f(s, 'pipe.latency.latency_p99_ms')} | {_f(s, 'base.latency.latency_p99_ms', '{:.2f}')} "
                  f"| {_f(s, 'cmp.p99_ratio', '{:.1f}x', False)} |",
                  f"| in-process, the same tasks back to back (warm), p50 / p99 ms | - | "
                  f"{_f(s, 'base.b2b_latency.latency_p50_ms', '{:.2f}', False)} / "
                  f"{_f(s, 'base.b2b_latency.latency_p99_ms', '{:.2f}', False)} | "
                  f"{_f(s, 'cmp.b2b_p50_ratio', '{:.1f}x', False)} (p50) |",
                  f"| in-process, back to back through ModelRunner.run_sync (the worker's model thread), p50 / p99 ms | - | "
                  f"{_f(s, 'base.runner_latency.latency_p50_ms', '{:.2f}', False)} / "
                  f"{_f(s, 'base.runner_latency.latency_p99_ms', '{:.2f}', False)} | - |",
                  f"| result's end_to_end_ms p50 / p99 | {_f(s, 'pipe.latency.e2e_p50_ms', '{:.1f}', False)} / "
                  f"{_f(s, 'pipe.latency.e2e_p99_ms', '{:.1f}', False)} | - | - |",
                  f"| throughput tasks/s | {_f(s, 'pipe.drain_per_s', '{:,.0f}')} | {_f(s, 'base.tasks_per_s', '{:,.0f}')} "
                  f"| {_f(s, 'cmp.throughput_ratio', '{:.2f}x', False)} |",
                  f"| CPU us/task while draining | {_f(s, 'pipe.cpu_us_per_task', '{:,.0f}')} (worker) "
                  f"| {_f(s, 'base.cpu_us_per_task', '{:,.0f}')} | {_f(s, 'cmp.cpu_ratio', '{:.1f}x', False)} |",
                  f"| hop overhead p50 ms (pipeline p50 - in-process p50) | {_f(s, 'cmp.overhead_p50_ms')} | | |",
                  ""]
        lines += ["| route | tasks per round | pipeline p50 / p99 ms | in-process p50 / p99 ms | overhead p50 ms "
                  "| Kafka topics crossed | overhead per topic ms | outside steps p50 ms | results transit p50 ms |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for route in case["routes"]:
            p, b, c = f"pipe.latency.routes.{route}.", f"base.latency.routes.{route}.", f"cmp.routes.{route}."
            lines.append(f"| {route} | {_f(s, p + 'tasks', '{:.0f}', False)} | {_f(s, p + 'latency_p50_ms', '{:.1f}', False)} / "
                         f"{_f(s, p + 'latency_p99_ms', '{:.1f}', False)} | {_f(s, b + 'latency_p50_ms', '{:.2f}', False)} / "
                         f"{_f(s, b + 'latency_p99_ms', '{:.2f}', False)} | {_f(s, c + 'overhead_p50_ms')} | "
                         f"{_f(s, c + 'topics', '{:.0f}', False)} | {_f(s, c + 'per_topic_ms')} | "
                         f"{_f(s, p + 'outside_p50_ms')} | {_f(s, p + 'results_transit_p50_ms')} |")
        hop = _f(s, "pipe.latency.hop_p50_ms")
        lines += ["", f"One intermediate hop (median outside-steps time of the longest route less the shortest's): "
                      f"{hop} ms.", "",
                  "| step (latency run) | queue p50 ms | queue p99 ms | inference p50 ms | mean batch | "
                  "drain: queue p50 ms | drain: mean batch |", "|---|---:|---:|---:|---:|---:|---:|"]
        for step in case["steps"]:
            p, d = f"pipe.latency.steps.{step}.", f"pipe.drain.steps.{step}."
            lines.append(f"| {step} | {_f(s, p + 'queue_p50_ms', '{:.2f}', False)} | {_f(s, p + 'queue_p99_ms', '{:.1f}', False)} "
                         f"| {_f(s, p + 'inference_p50_ms', '{:.2f}', False)} | {_f(s, p + 'batch_mean', '{:.2f}', False)} "
                         f"| {_f(s, d + 'queue_p50_ms', '{:.0f}', False)} | {_f(s, d + 'batch_mean', '{:.1f}', False)} |")
        lines.append("")
    return "\n".join(lines)


def update_readme(report: dict[str, Any], readme: Path = README) -> None:
    """Replace the block between the pipeline markers of benchmarks/README.md (appended when missing)."""
    m, stamp = report["machine"], report["stamp"]
    block = (f"{START}\nRun `{stamp}` on {m['cores']} cores ({m.get('cpu', '')}), load average "
             f"{', '.join(f'{x:.1f}' for x in m['load_avg_at_start'])} at start; torch {m['torch']} on cpu, "
             f"{m['torch_threads']} torch thread in the worker and the in-process chain; broker: {report['broker']}. "
             f"Command: `{report['command']}`. Raw data: `results/{stamp}-pipeline.json`.\n\n{table(report)}\n"
             f"![pipeline vs in-process](results/{stamp}-pipeline.png)\n{END}")
    text = readme.read_text()
    if START not in text:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    else:
        text = re.sub(re.escape(START) + r".*" + re.escape(END), lambda _: block, text, flags=re.S)
    readme.write_text(text)


# -- the plot --------------------------------------------------------------------------------


def plot(report: dict[str, Any], path: Path) -> None:
    """Per pipeline: latency CDFs (pipeline vs in-process, the median round) and where a task's
    median time goes per route."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    cases = list(report["pipelines"].items())
    fig, axes = plt.subplots(len(cases), 2, figsize=(12, 4.2 * len(cases)), squeeze=False)
    for row, (name, case) in enumerate(cases):
        rounds = case["rounds"]
        order = sorted(range(len(rounds)), key=lambda i: rounds[i]["pipe"]["latency"]["latency_p50_ms"] or 0.0)
        r = rounds[order[len(order) // 2]]
        ax = axes[row][0]
        for label, values in (("pipeline on Kafka (reader receipt)", r["raw"]["pipe_latency_ms"]),
                              ("in-process chain, the same arrivals", r["raw"]["base_latency_ms"])):
            v = np.sort(np.asarray(values))
            if len(v):
                ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=label)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("latency per task, ms (log)")
        ax.set_ylabel("fraction of tasks")
        ax.set_title(f"{name}: latency CDF (round {r['round'] + 1})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax = axes[row][1]
        s = case["summary"]
        routes = case["routes"]
        parts = [("in-process chain p50", lambda rt: s.get(f"base.latency.routes.{rt}.latency_p50_ms")),
                 ("steps: queue + inference", lambda rt: s.get(f"pipe.latency.routes.{rt}.steps_p50_ms")),
                 ("worker outside steps (input topic, hops)", lambda rt: s.get(f"pipe.latency.routes.{rt}.outside_p50_ms")),
                 ("results topic -> reader", lambda rt: s.get(f"pipe.latency.routes.{rt}.results_transit_p50_ms"))]
        x = np.arange(len(routes))
        width = 0.2
        for i, (label, get) in enumerate(parts):
            vals = [(get(rt) or {}).get("median", 0.0) for rt in routes]
            ax.bar(x + (i - 1.5) * width, vals, width, label=label)
        ax.set_xticks(x, routes)
        ax.set_ylabel("median ms")
        ax.set_title(f"{name}: where the time goes (medians over rounds)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
