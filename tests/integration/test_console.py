"""The ops console against Apache Kafka, two worker processes and Debian's chromium (Playwright).

The page must show both workers live and their throughput while tasks flow; a click on
"pause" for one model makes both workers acknowledge and show it paused, and no result of
that model is produced after the acknowledgement (read from Kafka) while the other model
is still served (the workers require signed control events: the console signs with the key,
which neither the page nor the log shows); "resume" serves it again; a bad ``configure`` value shows ctl's range error
and publishes nothing; a request without the token, or from another origin, changes nothing.

A second case steers a pipeline: two workers serve ``digits`` and the steps of the shipped
``digits-routing`` pipeline; the page groups the two steps under the pipeline (each with the
model it runs), its "pause" makes both workers acknowledge, shows every step paused on each
worker, and the workers' next heartbeats say neither step fetches while ``digits`` (the model
the first step runs, on its own topic) still does; pipeline tasks wait; "resume" undoes it all;
a step's own "pause" on one worker leaves that worker's pipeline "partly paused", and the
control form (pipeline, step, worker) resumes it.

Skips only when no ``chromium`` is on PATH (CI installs it: ``.ci/run``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from autoglm.streams.embedded import free_port
from autoglm.streams.events import Task, encode_task
from autoglm.tasks import holdout_digits

from .conftest import ROOT, port_open, wait_for
from .kafka_io import create_topics, produce, read_until

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TOKEN = "console-test-token-0123456789abcdef"
#: workers require signed control events: every click's ack "ok" shows the console signed it
CONTROL_KEY = "console-test-control-key-fedcba9876543210"
MODELS = ("digits", "digits-linear")
PIPELINE_FILE = ROOT / "examples" / "pipelines" / "digits-routing" / "pipeline.yaml"
PIPELINE = "digits-routing"
STEPS = {"first": "digits", "second": "digits-linear"}
#: how long the pipeline case waits for an ack on the page: under the console's --ack-timeout-s (15 s), whose
#: re-broadcast would hide a page that dropped an ack it had been pushed
ACK_WAIT_MS = 10_000


def tasks_for(prefix: str, model: str, n: int, tag: str) -> tuple[set[str], list[tuple[str, bytes, bytes]]]:
    x, _ = holdout_digits(n)
    tasks = [Task(id=f"{tag}-{i}", model=model, inputs=x[i : i + 1]) for i in range(n)]
    return {t.id for t in tasks}, [(f"{prefix}.tasks.{model}", t.id.encode(), encode_task(t)) for t in tasks]


async def control_end(bootstrap: str, prefix: str) -> int:
    """Records ever written to the control topic (its end offset)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        tp = TopicPartition(f"{prefix}.control", 0)
        return (await consumer.end_offsets([tp]))[tp]
    finally:
        await consumer.stop()


async def results_by_id(bootstrap: str, prefix: str, ids: set[str], settle_s: float) -> dict[str, dict]:
    """Every result among ``ids`` on the results topic, read until all are there or ``settle_s``."""
    def done(records):
        return ids <= {orjson.loads(r.value)["id"] for r in records}

    records = await read_until(bootstrap, f"{prefix}.results", done, settle_s)
    return {doc["id"]: dict(doc, _ts=r.timestamp) for r in records if (doc := orjson.loads(r.value))["id"] in ids}


def http(url: str, *, method: str = "GET", body: bytes | None = None, headers: dict | None = None) -> int:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture
def console_proc(kafka_bootstrap, prefix, tmp_path):
    port = free_port()
    env = {**os.environ, "AUTOGLM_BOOTSTRAP_SERVERS": kafka_bootstrap, "AUTOGLM_TOPIC_PREFIX": prefix,
           "AUTOGLM_CONSOLE_TOKEN": TOKEN, "AUTOGLM_CONTROL_KEY": CONTROL_KEY}
    log = open(tmp_path / "console.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "autoglm", "console", "--port", str(port),
                             "--ack-timeout-s", "15"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open("127.0.0.1", port) or proc.poll() is not None, 60, "the console")
        assert proc.poll() is None, (tmp_path / "console.log").read_text()
        yield f"http://127.0.0.1:{port}", tmp_path / "console.log"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium)")
