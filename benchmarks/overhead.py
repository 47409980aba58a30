"""Issue 10, item 3: the model runner's own overhead and the task codec's cost, in-process, no Kafka.

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.overhead                       # digits-linear + digits, batch 1/32/256
    .venv/bin/python -m benchmarks.overhead --models digits-linear --sizes 1,32 --repeats 7
    .venv/bin/python -m benchmarks.overhead --update-readme

**Runner**: ways of serving a batch of ``size`` single-row tasks from their
decoded inputs to one output array per task, each on its own instance of the
registry's model (``--torch-threads`` 1), all driven from one uvloop event
loop, as the worker is: a direct call of ``prepare`` per task + ``collate`` +
``forward`` + the split (the floor), the same in a ``ThreadPoolExecutor(1)``
(the cost of a thread hand-off alone), and :class:`~autoglm.models.runner.ModelRunner`'s
``run`` and ``run_isolated`` (the worker's call), ``prepare`` on the loop
as the worker does. **Codec**: decoding a task and encoding a result with
the project's functions against a plain ``orjson`` + ``base64`` +
``np.frombuffer`` decode and a plain ``orjson.dumps`` of the same result.

Each figure is the median over ``--repeats`` repetitions (candidates
interleaved within a repetition) of items/s over at least ``--min-s``
seconds of calls; us/item is its inverse, and the overhead is the difference
to the baseline of its group (the direct call; the plain codec).

Adding a candidate is one line in :data:`RUNNERS` or :data:`CODEC`: a name, a
``"module:attribute"`` target (imported lazily; a candidate whose target does
not exist in this checkout is skipped and listed as such) and a function of
it; one whose call fails (an API that changed) is skipped with the error. Output:
``benchmarks/results/<stamp>-overhead.json``; ``--update-readme``
rewrites the item-3 section of ``benchmarks/README.md``.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import orjson
import typer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "benchmarks" / "README.md"

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@dataclass(frozen=True)
class Candidate:
    """``make(target, ctx)`` returns the call to time; ``target`` is ``"module:attribute"``, imported lazily."""

    name: str
    target: str
    make: Callable[[Any, "Context"], Callable[[], Any]]
    baseline: bool = False


@dataclass
class Context:
    """What one measurement works on: a model name, a batch size, its decoded inputs and wire records."""

    model: str
    size: int
    inputs: list[Any]            # decoded task inputs (float32 (1, 1, 8, 8) or [text])
    tasks: list[bytes]           # encoded task events
    results: list[Any]           # Result objects, outputs float32 (1, output_dim)
    loop: asyncio.AbstractEventLoop
    closers: list[Callable[[], Any]]


def resolve(target: str) -> Any | None:
    """The object named ``"module:attribute"``, or None when the module or attribute does not exist."""
    module, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


# -- the runner's ways --------------------------------------------------------------------------


def _model(ctx: Context):
    from benchmarks.peers import load_model

    return load_model(ctx.model, "cpu", 1)


def _direct(forward, ctx: Context):
    m = _model(ctx)
    return lambda: forward(m, [m.prepare(x) for x in ctx.inputs])


def _in_thread(forward, ctx: Context):
    m, pool = _model(ctx), ThreadPoolExecutor(1)
    ctx.closers.append(pool.shutdown)

    async def call():
        prepared = [m.prepare(x) for x in ctx.inputs]
        return await ctx.loop.run_in_executor(pool, forward, m, prepared)

    return call


def _runner(cls, ctx: Context, method: str):
    from autoglm.models import default_registry

    runner = cls(default_registry().create(ctx.model), device="cpu", torch_threads=1)
    runner.start_sync()
    ctx.closers.append(runner.close)
    m = runner.model
    if method == "run_isolated":
        return lambda: runner.run_isolated([m.prepare(x) for x in ctx.inputs], timeout_s=30.0)
    return lambda: getattr(runner, method)([m.prepare(x) for x in ctx.inputs])


RUNNERS: list[Candidate] = [
    Candidate("direct: prepare + collate + forward + split", "benchmarks.peers:forward", _direct, baseline=True),
    Candidate("the same in a ThreadPoolExecutor(1)", "benchmarks.peers:forward", _in_thread),
    Candidate("ModelRunner.run_sync", "autoglm.models.runner:ModelRunner", lambda c, x: _runner(c, x, "run_sync")),
    Candidate("ModelRunner.run", "autoglm.models.runner:ModelRunner", lambda c, x: _runner(c, x, "run")),
    Candidate("ModelRunner.run_isolated (the worker's call)", "autoglm.models.runner:ModelRunner",
              lambda c, x: _runner(c, x, "run_isolated")),
]


# -- the codec ----------------------------------------------------------------------------------


def plain_decode(raw: bytes) -> tuple[str, np.ndarray]:
    """The bar for decoding a task: ``orjson.loads`` + ``base64`` + ``np.frombuffer``, no validation.

    Returns ``(id, inputs)``; inputs in the wire's dtype and shape (a read-only view)."""
    doc = orjson.loads(raw)
    t = doc["inputs"]
    return doc["id"], np.frombuffer(base64.b64decode(t["data"]), dtype=t["dtype"]).reshape(t["shape"])


