"""``autoglm ctl load|unload|reload`` publish model commands as compacted desired state."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import orjson
import pytest

from ..integration.kafka_io import create_topics, read_until

pytestmark = pytest.mark.e2e


def ctl(bootstrap: str, prefix: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "AUTOGLM_BOOTSTRAP_SERVERS": bootstrap, "AUTOGLM_TOPIC_PREFIX": prefix}
    return subprocess.run([sys.executable, "-m", "autoglm", "ctl", *args], capture_output=True, text=True,
                          timeout=90, env=env)


async def test_load_unload_reload_land_in_one_compaction_slot_per_model(kafka_bootstrap, prefix):
    await create_topics(kafka_bootstrap, prefix, [])
    for command in ("load", "unload", "reload"):
        proc = ctl(kafka_bootstrap, prefix, command, "--model", "tiny", "--json")
        assert proc.returncode == 0, proc.stderr
        sent = json.loads(proc.stdout)
        assert (sent["command"], sent["target"]) == (command, {"model": "tiny"})
    missing = ctl(kafka_bootstrap, prefix, "load")
    assert missing.returncode == 2 and "--model" in missing.stderr
    records = await read_until(kafka_bootstrap, f"{prefix}.control", lambda recs: len(recs) >= 3, 30)
    assert [r.key for r in records] == [b"model/*/tiny"] * 3
    assert [orjson.loads(r.value)["command"] for r in records] == ["load", "unload", "reload"]
