"""The in-process side of :mod:`benchmarks.pipeline`: each shipped pipeline written by hand as a
user writes it without Kafka, its models loaded in this process and called one after the other.

Nothing here imports Kafka.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from benchmarks.pipeline_report import baseline_figures, chunks

#: torch intra-op threads of the worker and of the in-process chain (the worker's own default on 2 cores)
TORCH_THREADS = 1
#: the routing condition of examples/pipelines/digits-routing/pipeline.yaml, as the hand-written chain has it
DIGITS_UNSURE_BELOW = 0.95


def load_model(name: str, model_repo: Path | None):
    """Model ``name`` (repository or built-in), loaded on the CPU (load warms it up)."""
    from autoglm.models.repository import ModelRepository

    model = ModelRepository(model_repo).create(name)
    model.load("cpu")
    return model


def run_model(model, inputs: Sequence[Any]) -> list[np.ndarray]:
    """One forward over the tasks' inputs: ``prepare`` each, ``collate``, ``forward`` under
    ``torch.inference_mode()``; one float32 ``(rows_i, ...)`` array per task, in order."""
    from benchmarks.peers import forward

    return forward(model, [model.prepare(x) for x in inputs])


Forward = Callable[[str, Sequence[Any]], list[np.ndarray]]


class Chain:
    """A pipeline by hand: its steps' models loaded in this process, called one after the other.

    ``fwd(step, inputs)`` runs one step's model over some tasks' inputs: :meth:`direct` (the
    model's ``prepare``/``collate``/``forward``, :func:`run_model`) unless given; or
    :meth:`via_runners` (each model in a started :class:`~autoglm.models.runner.ModelRunner`,
    ``run_sync``: the worker's model thread, without Kafka).
    """

    steps: tuple[str, ...] = ()
    models_of: dict[str, str] = {}

    def __init__(self, model_repo: Path | None):
        self.model_repo = model_repo
        self.models = {step: load_model(name, model_repo) for step, name in self.models_of.items()}
        self.runners: dict[str, Any] = {}

    def direct(self, step: str, inputs: Sequence[Any]) -> list[np.ndarray]:
        return run_model(self.models[step], inputs)

    def via_runners(self, step: str, inputs: Sequence[Any]) -> list[np.ndarray]:
        if not self.runners:
            from autoglm.models.repository import ModelRepository
            from autoglm.models.runner import ModelRunner

            repo = ModelRepository(self.model_repo)
            for name, model in self.models_of.items():
                runner = ModelRunner(repo.create(model), device="cpu", torch_threads=TORCH_THREADS)
                runner.start_sync()
                self.runners[name] = runner
        runner = self.runners[step]
        return runner.run_sync([runner.model.prepare(x) for x in inputs])

    def close(self) -> None:
        for runner in self.runners.values():
            runner.close()


class DigitsRoutingChain(Chain):
    """digits-routing by hand: ``digits`` on every image, ``digits-linear`` on the images whose
    top ``digits`` probability is below 0.95 (the file's ``when``)."""

    steps = ("first", "second")
    models_of = {"first": "digits", "second": "digits-linear"}

    def one(self, x: np.ndarray, fwd: Forward | None = None) -> str:
        """One task through the chain; the steps that ran, ``+``-joined."""
        fwd = fwd or self.direct
        probs = fwd("first", [x])[0]
        if probs.max() < DIGITS_UNSURE_BELOW:
            fwd("second", [x])
            return "first+second"
        return "first"

    def batches(self, xs: Sequence[np.ndarray], sizes: dict[str, int]) -> int:
        """Every task through step 1 in batches of ``sizes['first']``, then the unsure ones through
        step 2 in batches of ``sizes['second']``; returns how many went to step 2."""
        probs = [p for chunk in chunks(xs, sizes["first"]) for p in self.direct("first", chunk)]
        unsure = [x for x, p in zip(xs, probs) if p.max() < DIGITS_UNSURE_BELOW]
        for chunk in chunks(unsure, sizes["second"]):
            self.direct("second", chunk)
        return len(unsure)


class TextSentimentChain(Chain):
    """text-sentiment by hand: ``minilm`` embeds the text, ``sentiment-head`` classifies the embedding."""

    steps = ("embed", "classify")
    models_of = {"embed": "minilm", "classify": "sentiment-head"}

    def one(self, text: list[str], fwd: Forward | None = None) -> str:
        fwd = fwd or self.direct
        fwd("classify", fwd("embed", [text]))
        return "embed+classify"

    def batches(self, texts: Sequence[list[str]], sizes: dict[str, int]) -> int:
        embeddings = [e for chunk in chunks(texts, sizes["embed"]) for e in self.direct("embed", chunk)]
        for chunk in chunks(embeddings, sizes["classify"]):
            self.direct("classify", chunk)
        return len(embeddings)


CHAINS: dict[str, Callable[[Path | None], Any]] = {"digits-routing": DigitsRoutingChain,
                                                   "text-sentiment": TextSentimentChain}


def replay_in_process(call: Callable[[int], str], arrivals_s: Sequence[float], *,
                      clock: Callable[[], float] = time.perf_counter,
                      sleep: Callable[[float], None] = time.sleep) -> tuple[list[float], list[str]]:
    """Open loop in this process: task ``i`` arrives at ``arrivals_s[i]`` (seconds from the start)
    and is served by ``call(i)`` (which returns its route) as soon as it has arrived and the one
    before it is done. Its latency runs to the end of its call from its arrival: the moment this
    loop, idle, wakes up to take it (as the pipeline's ``created_ms`` is stamped when the sender
    wakes up to send: the load generator's own lateness counts for neither), or, when it arrives
    while the one before still runs, its due time (that wait counts, as a queue does on Kafka).

    Returns:
        ``(latencies in ms, routes)``, in task order.
    """
    latencies, routes = [], []
    start = clock()
    for i, at in enumerate(arrivals_s):
        wait = start + at - clock()
        if wait > 0:
            sleep(wait)
            arrived = clock()
        else:
            arrived = start + at
        routes.append(call(i))
        latencies.append((clock() - arrived) * 1000.0)
    return latencies, routes


def in_process(chain, inputs: Callable[[int], Any], arrivals_s: Sequence[float], drain_tasks: int,
               sizes: dict[str, int], min_s: float = 1.0, max_passes: int = 5) -> dict[str, Any]:
    """The chain's figures.

    - ``latency``: the latency run's trace replayed in this process (:func:`replay_in_process`:
      the same tasks at the same arrival times, each through the chain called directly);
    - ``b2b_latency``: the same tasks back to back (no pauses: warm caches), called directly;
    - ``runner_latency``: the same tasks back to back, each model through a
      :class:`~autoglm.models.runner.ModelRunner` (``run_sync``: the worker's model thread);
    - ``tasks_per_s``, ``cpu_us_per_task``: tasks ``0..drain_tasks-1`` in batches of ``sizes``
      (passes until ``min_s`` seconds, at most ``max_passes``; the median pass).
    """
    for i in range(20):  # warm-up (allocator, caches) before any timing
        chain.one(inputs(i))
        chain.one(inputs(i), chain.via_runners)
    latencies, routes = replay_in_process(lambda i: chain.one(inputs(i)), arrivals_s)
    back_to_back = {}
    for way, fwd in (("direct", None), ("runner", chain.via_runners)):
        times, ways = [], []
        for i in range(len(arrivals_s)):
            x = inputs(i)
            t0 = time.perf_counter()
            ways.append(chain.one(x, fwd))
            times.append((time.perf_counter() - t0) * 1000.0)
        back_to_back[way] = baseline_figures(times, ways)
    xs = [inputs(i) for i in range(drain_tasks)]
    rates, cpus, spent = [], [], 0.0
    while not rates or (spent < min_s and len(rates) < max_passes):
        t0, c0 = time.perf_counter(), time.process_time()
        second = chain.batches(xs, sizes)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        spent += wall
        rates.append(drain_tasks / wall)
        cpus.append(cpu * 1e6 / drain_tasks)
    return {"latency": baseline_figures(latencies, routes), "routes_per_task": routes,
            "b2b_latency": back_to_back["direct"], "runner_latency": back_to_back["runner"],
            "latency_ms": latencies, "tasks_per_s": float(np.median(rates)),
            "cpu_us_per_task": float(np.median(cpus)), "passes": len(rates), "batch_sizes": dict(sizes),
            "later_steps_tasks": second}
