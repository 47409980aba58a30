"""No code-executing serializer anywhere on the wire (issue: reliability, item 4)."""

from __future__ import annotations

import ast
from pathlib import Path

from autoglm.config import load_settings
from autoglm.worker import worker_config

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("autoglm", "streams", "processors", "models")


def test_faust_shell_has_raw_serializers_and_starts_no_kafka_client():
    """faust is only the worker's shell: no faust consumer or producer (the worker owns its aiokafka
    clients, which take and give bytes), and raw serializers should anything of faust's touch Kafka."""
    from faust.transport.base import Consumer, Producer

    from autoglm.streams.app import Worker, build_worker_app

    class Runner:
        model = None

    app, worker = build_worker_app(worker_config(load_settings(bootstrap_servers="k:9092")), {"digits": Runner()})
    assert app.conf.value_serializer == "raw" and app.conf.key_serializer == "raw"
    services = list(app.boot_strategy.server())
    assert not [s for s in services if isinstance(s, (Consumer, Producer))]
    assert isinstance(worker, Worker) and not app.agents


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
