"""The peers of figure O/T: consumers written the way their own docs would have them.

Each runs in its own process (``python -m benchmarks.peers KIND ...``) so that
:mod:`benchmarks.throughput` can measure its CPU, and serves the same thing as
``autoglm worker``: it reads ``<prefix>.tasks.<model>`` in consumer group
``--group`` from the earliest offset, decodes each task with the project's
codec (:func:`~autoglm.streams.events.decode_task`), validates it with the
model's ``prepare``, runs the **same model object** the worker would
(``default_registry().create(model)``, loaded on ``--device``) with one
forward per batch under ``torch.inference_mode()``, encodes one result per task
with :func:`~autoglm.streams.events.encode_result` (key: the task id) to
``<prefix>.results``, and commits a task's offset only after its result is
acknowledged by the broker (at-least-once, acks=all). A task that fails to
decode or validate gets an error result, never silence. Every peer runs until
SIGTERM/SIGINT.

Kinds (BENCHMARKS.md, "Peers measured side by side"):

- ``naive``: aiokafka ``async for`` per message, a forward of one task in a
  thread, ``send_and_wait``, ``commit`` per result.
- ``faust``: a faust-streaming agent over ``stream.take(256, within=0.01)``;
  the result sends are awaited inside the iteration, so the events are acked
  (and committed by faust every ``broker_commit_every``/interval) only after
  their results are acknowledged.
- ``lean``: an aiokafka ``getmany`` loop: decode -> one forward in a thread ->
  send all -> gather the acks -> commit.
- ``confluent``: the same loop on confluent-kafka (librdkafka): ``consume`` ->
  decode -> one forward (a synchronous loop: librdkafka's own threads do the
  I/O) -> ``produce`` all -> ``flush`` (every delivery report) -> ``commit``.

``python -m benchmarks.peers limit --model M`` prints figure L as JSON: the
model alone, in-process, called directly (``prepare`` per task + ``collate`` +
``forward`` + split) at batch sizes 1..256, items/s and CPU us/item.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import typer

from autoglm.errors import AutoGLMError
from autoglm.streams.events import ErrorInfo, Result, Task, decode_task, encode_result

#: the most tasks one batch holds, for every batched peer: the worker's MAX_BATCH_SIZE default
#: (256, adaptive) and the faust agent's take(256)
BATCH = 256
KINDS = ("naive", "faust", "lean", "confluent")

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


# -- the part every peer shares: the same model, the same codec ------------------------------------


def load_model(name: str, device: str, torch_threads: int):
    """The registry's model ``name``, loaded on ``device`` with ``torch_threads`` intra-op threads."""
    import torch

    from autoglm.models import default_registry

    torch.set_num_threads(torch_threads)
    model = default_registry().create(name)
    model.load(device)
    return model


def forward(model, prepared: list[Any]) -> list[np.ndarray]:
    """One forward over the prepared tasks; float32 ``(rows_i, output_dim)`` per task, in order."""
    import torch

    with torch.inference_mode():
        out = model.forward(model.collate(prepared))
    return np.split(out, np.cumsum([model.rows(p) for p in prepared])[:-1], axis=0)


def decode(model, raw: bytes, key: bytes | None) -> tuple[str, Any] | bytes:
    """``(task id, prepared inputs)``, or the encoded error result of a task that cannot be served."""
    try:
        task: Task = decode_task(raw)
        return task.id, model.prepare(task.inputs)
    except AutoGLMError as exc:
        tid = getattr(exc, "task_id", None) or (key or b"").decode("utf-8", "replace") or "unknown"
        return encode_result(Result(id=tid, model=model.name, status="rejected",
                                    error=ErrorInfo(exc.code, str(exc)), worker="peer"))


def results(model, decoded: list[tuple[str, Any] | bytes], outputs: list[np.ndarray],
            inference_s: float, worker: str) -> list[tuple[bytes, bytes]]:
    """``(key, value)`` of one result per task, in order: served tasks and error results alike."""
    out, it = [], iter(outputs)
    n = len(decoded)
    for d in decoded:
        if isinstance(d, bytes):
            out.append((b"", d))
            continue
        tid = d[0]
        out.append((tid.encode(), encode_result(Result(
            id=tid, model=model.name, status="ok", outputs=next(it), batch_size=n, worker=worker,
            inference_ms=inference_s * 1000.0))))
    return out


