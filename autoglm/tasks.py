"""Task sources for the CLI (JSON lines, digit images, texts) and the result follower."""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import typer

from autoglm.errors import BrokerError, EventDecodeError, EventError, TopicMissingError
from autoglm.streams.codec import loads
from autoglm.streams.events import Task, decode_task, encode_task, now_ms
from autoglm.streams.topics import TopicNames

Record = tuple[str, bytes, bytes]  # (topic, key, value)


def holdout_digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images of the held-out digits split, cycling when ``n`` > 360.

    Returns:
        x float32 (n, 1, 8, 8) in [0, 1], y int64 (n,).
    """
    from autoglm.models.digits import split_digits

    _, _, x_test, y_test = split_digits(seed)
    idx = np.arange(n) % len(x_test)
    return x_test[idx], y_test[idx]


def digit_tasks(n: int, run_id: str) -> list[Task]:
    """``n`` digits tasks of one image each, labelled in ``attributes['label']``."""
    x, y = holdout_digits(n)
    stamp = now_ms()
    return [
        Task(id=f"{run_id}-{i}", model="digits", inputs=x[i : i + 1], created_ms=stamp,
             attributes={"label": str(int(y[i]))})
        for i in range(n)
    ]


def digit_records(n: int, run_id: str, prefix: str, topic: str | None = None, model: str = "digits") -> list[Record]:
    """``n`` digits tasks as records for the ``digits`` task topic (or ``topic``, e.g. a pipeline's input,
    with ``model`` in their ``model`` field)."""
    names = TopicNames(prefix)
    tasks = digit_tasks(n, run_id)
    if topic is not None:
        return [(topic, t.id.encode(), encode_task(replace(t, model=model, inputs=t.inputs.reshape(1, -1))))
                for t in tasks]
    return [(names.tasks(t.model), t.id.encode(), encode_task(t)) for t in tasks]


def text_records(path: Path, run_id: str, prefix: str, model: str) -> list[Record]:
    names = TopicNames(prefix)
    lines = [ln.rstrip("\n") for ln in _open_text(path) if ln.strip()]
    stamp = now_ms()
    return [
        (names.tasks(model), f"{run_id}-{i}".encode(),
         encode_task(Task(id=f"{run_id}-{i}", model=model, inputs=[line], created_ms=stamp)))
        for i, line in enumerate(lines)
    ]


def records_from_jsonl(path: Path, prefix: str, *, validate: bool = True, topic: str | None = None,
                       model: str | None = None) -> list[Record]:
    """Each non-empty line is one task event; the topic is that of its ``model``.

    With ``topic`` (a pipeline's input topic) every line goes there, and a line may leave out
    ``schema``, ``id`` (``<file stem>-<line>``) and ``model`` (``model``), as ``pipeline dry-run``
    samples do.

    Raises:
        EventError: a line is not a valid task (with ``validate``), naming the line number.
    """
    import orjson

    names = TopicNames(prefix)
    out: list[Record] = []
    for lineno, line in enumerate(_open_text(path), start=1):
        raw = line.strip().encode()
        if not raw or raw.startswith(b"#"):
            continue
        try:
            if topic is not None:
                doc = loads(raw)
                if not isinstance(doc, dict):
                    raise EventDecodeError("expected a JSON object (a task)")
                defaults = {"schema": "autoglm.task/v1", "id": f"{Path(str(path)).stem}-{lineno}", "model": model}
                raw = orjson.dumps({**{k: v for k, v in defaults.items() if v is not None}, **doc})
            if validate:
                task = decode_task(raw)
                line_model, key = task.model, task.id
            else:
                doc = loads(raw)
                if not isinstance(doc, dict) or not isinstance(doc.get("model"), str) or not doc["model"]:
                    raise EventDecodeError("needs a JSON object with a 'model' string to choose its topic "
                                           "(even with --no-validate)")
                line_model, key = doc["model"], str(doc.get("id", ""))
        except EventError as exc:
            located = EventError(f"{path}:{lineno}: {exc}")
            located.code = exc.code
            raise located from None
        out.append((topic or names.tasks(line_model), key.encode(), raw))
    return out


def _open_text(path: Path) -> Iterable[str]:
    if str(path) == "-":
        return sys.stdin
    return path.read_text(encoding="utf-8").splitlines()


async def send_records(servers: list[str], records: list[Record], client_kwargs: dict | None = None) -> int:
    """Publish records pipelined with a progress bar; returns the count once all are acknowledged.

    ``client_kwargs``: security arguments (see :func:`autoglm.streams.security.client_kwargs`).
    """
    import asyncio

    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaError
    from rich.progress import Progress

    from autoglm.streams.topics import partitions_of

    for topic in sorted({topic for topic, _, _ in records}):
        try:
            await partitions_of(servers, topic, timeout_s=3.0, client_kwargs=client_kwargs)
        except TopicMissingError:
            what = "that pipeline (autoglm pipeline run)" if ".pipelines." in topic else "that model"
            raise BrokerError(
                f"topic {topic!r} does not exist: is a worker serving {what} with this prefix? "
                "(workers create the topics they read at start)"
            ) from None
    producer = AIOKafkaProducer(bootstrap_servers=servers, acks="all", linger_ms=5,
                                max_request_size=4 * 1024 * 1024, **(client_kwargs or {}))
    try:
        await producer.start()
        futures = []
        with Progress(transient=True, console=_stderr_console()) as progress:
            bar = progress.add_task("publishing", total=len(records))
            for topic, key, value in records:
                futures.append(await producer.send(topic, value, key=key))
                progress.advance(bar)
            await asyncio.gather(*futures)
    except KafkaError as exc:
        raise BrokerError(f"publish failed: {exc!r}") from exc
    finally:
        await producer.stop()
    return len(records)


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


async def follow_results(servers: list[str], prefix: str, from_beginning: bool, count: int | None,
                         timeout_s: float | None, as_json: bool, client_kwargs: dict | None = None) -> int:
    """Print results as they arrive; returns how many were printed."""
    from autoglm.streams.client import ResultReader
    from autoglm.streams.codec import dumps
    from autoglm.streams.events import encode_result

    seen = 0
    last = time.monotonic()
    async with ResultReader(servers, prefix=prefix, from_beginning=from_beginning,
                            **(client_kwargs or {})) as reader:
        while count is None or seen < count:
            batch = await reader.batches(0.5)
            if not batch:
                if timeout_s is not None and time.monotonic() - last > timeout_s:
                    break
                continue
            last = time.monotonic()
            for r in batch:
                if as_json:
                    typer.echo(encode_result(r).decode())
                else:
                    typer.echo(_describe(r))
                seen += 1
                if count is not None and seen >= count:
                    break
    del dumps
    return seen


def _describe_array(array) -> str:
    head = array.reshape(len(array), -1) if array.ndim else array.reshape(1, 1)
    what = f"{array.dtype} {tuple(array.shape)}"
    if 1 < head.shape[1] <= 16:
        what += f" argmax {head.argmax(axis=1).tolist()}"
    elif head.shape[1] == 1 and head.size <= 16:
        what += f" {head.ravel().tolist()}"
    return what


def _describe(r) -> str:
    if r.status == "ok" and isinstance(r.outputs, dict):  # a multi-output model: named tensors
        what = "outputs " + ", ".join(f"{name}: {_describe_array(a)}" for name, a in r.outputs.items())
    elif r.status == "ok" and r.outputs is not None:
        what = f"outputs {_describe_array(r.outputs)}"
    else:
        what = f"{r.error.code}: {r.error.message}" if r.error else ""
    return (f"{r.id}  {r.status:<8} {r.model:<8} batch {r.batch_size:<3} "
            f"e2e {r.end_to_end_ms:7.1f} ms  {what}")


def iter_chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