async def test_console_watches_and_steers_two_workers(kafka_bootstrap, prefix, workers, console_proc):
    from playwright.async_api import async_playwright, expect

    base, console_log = console_proc
    await create_topics(kafka_bootstrap, prefix, models=MODELS, partitions=2)
    procs = [workers.start(kafka_bootstrap, prefix, ",".join(MODELS), status_interval_s="1", partitions="2",
                           control_key=CONTROL_KEY)
             for _ in range(2)]
    alive = lambda: all(p.poll() is None for p in procs)  # noqa: E731

    # -- no token, another origin: refused, nothing published ------------------------------
    pause = orjson.dumps({"command": "pause", "model": "digits"})
    json_type = {"Content-Type": "application/json"}
    assert http(f"{base}/api/control", method="POST", body=pause, headers=json_type) == 401
    assert http(f"{base}/api/state") == 401
    assert http(f"{base}/api/control", method="POST", body=pause, headers={
        **json_type, "Authorization": f"Bearer {TOKEN}", "Origin": "http://evil.example"}) == 403
    assert http(f"{base}/api/control", method="POST", body=pause, headers={
        **json_type, "Cookie": f"autoglm_console={TOKEN}", "Origin": base}) == 403  # no custom header

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = await browser.new_page(viewport={"width": 1400, "height": 1100})
        try:
            await page.goto(f"{base}/login?token={TOKEN}")
            assert page.url == f"{base}/", "login must redirect to the page (token out of the address bar)"
            assert TOKEN not in await page.content() and CONTROL_KEY not in await page.content()
            for w in ("w0", "w1"):
                await expect(page.locator(f'#workers tr[data-worker="{w}"] .badge')).to_have_text("live", timeout=120_000)
            await expect(page.locator('#workers tr[data-worker="w0"] td.state')).to_contain_text("digits: running",
                                                                                               timeout=30_000)
            assert alive(), workers.log(procs[0])
            assert await control_end(kafka_bootstrap, prefix) == 0, "a refused request published something"

            # -- tasks flow: live throughput on the page -----------------------------------------
            first_ids, records = tasks_for(prefix, "digits", 300, "a")
            await produce(kafka_bootstrap, records)
            await page.wait_for_function(
                """() => [...view.history.entries()].some(([k, pts]) => k.endsWith('\\u0000digits')
                         && pts.some(p => p.throughput_per_s > 0))""", timeout=60_000)
            await expect(page.locator('article.model[data-model="digits"] svg.chart[data-field="throughput_per_s"] path.line')
                         ).not_to_have_count(0)
            served = await results_by_id(kafka_bootstrap, prefix, first_ids, 60)
            assert set(served) == first_ids

            # -- pause one model: both workers acknowledge, the page shows it paused ---------------
            await page.locator('article.model[data-model="digits"] .model-head button[data-action="pause"]').click()
            command = page.locator('.command[data-command="pause"]').first
            for w in ("w0", "w1"):
                await expect(command.locator(f'li[data-worker="{w}"]')).to_contain_text(f"{w}: ok", timeout=20_000)
                await expect(page.locator(f'article.model[data-model="digits"] tr[data-worker="{w}"] td.state')
                             ).to_have_text("paused", timeout=10_000)
                await expect(page.locator(f'article.model[data-model="digits-linear"] tr[data-worker="{w}"] td.state')
                             ).to_have_text("running")
            acked_ms = int(time.time() * 1000)
            paused_ids, paused_records = tasks_for(prefix, "digits", 40, "p")
            other_ids, other_records = tasks_for(prefix, "digits-linear", 40, "o")
            await produce(kafka_bootstrap, paused_records + other_records)
            seen = await results_by_id(kafka_bootstrap, prefix, other_ids, 30)
            assert set(seen) == other_ids, "the model that was not paused must still be served"
            await asyncio.sleep(2.0)
            seen = await results_by_id(kafka_bootstrap, prefix, paused_ids, 1.0)
            assert not seen, f"{len(seen)} results of the paused model after the acknowledgement"
            late = [doc for doc in (await results_by_id(kafka_bootstrap, prefix, first_ids, 1.0)).values()
                    if doc["_ts"] > acked_ms]
            assert not late, "results of the paused model were produced after the acknowledgement"

            # -- resume: served again ------------------------------------------------------------
            await page.locator('article.model[data-model="digits"] .model-head button[data-action="resume"]').click()
            resume = page.locator('.command[data-command="resume"]').first
            for w in ("w0", "w1"):
                await expect(resume.locator(f'li[data-worker="{w}"]')).to_contain_text(f"{w}: ok", timeout=20_000)
            seen = await results_by_id(kafka_bootstrap, prefix, paused_ids, 60)
            assert set(seen) == paused_ids
            await expect(page.locator('article.model[data-model="digits"] tr[data-worker="w0"] td.state')
                         ).to_have_text("running", timeout=10_000)

            # -- a bad configure value: ctl's range error on the page, nothing published ------------
            before = await control_end(kafka_bootstrap, prefix)
            await page.select_option("#control-command", "configure")
            await page.select_option("#control-model", "digits")
            await page.fill("#max_batch_size", "0")
            await page.click("#control-send")
            await expect(page.locator("#control-error")).to_have_text(
                "max_batch_size must be between 1 and 65536, got 0", timeout=10_000)
            await page.fill("#max_batch_size", "")
            await page.fill("#latency_target_s", "fast")
            await page.click("#control-send")
            await expect(page.locator("#control-error")).to_contain_text("must be a number, got 'fast'")
            assert await control_end(kafka_bootstrap, prefix) == before, "an invalid configure was published"

            # -- a dead letter shows with its code and source (read-only view of <prefix>.dlq) --------
            await produce(kafka_bootstrap, [(f"{prefix}.tasks.digits", b"broken-1", b"{not json")])
            row = page.locator("#dead-letters tbody tr").first
            await expect(row.locator("td.code")).to_have_text("decode", timeout=30_000)
            await expect(row).to_contain_text(f"{prefix}.tasks.digits")

            # -- the page under load, for the README -------------------------------------------------
            _, load = tasks_for(prefix, "digits", 600, "s")
            _, load2 = tasks_for(prefix, "digits-linear", 600, "t")
            await produce(kafka_bootstrap, load + load2)
            await asyncio.sleep(3.0)
            shot = os.environ.get("AUTOGLM_CONSOLE_SCREENSHOT")
            if shot:
                await page.screenshot(path=shot, full_page=True)
        finally:
            await browser.close()
    log_text = Path(console_log).read_text(errors="replace")
    assert TOKEN not in log_text, "the console token reached the console's log"
    assert CONTROL_KEY not in log_text
    assert alive(), workers.log(procs[1])


