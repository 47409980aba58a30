"""No code-executing serializer anywhere on the wire (issue: reliability, item 4)."""

from __future__ import annotations

import ast
from pathlib import Path

from autoglm.config import load_settings
from autoglm.streams.app import faust_settings

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("autoglm", "streams", "processors", "models")


def test_faust_is_configured_with_raw_serializers_only():
    conf = faust_settings(load_settings(bootstrap_servers="k:9092"))
    assert conf["value_serializer"] == "raw" and conf["key_serializer"] == "raw"


def test_no_module_of_ours_imports_pickle_or_marshal():
    offenders = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names
                              if n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "marshal")]
    assert offenders == []


def test_the_task_topic_and_agent_use_raw_bytes():
    from autoglm.streams.app import build_worker_app

    class Runner:
        model = None

    app, _ = build_worker_app(load_settings(bootstrap_servers="k:9092"), {"digits": Runner()})
    (agent,) = app.agents.values()
    channel = agent.channel
    assert channel.key_serializer == "raw" and channel.value_serializer == "raw"