def plain_encode(result) -> bytes:
    """The bar for encoding a result: the same fields as ``encode_result``, one ``orjson.dumps``."""
    out = result.outputs
    return orjson.dumps({
        "schema": "autoglm.result/v1", "id": result.id, "model": result.model, "status": result.status,
        "batch_size": result.batch_size, "worker": result.worker, "queue_ms": result.queue_ms,
        "inference_ms": result.inference_ms, "end_to_end_ms": result.end_to_end_ms,
        "attributes": result.attributes,
        "outputs": {"dtype": out.dtype.name, "shape": list(out.shape),
                    "data": base64.b64encode(out.tobytes()).decode()},
    })


CODEC: list[Candidate] = [
    Candidate("plain decode: orjson + base64 + np.frombuffer", "benchmarks.overhead:plain_decode",
              lambda f, c: lambda: [f(r) for r in c.tasks], baseline=True),
    Candidate("decode_task", "autoglm.streams.events:decode_task", lambda f, c: lambda: [f(r) for r in c.tasks]),
    # the worker's call: the same validation, NaN/inf checked once per poll (streams/pipeline.py)
    Candidate("decode_task(check_finite=False) + one all_finite per batch", "benchmarks.overhead:worker_decode",
              lambda f, c: lambda: f(c.tasks)),
    Candidate("plain encode: orjson.dumps", "benchmarks.overhead:plain_encode",
              lambda f, c: lambda: [f(r) for r in c.results], baseline=True),
    Candidate("encode_result", "autoglm.streams.events:encode_result", lambda f, c: lambda: [f(r) for r in c.results]),
    # the worker's call for ok results: the fields a batch shares serialised once (streams/results.py)
    Candidate("BatchResultEncoder.encode (one encoder per batch)", "benchmarks.overhead:worker_encode",
              lambda f, c: lambda: f(c.results)),
]


def worker_decode(raws: list[bytes]) -> list[Any]:
    """Decode a batch of task records as the worker does: per task without the NaN/inf check, then
    one vectorised check of the batch's arrays."""
    from autoglm.streams.events import decode_task
    from autoglm.streams.results import all_finite

    tasks = [decode_task(r, check_finite=False) for r in raws]
    all_finite([t.inputs for t in tasks if isinstance(t.inputs, np.ndarray)])
    return tasks


def worker_encode(results: list[Any]) -> list[bytes]:
    """Encode a batch's ok results as the worker does: one shared prefix, then per-task fields."""
    from autoglm.streams.results import BatchResultEncoder

    first = results[0]
    encoder = BatchResultEncoder(first.model, first.worker, first.batch_size, first.inference_ms)
    return [encoder.encode(r.id, r.outputs, r.queue_ms, r.end_to_end_ms, r.attributes) for r in results]


