"""A worker's Prometheus endpoint and heartbeat figures against Apache Kafka.

The worker wires the control plane's ``counters``/``totals``/``metrics``/``max_in_flight`` and
per-partition lag, and binds ``METRICS_HOST`` (streams/app.py, autoglm/worker.py).
"""

from __future__ import annotations

import asyncio
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from autoglm.streams.control import ControlClient
from autoglm.streams.embedded import free_port

from .kafka_io import create_topics, produce, results_for
from .test_console import tasks_for

pytestmark = pytest.mark.integration


def scrape(port: int) -> dict[str, list]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    return samples


async def heartbeat_where(client: ControlClient, predicate, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    live: dict = {}
    while time.monotonic() < deadline:
        live = await client.live_workers()
        for hb in live.values():
            if predicate(hb):
                return hb
        await asyncio.sleep(0.5)
    raise AssertionError(f"no heartbeat matched; latest: {live}")


async def test_worker_exports_gauges_and_reports_totals_since_start(kafka_bootstrap, prefix, workers):
    port = free_port()
    await create_topics(kafka_bootstrap, prefix, partitions=2)
    proc = workers.start(kafka_bootstrap, prefix, "digits", status_interval_s="1", partitions="2",
                         metrics_port=str(port), max_in_flight="500")
    ids, records = tasks_for(prefix, "digits", 60, "m")
    async with ControlClient(kafka_bootstrap, prefix=prefix) as client:
        await heartbeat_where(client, lambda hb: hb["state"]["ready"], 120)
        await produce(kafka_bootstrap, records)
        got, _ = await results_for(kafka_bootstrap, prefix, ids, 60, alive=lambda: proc.poll() is None)
        assert set(got) == ids
        # a later heartbeat: the interval figures are back to 0, the totals since start are not
        hb = await heartbeat_where(
            client, lambda hb: hb["models"]["digits"].get("served_total") == 60
            and hb["models"]["digits"]["results"] == 0, 30)
    assert hb["totals"]["results_ok"] == 60 and hb["models"]["digits"]["totals"] == {"ok": 60}
    assert hb["max_in_flight"] == 500
    assert set(hb["models"]["digits"]["lag_by_partition"]) <= {"0", "1"}
    samples = scrape(port)
    assert samples["autoglm_in_flight_cap_tasks"][0].value == 500
    assert samples["autoglm_in_flight_tasks"][0].value == 0
    assert [s.labels for s in samples["autoglm_queue_depth_tasks"]] == [{"model": "digits"}]
    lag = {s.labels["partition"]: s.value for s in samples["autoglm_consumer_lag_records"]}
    assert set(lag) == {"0", "1"} and sum(lag.values()) == 0
    ok = [s.value for s in samples["autoglm_tasks_total"] if s.labels == {"model": "digits", "status": "ok"}]
    assert ok == [60.0]