async def heartbeats_after(bootstrap: str, prefix: str, after_ms: int, done, timeout_s: float) -> dict[str, dict]:
    """The latest heartbeat per worker sent after ``after_ms``, read from ``<prefix>.status`` until
    ``done(latest)`` or ``timeout_s``."""
    latest: dict[str, dict] = {}

    def seen(records) -> bool:
        for r in records:
            doc = orjson.loads(r.value)
            if doc.get("kind") == "heartbeat" and doc["time_ms"] > after_ms:
                latest[doc["worker"]] = doc
        return done(latest)

    await read_until(bootstrap, f"{prefix}.status", seen, timeout_s)
    return latest


def fetching(doc: dict) -> dict[str, bool]:
    return {name: entry["fetching"] for name, entry in doc["state"]["models"].items()}


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium)")
async def test_console_pauses_and_resumes_a_pipeline(kafka_bootstrap, prefix, workers, console_proc):
    from playwright.async_api import async_playwright, expect

    from autoglm.tasks import digit_records

    base, _ = console_proc
    await create_topics(kafka_bootstrap, prefix, models=("digits",), partitions=2)
    procs = [workers.start(kafka_bootstrap, prefix, "digits", pipelines=str(PIPELINE_FILE), status_interval_s="1",
                           partitions="2", control_key=CONTROL_KEY)
             for _ in range(2)]
    alive = lambda: all(p.poll() is None for p in procs)  # noqa: E731
    streams = [f"{PIPELINE}/{step}" for step in STEPS]
    pipe = f'article.pipeline[data-pipeline="{PIPELINE}"]'

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = await browser.new_page(viewport={"width": 1400, "height": 1100})
        try:
            await page.goto(f"{base}/login?token={TOKEN}")
            # -- the pipeline with its two steps, each naming its model; steps are not "models" --------
            for w in ("w0", "w1"):
                await expect(page.locator(f'{pipe} table.pipeline-workers tr[data-worker="{w}"] td.state')
                             ).to_have_text("running", timeout=90_000)
            assert alive(), workers.log(procs[0])
            await expect(page.locator(f"{pipe} section.step")).to_have_count(2)
            for step, model in STEPS.items():
                await expect(page.locator(f'{pipe} section.step[data-step="{step}"] .runs')
                             ).to_have_text(f"runs {model}")
            assert await page.locator(f"{pipe} section.step").evaluate_all(
                "els => els.map(e => e.dataset.step)") == list(STEPS), "steps in the pipeline's order"
            await expect(page.locator("#models article.model")).to_have_count(1)  # digits on its own topic only
            await expect(page.locator('#models article.model[data-model="digits"]')).to_be_visible()
            await expect(page.locator('#workers tr[data-worker="w0"] td.state')).to_have_text(
                f"digits: running, {PIPELINE}: running")

            # -- pause the pipeline: both workers acknowledge, every step paused on each -----------------
            await page.locator(f'{pipe} .pipeline-head button[data-action="pause"]').click()
            command = page.locator(f'.command[data-command="pause"][data-pipeline="{PIPELINE}"]').first
            await expect(command).to_contain_text(f"pause pipeline {PIPELINE} on all workers")
            for w in ("w0", "w1"):
                await expect(command.locator(f'li[data-worker="{w}"]')).to_contain_text(f"{w}: ok", timeout=ACK_WAIT_MS)
            acked_ms = int(time.time() * 1000)
            await expect(page.locator(f"{pipe} .pipeline-head .state")).to_have_text("paused", timeout=10_000)
            for w in ("w0", "w1"):
                await expect(page.locator(f'{pipe} table.pipeline-workers tr[data-worker="{w}"] td.state')
                             ).to_have_text("paused")
                for step in STEPS:
                    await expect(page.locator(f'{pipe} section.step[data-step="{step}"] tr[data-worker="{w}"] td.state')
                                 ).to_have_text("paused")
                await expect(page.locator(f'article.model[data-model="digits"] tr[data-worker="{w}"] td.state')
                             ).to_have_text("running")
            beats = await heartbeats_after(kafka_bootstrap, prefix, acked_ms, lambda d: len(d) == 2, 10)
            for w in ("w0", "w1"):
                assert fetching(beats[w]) == {"digits": True, streams[0]: False, streams[1]: False}, beats[w]["state"]
            ids = {f"pp-{i}" for i in range(20)}
            await produce(kafka_bootstrap, digit_records(20, "pp", prefix, topic=f"{prefix}.pipelines.{PIPELINE}.in",
                                                         model=f"pipeline:{PIPELINE}"))
            await asyncio.sleep(2.0)
            assert not await results_by_id(kafka_bootstrap, prefix, ids, 0.5), "a paused pipeline answered"

            # -- resume: acknowledged, running again, fetching again, the waiting tasks answered ----------
            await page.locator(f'{pipe} .pipeline-head button[data-action="resume"]').click()
            resume = page.locator(f'.command[data-command="resume"][data-pipeline="{PIPELINE}"]').first
            for w in ("w0", "w1"):
                await expect(resume.locator(f'li[data-worker="{w}"]')).to_contain_text(f"{w}: ok", timeout=ACK_WAIT_MS)
            resumed_ms = int(time.time() * 1000)
            for w in ("w0", "w1"):
                await expect(page.locator(f'{pipe} table.pipeline-workers tr[data-worker="{w}"] td.state')
                             ).to_have_text("running", timeout=10_000)
            beats = await heartbeats_after(kafka_bootstrap, prefix, resumed_ms, lambda d: len(d) == 2, 10)
            for w in ("w0", "w1"):
                assert fetching(beats[w]) == {"digits": True, streams[0]: True, streams[1]: True}, beats[w]["state"]
            served = await results_by_id(kafka_bootstrap, prefix, ids, 30)
            assert set(served) == ids
            assert {doc.get("pipeline") for doc in served.values()} == {PIPELINE}

            # -- one step on one worker (its row's button): that worker's pipeline is partly paused ---------
            await page.locator(f'{pipe} section.step[data-step="second"] tr[data-worker="w1"] '
                               'button[data-action="pause"]').click()
            one = page.locator(f'.command[data-command="pause"][data-step="second"]').first
            await expect(one).to_contain_text(f"pause step second of pipeline {PIPELINE} on worker w1")
            await expect(one.locator('li[data-worker="w1"]')).to_contain_text("w1: ok", timeout=ACK_WAIT_MS)
            await expect(one.locator("li")).to_have_count(1)  # only w1 was targeted
            await expect(page.locator(f'{pipe} table.pipeline-workers tr[data-worker="w1"] td.state')
                         ).to_have_text("partly paused", timeout=10_000)
            await expect(page.locator(f'{pipe} table.pipeline-workers tr[data-worker="w0"] td.state')
                         ).to_have_text("running")
            await expect(page.locator(f'{pipe} section.step[data-step="first"] tr[data-worker="w1"] td.state')
                         ).to_have_text("running")
            shot = os.environ.get("AUTOGLM_CONSOLE_PIPELINE_SCREENSHOT")  # docs/console-pipeline.png
            if shot:
                await page.locator("#pipelines-section").screenshot(path=shot)

            # -- the form: resume that step on w1 (pipeline and step picked from the pipelines shown) ------
            await page.select_option("#control-command", "resume")
            await page.select_option("#control-pipeline", PIPELINE)
            await page.select_option("#control-step", "second")
            await page.select_option("#control-worker", "w1")
            await page.click("#control-send")
            again = page.locator('.command[data-command="resume"][data-step="second"]').first
            await expect(again).to_contain_text(f"resume step second of pipeline {PIPELINE} on worker w1")
            await expect(again.locator('li[data-worker="w1"]')).to_contain_text("w1: ok", timeout=ACK_WAIT_MS)
            await expect(page.locator(f'{pipe} table.pipeline-workers tr[data-worker="w1"] td.state')
                         ).to_have_text("running", timeout=10_000)
        finally:
            await browser.close()
    assert alive(), workers.log(procs[1])
