"""Item 3's overhead benchmark: the plain codec bars, candidate resolution, the summary (no broker)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from autoglm.streams.events import Result, Task, decode_result, decode_task, encode_task
from benchmarks.overhead import (
    CODEC,
    Candidate,
    Context,
    groups,
    measure,
    plain_decode,
    plain_encode,
    resolve,
    summarize,
)


def test_the_plain_decoder_reads_what_encode_task_wrote():
    x = np.arange(64, dtype=np.float32).reshape(1, 1, 8, 8) / 64
    raw = encode_task(Task(id="t-1", model="digits", inputs=x, created_ms=1))
    tid, arr = plain_decode(raw)
    assert tid == "t-1" and arr.dtype == np.float32 and arr.shape == (1, 1, 8, 8)
    np.testing.assert_array_equal(arr, decode_task(raw).inputs)


def test_the_plain_encoder_writes_a_result_the_project_decodes_alike():
    out = np.array([[0.25, 0.75]], dtype=np.float32)
    r = Result(id="t-2", model="digits", status="ok", outputs=out, batch_size=3, worker="w", queue_ms=1.5,
               inference_ms=0.5, end_to_end_ms=2.0)
    back = decode_result(plain_encode(r))
    assert (back.id, back.status, back.batch_size, back.worker, back.queue_ms) == ("t-2", "ok", 3, "w", 1.5)
    np.testing.assert_array_equal(back.outputs, out)


def test_a_candidate_whose_target_is_missing_is_skipped_not_fatal():
    assert resolve("benchmarks.overhead:plain_decode") is plain_decode
    assert resolve("autoglm.streams.events:no_such_codec") is None
    assert resolve("no_such_module.codec:decode") is None
    calls = []
    candidates = [Candidate("counted", "benchmarks.overhead:plain_decode", lambda f, c: lambda: calls.append(1)),
                  Candidate("future codec", "autoglm.streams.events:decode_tasks_v9", lambda f, c: lambda: None),
                  Candidate("changed API", "benchmarks.overhead:plain_decode", lambda f, c: lambda: f(1, 2))]
    loop = asyncio.new_event_loop()
    try:
        raw = measure(candidates, Context("digits", 4, [], [], [], loop, []), repeats=2, min_s=0.0)
    finally:
        loop.close()
    assert raw["skipped"][0] == "future codec"
    assert raw["skipped"][1].startswith("changed API (TypeError: ")
    assert len(raw["items_per_s"]["counted"]) == 2 and len(calls) == 9   # warm-up + 2 repeats, >= 3 calls each


def test_summary_overhead_is_the_difference_of_median_us_per_item():
    s = summarize({"direct": [1000.0, 2000.0, 1500.0], "runner": [500.0, 400.0, 1000.0]}, "direct")
    assert s["direct"]["us_per_item"] == pytest.approx(1e6 / 1500)
    assert s["runner"]["overhead_us_per_item"] == pytest.approx(1e6 / 500 - 1e6 / 1500)
    assert s["runner"]["speed_vs_baseline"] == pytest.approx(500 / 1500)
    assert (s["runner"]["min"], s["runner"]["max"]) == (400.0, 1000.0)


def test_codec_candidates_group_under_their_baseline():
    heads = [(head, [c.name for c in members]) for head, members in groups(CODEC)]
    assert [h for h, _ in heads] == [c.name for c in CODEC if c.baseline]
    assert heads[0][1] == ["plain decode: orjson + base64 + np.frombuffer", "decode_task",
                           "decode_task(check_finite=False) + one all_finite per batch"]
    assert heads[1][1] == ["plain encode: orjson.dumps", "encode_result",
                           "BatchResultEncoder.encode (one encoder per batch)"]


def test_the_workers_codec_calls_agree_with_the_plain_ones():
    """The worker's batch decode and encode give what decode_task and encode_result give."""
    import numpy as np

    from autoglm.streams.events import Result, Task, decode_result, decode_task, encode_result, encode_task
    from benchmarks.overhead import worker_decode, worker_encode

    raws = [encode_task(Task(id=f"t{i}", model="digits", inputs=np.full((1, 64), i, np.float32))) for i in range(3)]
    assert [t.inputs.tolist() for t in worker_decode(raws)] == [decode_task(r).inputs.tolist() for r in raws]
    results = [Result(id=f"t{i}", model="digits", status="ok", outputs=np.full((1, 10), i / 7, np.float32),
                      batch_size=3, worker="w", queue_ms=1.5, inference_ms=0.25, end_to_end_ms=2.0) for i in range(3)]
    for fast, plain in zip(worker_encode(results), [encode_result(r) for r in results]):
        a, b = decode_result(fast), decode_result(plain)
        assert (a.id, a.status, a.batch_size, a.worker, a.queue_ms, a.end_to_end_ms) == (
            b.id, b.status, b.batch_size, b.worker, b.queue_ms, b.end_to_end_ms)
        assert np.array_equal(a.outputs, b.outputs) and a.outputs.dtype == b.outputs.dtype