def serve_batch(model, pool: ThreadPoolExecutor | None, raw: list[tuple[bytes, bytes | None]], worker: str):
    """Decode, forward (in ``pool`` when given: returns an awaitable), encode: the batch's results."""
    decoded = [decode(model, value, key) for value, key in raw]
    prepared = [d[1] for d in decoded if not isinstance(d, bytes)]

    def run() -> tuple[list[np.ndarray], float]:
        t0 = time.perf_counter()
        return (forward(model, prepared) if prepared else []), time.perf_counter() - t0

    if pool is None:
        outputs, inference_s = run()
        return results(model, decoded, outputs, inference_s, worker)

    async def in_thread():
        outputs, inference_s = await asyncio.get_running_loop().run_in_executor(pool, run)
        return results(model, decoded, outputs, inference_s, worker)

    return in_thread()


def stop_on_signals(loop: asyncio.AbstractEventLoop) -> asyncio.Event:
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


# -- aiokafka peers ---------------------------------------------------------------------------------


async def naive(bootstrap: str, tasks_topic: str, results_topic: str, group: str, model) -> None:
    """``async for`` per message: forward of one task in a thread, ``send_and_wait``, ``commit``.

    SIGTERM cancels the loop: every served task is already committed."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    loop, main = asyncio.get_running_loop(), asyncio.current_task()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, main.cancel)
    consumer = AIOKafkaConsumer(tasks_topic, bootstrap_servers=bootstrap, group_id=group,
                                enable_auto_commit=False, auto_offset_reset="earliest")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    pool = ThreadPoolExecutor(1)
    await consumer.start()
    await producer.start()
    try:
        async for msg in consumer:
            for key, value in await serve_batch(model, pool, [(msg.value, msg.key)], "naive"):
                await producer.send_and_wait(results_topic, value, key=key or None)
            await consumer.commit({TopicPartition(msg.topic, msg.partition): msg.offset + 1})
    except asyncio.CancelledError:
        pass
    finally:
        await consumer.stop()
        await producer.stop()


async def lean(bootstrap: str, tasks_topic: str, results_topic: str, group: str, model) -> None:
    """getmany -> decode -> one forward in a thread -> send all -> gather the acks -> commit."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    stop = stop_on_signals(asyncio.get_running_loop())
    consumer = AIOKafkaConsumer(tasks_topic, bootstrap_servers=bootstrap, group_id=group,
                                enable_auto_commit=False, auto_offset_reset="earliest")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=1)
    pool = ThreadPoolExecutor(1)
    await consumer.start()
    await producer.start()
    try:
        while not stop.is_set():
            fetched = await consumer.getmany(timeout_ms=100, max_records=BATCH)
            records = [r for recs in fetched.values() for r in recs]
            if not records:
                continue
            out = await serve_batch(model, pool, [(r.value, r.key) for r in records], "lean")
            acks = [await producer.send(results_topic, value, key=key or None) for key, value in out]
            await asyncio.gather(*acks)
            await consumer.commit({tp: recs[-1].offset + 1 for tp, recs in fetched.items()})
    finally:
        await consumer.stop()
        await producer.stop()


# -- faust --------------------------------------------------------------------------------------------


def run_faust(bootstrap: str, tasks_topic: str, results_topic: str, group: str, model) -> None:
    """A faust agent over ``stream.take(256, within=0.01)``; faust's Worker handles the signals."""
    import faust

    fapp = faust.App(group, broker=f"kafka://{bootstrap}", value_serializer="raw", key_serializer="raw",
                     consumer_auto_offset_reset="earliest", producer_acks=-1, web_enabled=False,
                     topic_replication_factor=1)
    source = fapp.topic(tasks_topic, value_serializer="raw")
    sink = fapp.topic(results_topic, key_serializer="raw", value_serializer="raw")
    pool = ThreadPoolExecutor(1)

    @fapp.agent(source)
    async def serve(stream):
        async for values in stream.take(BATCH, within=0.01):
            out = await serve_batch(model, pool, [(v, None) for v in values], "faust")
            acks = [await sink.send(key=key or None, value=value) for key, value in out]
            await asyncio.gather(*acks)

    faust.Worker(fapp, loglevel="WARNING", quiet=True).execute_from_commandline()


# -- confluent-kafka ----------------------------------------------------------------------------------


