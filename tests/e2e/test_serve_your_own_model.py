"""README "Serve your own model", top to bottom: export, validate, serve, call with the client, the CLI, kcat."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch

from autoglm import Client
from autoglm.errors import TopicMissingError

from ..integration.kafka_io import read_until

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "model-repo"
AUTOGLM = [sys.executable, "-m", "autoglm"]


def _scorer_module():
    spec = importlib.util.spec_from_file_location("make_models_example", EXAMPLE / "make_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ranker(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = x @ ((np.arange(24, dtype=np.float32).reshape(8, 3) - 12.0) / 24.0)
    return scores, scores.argmax(axis=1)


async def test_the_readme_walkthrough(kafka_bootstrap, prefix, workers, tmp_path):
    repo = tmp_path / "model-repo"
    shutil.copytree(EXAMPLE, repo, ignore=shutil.ignore_patterns("*.pt", "*.onnx", "__pycache__"))
    # 1. export
    made = subprocess.run([sys.executable, str(repo / "make_models.py"), str(repo)], capture_output=True, text=True,
                          timeout=120)
    assert made.returncode == 0, made.stderr
    assert (repo / "scorer" / "model.pt").is_file() and (repo / "scorer-onnx" / "model.onnx").is_file()
    # 3. validate, list
    checked = subprocess.run([*AUTOGLM, "models", "validate", str(repo), "--json", "--repeats", "2"],
                             capture_output=True, text=True, timeout=180)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert sorted(r["model"] for r in json.loads(checked.stdout) if r["ok"]) == ["ranker", "scorer", "scorer-onnx"]
    listed = subprocess.run([*AUTOGLM, "models", "list", "--model-repo", str(repo)], capture_output=True, text=True,
                            timeout=60)
    assert listed.returncode == 0 and "scorer-onnx" in listed.stdout and "digits" in listed.stdout
    # 4. serve every model of the repository (AUTOGLM_MODELS unset)
    proc = workers.start(kafka_bootstrap, prefix, "", model_repo=str(repo))
    # 5. the client
    scorer = _scorer_module().Scorer().eval()
    x = np.random.default_rng(7).random((5, 8), dtype=np.float32)
    with torch.no_grad():
        expected = scorer(torch.from_numpy(x)).numpy()
    async with Client(kafka_bootstrap, prefix=prefix) as client:
        deadline = time.monotonic() + 120
        while True:  # the worker creates its models' topics once the three models are loaded
            try:
                probs = await client.infer("scorer", x[:2], timeout_s=120)
                break
            except TopicMissingError:
                assert proc.poll() is None and time.monotonic() < deadline, workers.log(proc)
                await asyncio.sleep(1.0)
        assert proc.poll() is None, workers.log(proc)
        assert probs.shape == (2, 3) and np.abs(probs - expected[:2]).max() <= 1e-5
        onnx_probs = await client.infer("scorer-onnx", x, timeout_s=60)
        assert np.abs(onnx_probs - expected).max() <= 1e-5
        out = await client.infer("ranker", x[:1], timeout_s=60)
        scores, best = _ranker(x[:1])
        assert np.abs(out["scores"] - scores).max() <= 1e-5 and out["best"].tolist() == best.tolist()
        many = await client.infer_many("scorer", [x[i : i + 1] for i in range(5)], timeout_s=60)
        assert np.abs(np.concatenate(many) - expected).max() <= 1e-5
    # the CLI
    env = {**os.environ, "AUTOGLM_BOOTSTRAP_SERVERS": kafka_bootstrap, "AUTOGLM_TOPIC_PREFIX": prefix}
    (tmp_path / "x.json").write_bytes(orjson.dumps(x[:2].tolist()))
    cli = subprocess.run([*AUTOGLM, "infer", "--model", "scorer", "--input", str(tmp_path / "x.json")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert cli.returncode == 0, cli.stderr
    printed = json.loads(cli.stdout)
    assert printed["status"] == "ok" and np.abs(np.array(printed["outputs"]) - expected[:2]).max() <= 1e-5
    bad = subprocess.run([*AUTOGLM, "infer", "--model", "scorer", "--input", str(tmp_path / "x.json"),
                          "--deadline-s", "-1"], capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 1 and json.loads(bad.stdout)["error"]["code"] == "deadline"
    # 7. load, reload and unload at run time (README: "Load, unload and reload at run time")
    acks = {}
    for command in ("load", "reload", "unload", "load"):
        done = subprocess.run([*AUTOGLM, "ctl", command, "--model", "ranker", "--wait", "--timeout-s", "120", "--json"],
                              capture_output=True, text=True, timeout=180, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        sent = json.loads(done.stdout)
        assert sent["ok"] and len(sent["acks"]) == 1, sent
        acks[command] = next(iter(sent["acks"].values()))
    assert acks["reload"]["models"]["ranker"]["device"] == "cpu"
    assert len(acks["reload"]["models"]["ranker"]["sha256"]) == 16
    assert acks["unload"]["models"]["ranker"] == {"unloaded": True}
    assert proc.poll() is None, workers.log(proc)
    # 6. kcat
    if shutil.which("kcat") is None:
        pytest.skip("kcat is not installed (apt-get install kcat); the rest of the walkthrough passed")
    task = {"schema": "autoglm.task/v1", "id": "k1", "model": "ranker", "inputs": [x[0].tolist()]}
    subprocess.run(["kcat", "-P", "-b", kafka_bootstrap, "-t", f"{prefix}.tasks.ranker", "-k", "k1"],
                   input=orjson.dumps(task) + b"\n", check=True, timeout=30)
    records = await read_until(kafka_bootstrap, f"{prefix}.results",
                               lambda recs: any(r.key == b"k1" for r in recs), 60, lambda: proc.poll() is None)
    doc = orjson.loads(next(r.value for r in records if r.key == b"k1"))
    assert doc["status"] == "ok" and doc["outputs"]["best"]["dtype"] == "int64"
    assert doc["outputs"]["scores"]["shape"] == [1, 3]