# -- measuring -----------------------------------------------------------------------------------


def context(model: str, size: int, loop) -> Context:
    from autoglm.streams.events import Result, Task, encode_task

    from benchmarks.inputs import task_inputs

    inputs_of = task_inputs(model)
    inputs = [inputs_of(i) for i in range(size)]
    tasks = [encode_task(Task(id=f"t-{i}", model=model, inputs=x, created_ms=1_700_000_000_000))
             for i, x in enumerate(inputs)]
    rng = np.random.default_rng(0)
    results = [Result(id=f"t-{i}", model=model, status="ok", outputs=rng.random((1, 10), dtype=np.float32),
                      batch_size=size, worker="bench-1", queue_ms=1.25, inference_ms=0.5, end_to_end_ms=3.5)
               for i in range(size)]
    return Context(model, size, inputs, tasks, results, loop, [])


async def _time(call: Callable[[], Any], min_s: float) -> tuple[int, float]:
    """Calls and seconds: ``call()`` (awaited when it returns an awaitable) until ``min_s`` have passed."""
    calls, t0 = 0, time.perf_counter()
    while True:
        out = call()
        if asyncio.iscoroutine(out) or isinstance(out, asyncio.Future):
            await out
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_s and calls >= 3:
            return calls, elapsed


def measure(candidates: list[Candidate], ctx: Context, repeats: int, min_s: float) -> dict[str, Any]:
    """Per available candidate: items/s of every repeat (interleaved), the median, min, max; the rest skipped."""
    calls: dict[str, Callable[[], Any]] = {}
    skipped = []
    for c in candidates:
        target = resolve(c.target)
        if target is None:
            skipped.append(c.name)
            continue
        try:
            calls[c.name] = c.make(target, ctx)
            ctx.loop.run_until_complete(_time(calls[c.name], 0.0))  # warm-up; an API that changed fails here
        except Exception as exc:  # noqa: BLE001 - one candidate's API drift must not end the run
            calls.pop(c.name, None)
            skipped.append(f"{c.name} ({type(exc).__name__}: {exc})")
    per: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(repeats):
        names = list(calls)
        for name in names[r % len(names):] + names[:r % len(names)]:
            n, s = ctx.loop.run_until_complete(_time(calls[name], min_s))
            per[name].append(n * ctx.size / s)
    for close in ctx.closers:
        close()
    return {"items_per_s": per, "skipped": skipped}


def summarize(per: dict[str, list[float]], baseline: str | None) -> dict[str, dict[str, float]]:
    """Median, min, max items/s and median us/item per candidate; the overhead vs ``baseline``:
    ``overhead_us_per_item`` (difference of medians) and ``speed_vs_baseline`` (ratio of medians)."""
    out = {}
    base = float(np.median(per[baseline])) if baseline in per else None
    for name, v in per.items():
        med = float(np.median(v))
        row = {"items_per_s": med, "min": min(v), "max": max(v), "us_per_item": 1e6 / med, "n": len(v)}
        if base:
            row["overhead_us_per_item"] = 1e6 / med - 1e6 / base
            row["speed_vs_baseline"] = med / base
        out[name] = row
    return out


def groups(candidates: list[Candidate]) -> list[tuple[str, list[Candidate]]]:
    """Candidates split into groups, each starting at a baseline (the baseline's name heads the group)."""
    out: list[tuple[str, list[Candidate]]] = []
    for c in candidates:
        if c.baseline or not out:
            out.append((c.name, []))
        out[-1][1].append(c)
    return out