def run_confluent(bootstrap: str, tasks_topic: str, results_topic: str, group: str, model) -> None:
    """consume -> decode -> one forward -> produce all -> flush (every delivery report) -> commit."""
    from confluent_kafka import Consumer, KafkaException, Producer

    stopping = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.append(True))
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                         "auto.offset.reset": "earliest"})
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 1})
    failed: list[Any] = []

    def delivered(err, _msg) -> None:
        if err is not None:
            failed.append(err)

    consumer.subscribe([tasks_topic])
    try:
        while not stopping:
            msgs = [m for m in consumer.consume(num_messages=BATCH, timeout=0.1) if m.error() is None]
            if not msgs:
                continue
            for key, value in serve_batch(model, None, [(m.value(), m.key()) for m in msgs], "confluent"):
                producer.produce(results_topic, value, key or None, on_delivery=delivered)
            if producer.flush(60) or failed:
                raise KafkaException(f"results not acknowledged: {failed[:3]}")
            consumer.commit(asynchronous=False)
    finally:
        consumer.close()


# -- figure L -------------------------------------------------------------------------------------------


def offline_limit(model, inputs: Callable[[int], Any], sizes: tuple[int, ...] = (1, 8, 32, 64, 128, 256),
                  min_s: float = 0.5, min_reps: int = 3) -> dict[str, dict[str, float]]:
    """Figure L per batch size: ``{size: {"items_per_s", "cpu_us_per_item", "forward_items_per_s"}}``.

    ``inputs(i)`` is task ``i``'s raw inputs (as decoded from the wire). A repetition is what the
    model itself does for a batch of ``size`` tasks, called directly on this thread: ``prepare``
    per task + ``collate`` + ``forward`` + the split per task (wall clock; CPU time of this
    process); ``forward_items_per_s`` times ``collate`` + ``forward`` + split alone, on inputs
    prepared beforehand. Each is repeated for at least ``min_s`` seconds and ``min_reps`` times,
    after one untimed warm-up call.
    """
    out = {}
    for size in sizes:
        raw = [inputs(i) for i in range(size)]
        prepared = [model.prepare(x) for x in raw]
        figures: dict[str, float] = {}
        for name, call in (("items_per_s", lambda: forward(model, [model.prepare(x) for x in raw])),
                           ("forward_items_per_s", lambda: forward(model, prepared))):
            call()
            reps, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
            while reps < min_reps or time.perf_counter() - wall0 < min_s:
                call()
                reps += 1
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            figures[name] = size * reps / wall
            if name == "items_per_s":
                figures["cpu_us_per_item"] = cpu * 1e6 / (size * reps)
        out[str(size)] = figures
    return out


# -- command line -----------------------------------------------------------------------------------------


@app.command()
def main(
    kind: str = typer.Argument(..., help=f"one of {', '.join(KINDS)}, or 'limit' (figure L, JSON on stdout)"),
    model_name: str = typer.Option("digits-linear", "--model"),
    bootstrap: str = typer.Option("127.0.0.1:9092"),
    prefix: str = typer.Option("autoglm", help="topics <prefix>.tasks.<model> and <prefix>.results"),
    group: str = typer.Option("bench-peer", help="consumer group (the faust app id for 'faust')"),
    device: str = typer.Option("cpu"),
    torch_threads: int = typer.Option(1),
    sizes: str = typer.Option("1,8,32,64,128,256", help="'limit': batch sizes"),
) -> None:
    """Run one peer consumer until SIGTERM, or print figure L."""
    from benchmarks.inputs import task_inputs

    model = load_model(model_name, device, torch_threads)
    if kind == "limit":
        limit = offline_limit(model, task_inputs(model_name), tuple(int(s) for s in sizes.split(",")))
        print(json.dumps(limit))
        return
    if kind not in KINDS:
        raise typer.BadParameter(f"unknown peer {kind!r}; expected one of {KINDS} or 'limit'")
    tasks_topic, results_topic = f"{prefix}.tasks.{model_name}", f"{prefix}.results"
    args = (bootstrap, tasks_topic, results_topic, group, model)
    if kind == "faust":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())  # as the worker does (streams/app.py)
        sys.argv = [sys.argv[0], "worker"]  # faust.Worker parses nothing else
        run_faust(*args)
    elif kind == "confluent":
        run_confluent(*args)
    else:
        import uvloop

        uvloop.run({"naive": naive, "lean": lean}[kind](*args))


if __name__ == "__main__":
    app()
