"""Control event signatures and status events (no broker)."""

from __future__ import annotations

import hashlib
import hmac

import orjson
import pytest

from autoglm.errors import ControlSignatureError, EventValidationError
from autoglm.processors.metrics import WindowStats
from autoglm.streams.control import canonical_control, decode_status, encode_status, sign_control, verify_control
from autoglm.streams.events import ControlEvent

KEY = b"0123456789abcdef-test-key"


def event(**kw) -> ControlEvent:
    base = dict(id="ev-1", command="pause", target={"model": "digits"}, params={}, issued_ms=1_700_000_000_000)
    base.update(kw)
    return ControlEvent(**base)


def test_signature_is_hmac_sha256_over_sorted_compact_json_without_the_signature():
    raw = sign_control(event(), KEY)
    doc = orjson.loads(raw)
    body = {k: v for k, v in doc.items() if k != "signature"}
    expected = hmac.new(KEY, orjson.dumps(body, option=orjson.OPT_SORT_KEYS), hashlib.sha256).hexdigest()
    assert doc["signature"] == expected
    assert canonical_control(doc) == orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    assert verify_control(raw, KEY) == event()


def test_unsigned_event_is_rejected_when_a_key_is_configured_and_accepted_otherwise():
    raw = sign_control(event(), None)
    assert "signature" not in orjson.loads(raw)
    with pytest.raises(ControlSignatureError, match="not signed") as info:
        verify_control(raw, KEY)
    assert info.value.task_id == "ev-1" and info.value.code == "bad_signature"
    assert verify_control(raw, None).command == "pause"


@pytest.mark.parametrize("field, value", [("command", "resume"), ("issued_ms", 1_800_000_000_000),
                                          ("id", "ev-2"), ("target", {})])
def test_any_change_to_a_signed_event_breaks_the_signature(field, value):
    doc = orjson.loads(sign_control(event(), KEY))
    doc[field] = value
    with pytest.raises(ControlSignatureError, match="does not match"):
        verify_control(orjson.dumps(doc), KEY)


def test_wrong_key_is_rejected():
    with pytest.raises(ControlSignatureError):
        verify_control(sign_control(event(), b"another-key-of-16-bytes"), KEY)


def test_signed_but_invalid_event_is_still_a_validation_error():
    doc = orjson.loads(sign_control(event(), None))
    doc["command"] = "reboot"
    doc["signature"] = hmac.new(KEY, canonical_control(doc), hashlib.sha256).hexdigest()
    with pytest.raises(EventValidationError, match="command"):
        verify_control(orjson.dumps(doc), KEY)


def test_status_events_round_trip_and_foreign_records_are_skipped():
    raw = encode_status("ack", "w1", event_id="e", status="ok")
    doc = decode_status(raw)
    assert doc["kind"] == "ack" and doc["worker"] == "w1" and doc["event_id"] == "e" and doc["time_ms"] > 0
    assert decode_status(b"not json") is None
    assert decode_status(b'{"schema": "autoglm.result/v1", "worker": "w1"}') is None
    assert decode_status(None) is None


def test_window_stats_nearest_rank_percentiles_and_reset():
    w = WindowStats()
    w.observe_batch(4, [0.010, 0.020, 0.030, 0.040])
    w.observe_batch(1, [1.0])
    peek = w.take(2.0, reset=False)
    assert peek["results"] == 5 and peek["throughput_per_s"] == 2.5
    assert peek["p50_ms"] == pytest.approx(30.0) and peek["p99_ms"] == pytest.approx(1000.0)
    assert peek["mean_batch_size"] == 2.5
    assert w.take(2.0)["results"] == 5
    empty = w.take(1.0)
    # the window's figures start again; the totals since start survive the reset
    assert empty == {"results": 0, "throughput_per_s": 0.0, "p50_ms": None, "p99_ms": None, "mean_batch_size": None,
                     "served_total": 5, "batches_total": 2}
    w.observe_batch(3, [0.001] * 3)
    assert w.take(1.0)["served_total"] == 8


def test_window_stats_memory_is_bounded():
    w = WindowStats(max_samples=100)
    for _ in range(50):
        w.observe_batch(10, [0.001] * 10)
    assert len(w._latencies_s) == 100 and w.take(1.0)["results"] == 500
