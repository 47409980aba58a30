"""Every Kafka client of the worker and the CLI connects through a SASL_PLAINTEXT listener.

The broker is Apache Kafka with a SASL/PLAIN listener (``kafka.sh start --sasl-port``):
``AUTOGLM_TEST_KAFKA_SASL`` points at a running one (CI), otherwise this module starts one.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from autoglm.config import load_settings
from autoglm.streams.client import ResultReader
from autoglm.streams.control import ControlClient
from autoglm.streams.embedded import free_port
from autoglm.streams.security import client_kwargs

from .conftest import KAFKA_SH, wait_for

pytestmark = pytest.mark.integration

PASSWORD = os.environ.get("AUTOGLM_KAFKA_SASL_PASSWORD", "autoglm-secret")


@pytest.fixture(scope="module")
def sasl_bootstrap(tmp_path_factory) -> str:
    given = os.environ.get("AUTOGLM_TEST_KAFKA_SASL")
    if given:
        yield given
        return
    port, sasl_port = free_port(), free_port()
    data = tmp_path_factory.mktemp("kafka-sasl") / "d"
    proc = subprocess.run(["bash", str(KAFKA_SH), "start", "--port", str(port), "--controller-port",
                           str(free_port()), "--sasl-port", str(sasl_port), "--data-dir", str(data)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"could not start Kafka with a SASL listener:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    try:
        yield f"127.0.0.1:{sasl_port}"
    finally:
        subprocess.run(["bash", str(KAFKA_SH), "stop", "--port", str(port), "--data-dir", str(data)],
                       capture_output=True, timeout=60)


def sasl_env(password: str = PASSWORD) -> dict[str, str]:
    return {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_username": "autoglm",
            "sasl_password": password}


async def test_worker_cli_and_control_work_over_sasl(sasl_bootstrap, prefix, workers):
    settings = load_settings(bootstrap_servers=sasl_bootstrap, topic_prefix=prefix, **sasl_env())
    kwargs = client_kwargs(settings)
    worker = workers.start(sasl_bootstrap, prefix, status_interval_s="1", **sasl_env())
    env = {**os.environ, **{f"AUTOGLM_{k.upper()}": v for k, v in sasl_env().items()},
           "AUTOGLM_BOOTSTRAP_SERVERS": sasl_bootstrap, "AUTOGLM_TOPIC_PREFIX": prefix}

    def publish() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "autoglm", "publish", "--digits", "20", "--id-prefix", "s"],
                              env=env, capture_output=True, text=True, timeout=60)

    # the worker's admin client created the topics over SASL; the CLI publisher waits for them
    wait_for(lambda: publish().returncode == 0, 90, "the CLI to publish over SASL")
    seen: set[str] = set()
    async with ResultReader(sasl_bootstrap, prefix=prefix, from_beginning=True, **kwargs) as reader:
        for _ in range(120):
            seen |= {r.id for r in await reader.batches(0.5) if r.status == "ok"}
            if {f"s-{i}" for i in range(20)} <= seen:
                break
    assert {f"s-{i}" for i in range(20)} <= seen, workers.log(worker)

    async with ControlClient(sasl_bootstrap, prefix=prefix, client_kwargs=kwargs) as client:
        for _ in range(60):
            if await client.live_workers():
                break
        outcome = await client.command("pause", wait=True, timeout_s=20)
        assert outcome.ok and set(outcome.acks) == {"w0"}, outcome
        assert (await client.command("resume", wait=True, timeout_s=20)).ok
    assert worker.poll() is None


async def test_a_wrong_password_is_a_clear_error(sasl_bootstrap, prefix, workers):
    env = {**os.environ, **{f"AUTOGLM_{k.upper()}": v for k, v in sasl_env("not-the-password").items()},
           "AUTOGLM_BOOTSTRAP_SERVERS": sasl_bootstrap, "AUTOGLM_TOPIC_PREFIX": prefix}
    proc = subprocess.run([sys.executable, "-m", "autoglm", "ctl", "pause"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    assert "Authentication failed" in proc.stderr and "Traceback" not in proc.stderr
