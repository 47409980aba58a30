"""Brokers and workers for integration tests.

- ``kafka_bootstrap``: a real Apache Kafka (KRaft). ``AUTOGLM_TEST_KAFKA``
  (host:port) points at a running one (CI starts it with
  ``docker/kafka/kafka.sh``); otherwise this session starts one with that
  script on a free port and stops it at the end.
- ``embedded_bootstrap``: the embedded broker (Tansu).
- ``worker_factory``: starts ``autoglm worker`` child processes; each test
  gets a unique topic prefix and consumer group.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Sequence

import pytest

from autoglm.streams.embedded import EmbeddedBroker, free_port

ROOT = Path(__file__).resolve().parents[2]
KAFKA_SH = ROOT / "docker" / "kafka" / "kafka.sh"

#: group timeouts that keep the embedded broker's join short (see ARCHITECTURE.md)
EMBEDDED_ENV = {"AUTOGLM_REBALANCE_TIMEOUT_S": "6", "AUTOGLM_SESSION_TIMEOUT_S": "6",
                "AUTOGLM_HEARTBEAT_INTERVAL_S": "1"}


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory) -> str:
    given = os.environ.get("AUTOGLM_TEST_KAFKA")
    if given:
        yield given
        return
    port = free_port()
    data = tmp_path_factory.mktemp("kafka")
    proc = subprocess.run(
        ["bash", str(KAFKA_SH), "start", "--port", str(port), "--controller-port", str(free_port()),
         "--data-dir", str(data / "d")],
        capture_output=True, text=True, timeout=600,
    )
    if proc.returncode != 0:
        pytest.fail(f"could not start Apache Kafka with {KAFKA_SH}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run(["bash", str(KAFKA_SH), "stop", "--port", str(port), "--data-dir", str(data / "d")],
                       capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def embedded_bootstrap(tmp_path_factory) -> str:
    log = tmp_path_factory.mktemp("tansu") / "tansu.log"
    with EmbeddedBroker(log_path=log) as broker:
        yield broker.bootstrap_servers


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> str:
    """One model cache for the session, shared by workers and offline references."""
    path = os.environ.get("AUTOGLM_CACHE_DIR") or str(tmp_path_factory.mktemp("model-cache"))
    os.environ["AUTOGLM_CACHE_DIR"] = path
    return path


@pytest.fixture
def prefix() -> str:
    return f"it-{uuid.uuid4().hex[:10]}"


class Workers:
    """Starts and stops ``autoglm worker`` processes; logs go to the test's tmp dir."""

    def __init__(self, tmp_path: Path, model_cache: str):
        self.tmp_path = tmp_path
        self.model_cache = model_cache
        self.procs: list[subprocess.Popen] = []

    def start(self, bootstrap: str, prefix: str, models: str | None = "digits", *, embedded: bool = False,
              command: Sequence[str] = ("worker",), **settings: str) -> subprocess.Popen:
        """Start ``python -m autoglm <command>`` (default ``worker``) with the settings as ``AUTOGLM_*`` env.

        Args:
            models: ``AUTOGLM_MODELS``; None leaves it unset (a pipeline worker then serves its steps only).
            command: the CLI command and its arguments, e.g. ``("pipeline", "run", FILE)`` or
                ``("worker", "--pipeline", FILE)``.
        """
        env = {**os.environ, "AUTOGLM_BOOTSTRAP_SERVERS": bootstrap, "AUTOGLM_TOPIC_PREFIX": prefix,
               "AUTOGLM_MODELS": models or "", "AUTOGLM_CACHE_DIR": self.model_cache,
               "AUTOGLM_WORKER_ID": f"w{len(self.procs)}", "AUTOGLM_COMMIT_INTERVAL_S": "0.2",
               "AUTOGLM_TORCH_THREADS": "1",
               # short group timeouts: a killed worker's partitions move within seconds
               "AUTOGLM_SESSION_TIMEOUT_S": "6", "AUTOGLM_HEARTBEAT_INTERVAL_S": "1",
               "AUTOGLM_REBALANCE_TIMEOUT_S": "10"}
        if embedded:
            env.update(EMBEDDED_ENV)
        if models is None:
            del env["AUTOGLM_MODELS"]
        env.update({f"AUTOGLM_{k.upper()}": str(v) for k, v in settings.items()})
        log = open(self.tmp_path / f"worker-{len(self.procs)}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "autoglm", *command], env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        proc.log_path = log.name  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def log(self, proc: subprocess.Popen) -> str:
        return Path(proc.log_path).read_text(errors="replace")[-4000:]  # type: ignore[attr-defined]

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def workers(tmp_path, model_cache):
    w = Workers(tmp_path, model_cache)
    yield w
    w.stop_all()


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


class RestartableKafka:
    """A dedicated single-node Apache Kafka that a test may stop and start again, data kept.

    ``start`` runs ``kafka.sh start`` (a freshly formatted data dir) on free ports. ``stop`` runs
    ``kafka.sh stop`` (SIGTERM, a clean broker shutdown). ``restart`` relaunches the very JVM
    command line of the first start (read from ``/proc/<pid>/cmdline``) on the same ports and
    data dir, since ``kafka.sh start`` would wipe the data: topics, records and committed offsets
    survive, as in a real broker restart. The relaunched JVM is detached like ``kafka.sh`` does
    (``nohup ... &`` in a shell that exits), and its pid goes to the pid file that ``kafka.sh
    stop`` reads.
    """

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.port = free_port()
        self.controller_port = free_port()
        while self.controller_port == self.port:
            self.controller_port = free_port()
        self.cmdline: list[str] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "kafka.pid"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "kafka.log"

    def start(self) -> None:
        proc = subprocess.run(
            ["bash", str(KAFKA_SH), "start", "--port", str(self.port), "--controller-port",
             str(self.controller_port), "--data-dir", str(self.data_dir)],
            capture_output=True, text=True, timeout=600,
        )
        if proc.returncode != 0:
            pytest.fail(f"could not start Apache Kafka with {KAFKA_SH}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        pid = int(self.pid_file.read_text().strip())
        self.cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").decode().split("\0")

    def stop(self) -> None:
        subprocess.run(["bash", str(KAFKA_SH), "stop", "--port", str(self.port), "--data-dir", str(self.data_dir)],
                       capture_output=True, timeout=90)

    def restart(self, timeout_s: float = 90.0) -> float:
        """Start the stopped broker again from its data; returns the seconds until it answered."""
        assert self.cmdline, "restart() needs a broker started with start()"
        assert not port_open("127.0.0.1", self.port), "the broker is still running"
        started = self.log_file.read_text(errors="replace").count("Kafka Server started")
        t0 = time.monotonic()
        out = subprocess.run(
            ["bash", "-c", 'nohup "$@" </dev/null >>"$LOG" 2>&1 & echo $!', "restart", *self.cmdline],
            env={**os.environ, "LOG": str(self.log_file)}, capture_output=True, text=True, timeout=30, check=True,
        )
        self.pid_file.write_text(out.stdout.strip() + "\n")
        wait_for(lambda: self.log_file.read_text(errors="replace").count("Kafka Server started") > started
                 and port_open("127.0.0.1", self.port), timeout_s, "the restarted broker", interval_s=0.25)
        return time.monotonic() - t0


@pytest.fixture
def restartable_kafka(tmp_path):
    """A dedicated Apache Kafka for this test only (see :class:`RestartableKafka`), stopped at the end."""
    kafka = RestartableKafka(tmp_path / "kafka")
    kafka.start()
    try:
        yield kafka
    finally:
        kafka.stop()
