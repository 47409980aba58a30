"""``autoglm models validate`` and ``models list`` as a user runs them on a repository."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from autoglm.cli import app
from tests.unit.models import repo_fixtures as rf

pytestmark = pytest.mark.e2e


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def test_a_good_repository_passes_with_a_table_and_json(tmp_path):
    rf.torchscript_model(tmp_path)
    rf.python_model(tmp_path, module="two_heads_cli_good")
    proc = subprocess.run([sys.executable, "-m", "autoglm", "models", "validate", str(tmp_path), "--repeats", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 of 2 model(s) pass" in proc.stdout
    tiny = next(line for line in proc.stdout.splitlines() if "│ tiny" in line)
    assert "torchscript" in tiny and "x: float32 (B, 4)" in tiny and "y: float32 (B, 3)" in tiny and "ok" in tiny
    assert "logits: float32 (B, 3); label: int64 (B)" in proc.stdout

    result = run("models", "validate", str(tmp_path), "--json", "--repeats", "2", "--model", "two-heads")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["model"] for r in rows] == ["two-heads"]
    row = rows[0]
    assert row["ok"] and row["format"] == "python" and row["device"] == "cpu" and row["error"] is None
    assert row["batch1_ms"] > 0 and row["max_batch_ms"] > 0 and row["max_batch"] == 64
    assert len(row["version"]["sha256"]) == 16


BAD = {
    "missing file": ("file", lambda root: _missing(root)),
    "bad dtype": ("inputs[0].dtype", lambda root: _edit(root, "dtype: float32, shape: [4]", "dtype: float33, shape: [4]")),
    "signature mismatch": ("outputs[0].shape", lambda root: _edit(root, "shape: [3]", "shape: [3, 2]")),
    "factory import error": ("factory", lambda root: _python(root)),
    "unknown key": ("max_row", lambda root: _edit(root, "max_rows: 8", "max_row: 8")),
}


def _missing(root):
    rf.torchscript_model(root, "m")
    (root / "m" / "model.pt").unlink()


def _edit(root, old, new):
    rf.torchscript_model(root, "m")
    path = root / "m" / "model.yaml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def _python(root):
    path = rf.python_model(root, "m", module="two_heads_cli_bad")
    (root / "m" / "two_heads_cli_bad.py").write_text("import numpy as np\nfrom no_such_package_zz import thing\n")
    return path


@pytest.mark.parametrize("kind", sorted(BAD))
def test_each_kind_of_mistake_exits_2_naming_the_file_and_the_key(tmp_path, kind):
    key, make = BAD[kind]
    make(tmp_path)
    rf.torchscript_model(tmp_path, "fine")
    result = run("models", "validate", str(tmp_path), "--repeats", "1")
    assert result.exit_code == 2, result.output
    assert "1 of 2 model(s) pass" in result.stdout
    message = next(line for line in result.stderr.splitlines() if line.startswith("error: m:"))
    assert f"{tmp_path / 'm' / 'model.yaml'}: key {key!r}: expected" in message
    rows = json.loads(run("models", "validate", str(tmp_path), "--json", "--repeats", "1").stdout)
    bad = next(r for r in rows if r["model"] == "m")
    assert (bad["ok"], bad["error_key"], bad["file"]) == (False, key, str(tmp_path / "m" / "model.yaml"))
    assert next(r for r in rows if r["model"] == "fine")["ok"]


def test_an_unknown_model_or_an_empty_folder_exits_2(tmp_path):
    result = run("models", "validate", str(tmp_path))
    assert result.exit_code == 2 and "holds no <name>/model.yaml" in result.stderr
    rf.torchscript_model(tmp_path)
    result = run("models", "validate", str(tmp_path), "--model", "nope")
    assert result.exit_code == 2 and "no model 'nope' in repository" in result.stderr


def test_models_list_shows_the_repository_and_the_built_ins(tmp_path):
    rf.torchscript_model(tmp_path)
    result = run("models", "list", "--model-repo", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert set(rows) == {"tiny", "digits", "digits-linear", "minilm"}
    assert rows["tiny"]["source"] == "repository" and rows["tiny"]["max_rows"] == 8
    assert rows["tiny"]["inputs"] == "x: float32 (B, 4)" and rows["digits-linear"]["source"] == "built-in"
    table = run("models", "list", "--model-repo", str(tmp_path)).stdout
    assert "tiny" in table and "torchscript" in table and rows["tiny"]["version"]["sha256"] in table