def table(report: dict[str, Any]) -> str:
    """Markdown: the runner per model and batch size, then the codec."""
    lines = ["| model | batch | way | items/s (min-max) | us/item | overhead us/item | vs direct |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for row in report["runner"]:
        for name, s in row["summary"].items():
            lines.append(f"| {row['model']} | {row['size']} | {name} | {s['items_per_s']:,.0f} ({s['min']:,.0f}-"
                         f"{s['max']:,.0f}) | {s['us_per_item']:.1f} | {s.get('overhead_us_per_item', 0):+.1f} | "
                         f"{s.get('speed_vs_baseline', 1):.2f}x |")
    lines += ["", "| codec (digits task, one row; result of 10 floats) | items/s (min-max) | us/item | vs plain |",
              "|---|---:|---:|---:|"]
    for s_group in report["codec"]:
        for name, s in s_group["summary"].items():
            lines.append(f"| {name} | {s['items_per_s']:,.0f} ({s['min']:,.0f}-{s['max']:,.0f}) | "
                         f"{s['us_per_item']:.1f} | {s.get('speed_vs_baseline', 1):.2f}x |")
    skipped = sorted({n for r in report["runner"] + report["codec"] for n in r["skipped"]})
    if skipped:
        lines += ["", "Skipped (not in this checkout, or its call failed): " + ", ".join(skipped) + "."]
    return "\n".join(lines)


def update_readme(report: dict[str, Any]) -> None:
    """Replace the block between the overhead markers in benchmarks/README.md (appended when missing)."""
    m, stamp = report["machine"], report["stamp"]
    block = (f"<!-- overhead:start -->\nRun `{stamp}` on {m['cores']} cores ({m['cpu']}), torch {m['torch']}, "
             f"1 torch thread; median of {report['repeats']} repeats of >= {report['min_s']} s each. Command: "
             f"`{report['command']}`. Raw data: `results/{stamp}-overhead.json`.\n\n{table(report)}\n"
             "<!-- overhead:end -->")
    text = README.read_text()
    if "<!-- overhead:start -->" not in text:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    else:
        text = re.sub(r"<!-- overhead:start -->.*<!-- overhead:end -->", lambda _: block, text, flags=re.S)
    README.write_text(text)


@app.command()
def main(
    models: str = typer.Option("digits-linear,digits", help="models for the runner figures"),
    sizes: str = typer.Option("1,32,256", help="batch sizes (32: a typical batch)"),
    codec_size: int = typer.Option(256, help="tasks/results per timed codec call"),
    repeats: int = typer.Option(5),
    min_s: float = typer.Option(0.2, help="seconds of calls per repeat"),
    out_dir: Path = typer.Option(RESULTS),
    update_readme_section: bool = typer.Option(False, "--update-readme"),
) -> None:
    """Measure the runner's overhead and the codec; write JSON and print a table."""
    import torch
    import uvloop

    from benchmarks.throughput import machine

    torch.set_num_threads(1)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    report: dict[str, Any] = {"stamp": time.strftime("%Y%m%d-%H%M%S"), "item": "issue 10, item 3",
                              "command": " ".join(["python -m benchmarks.overhead", *sys.argv[1:]]),
                              "machine": machine(1), "repeats": repeats, "min_s": min_s, "runner": [], "codec": []}
    for model in [m.strip() for m in models.split(",") if m.strip()]:
        for size in [int(s) for s in sizes.split(",")]:
            raw = measure(RUNNERS, context(model, size, loop), repeats, min_s)
            report["runner"].append({"model": model, "size": size, **raw,
                                     "summary": summarize(raw["items_per_s"], RUNNERS[0].name)})
            print(f"{model} batch {size}: " + ", ".join(
                f"{k} {v['items_per_s']:,.0f}/s" for k, v in report["runner"][-1]["summary"].items()), file=sys.stderr)
    for head, members in groups(CODEC):
        raw = measure(members, context("digits", codec_size, loop), repeats, min_s)
        report["codec"].append({"group": head, **raw, "summary": summarize(raw["items_per_s"], head)})
    loop.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{report['stamp']}-overhead.json"
    out.write_text(json.dumps(report, indent=1))
    print(table(report))
    print(f"wrote {out}", file=sys.stderr)
    if update_readme_section:
        update_readme(report)


if __name__ == "__main__":
    app()
