"""``autoglm pipeline validate`` and ``dry-run`` on the shipped digits routing example (real models, no broker)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from autoglm.cli import app

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pipelines" / "digits-routing"
PIPELINE = EXAMPLE / "pipeline.yaml"
SAMPLES = EXAMPLE / "samples.jsonl"
THRESHOLD = 0.95  # the example's ``when``


@pytest.fixture(scope="module", autouse=True)
def model_cache(tmp_path_factory):
    """The digits models train once into a cache of this module's own (seconds)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AUTOGLM_CACHE_DIR", str(tmp_path_factory.mktemp("pipeline-cache")))
        mp.delenv("AUTOGLM_MODEL_REPO", raising=False)
        yield


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def test_validate_a_good_file_exits_0_and_prints_the_dag():
    result = run("pipeline", "validate", str(PIPELINE))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "pipeline digits-routing: 2 step(s)" in lines[0] and "latency target 0.2 s" in lines[0]
    assert lines[1].startswith("  1. first (digits) <- input") and "latency target 0.1 s" in lines[1]
    assert lines[2].startswith("  2. second (digits-linear) <- input when max(first.outputs.probabilities) < 0.95")
    dag = json.loads(run("pipeline", "validate", str(PIPELINE), "--json").stdout)
    assert dag["ok"] and [s["name"] for s in dag["pipeline"]["steps"]] == ["first", "second"]
    assert [s["latency_target_s"] for s in dag["pipeline"]["steps"]] == pytest.approx([0.1, 0.1])


def test_validate_a_bad_file_exits_2_with_every_error_and_its_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(PIPELINE.read_text().replace("model: digits-linear", "model: digits-cubic")
                   .replace("max(first.outputs.probabilities)", "max(first.outputs.logits)")
                   .replace("name: digits-routing", "name: digits routing"))
    result = run("pipeline", "validate", str(bad))
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3, result.stderr
    assert errors[0].startswith(f"error: {bad}:3: key 'name'")
    assert errors[1].startswith(f"error: {bad}:15: key 'steps[1].model': model 'digits-cubic': no such model")
    assert errors[2].startswith(f"error: {bad}:17: key 'steps[1].when': dangling reference 'first.outputs.logits'")
    out = json.loads(run("pipeline", "validate", str(bad), "--json").stdout)
    assert not out["ok"] and [e["line"] for e in out["errors"]] == [3, 15, 17]
    assert all(e["file"] == str(bad) for e in out["errors"])


def by_hand() -> dict[str, dict[str, np.ndarray]]:
    """The example, run by hand: digits on every task, digits-linear on those whose top probability is low."""
    from autoglm.models.digits import DigitsLinearModel, DigitsModel
    from autoglm.models.runner import ModelRunner

    out = {}
    with ModelRunner(DigitsModel(), device="cpu") as cnn, ModelRunner(DigitsLinearModel(), device="cpu") as lin:
        for line in SAMPLES.read_text().splitlines():
            task = json.loads(line)
            x = np.asarray(task["inputs"], np.float32)
            first = cnn.run_sync([cnn.model.prepare(x)])[0]
            out[task["id"]] = {"first.probabilities": first}
            if first.max(axis=1).min() < THRESHOLD:
                out[task["id"]]["second.probabilities"] = lin.run_sync([lin.model.prepare(x)])[0]
    return out


def test_dry_run_equals_running_the_models_one_after_the_other():
    from autoglm.pipelines import dry_run, load_pipeline, read_samples

    pipeline = load_pipeline(PIPELINE)
    run_ = dry_run(pipeline, read_samples(SAMPLES, pipeline))
    expected = by_hand()
    assert [r.id for r in run_.results] == list(expected)
    routed = 0
    for result in run_.results:
        assert result.status == "ok"
        assert sorted(result.outputs) == sorted(expected[result.id])
        for name, value in expected[result.id].items():
            np.testing.assert_allclose(result.outputs[name], value, rtol=1e-5, atol=1e-6)
        routed += "second.probabilities" in result.outputs
    assert 0 < routed < len(expected)  # the samples exercise both routes
    first, second = run_.steps
    assert first.batch_sizes == [12] and first.ran == 12
    assert second.batch_sizes == [routed] and second.skipped == 12 - routed
    assert len(first.service_s) == 1 and first.service_s[0] > 0
    # the labels: the CNN is right on the tasks it is sure of
    for result in run_.results:
        if "second.probabilities" not in result.outputs:
            assert str(int(result.outputs["first.probabilities"].argmax())) == result.attributes["label"]


def test_dry_run_cli_json_parses_and_text_lists_tasks_and_steps():
    result = run("pipeline", "dry-run", str(PIPELINE), "--inputs", str(SAMPLES), "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["pipeline"] == "digits-routing" and len(doc["tasks"]) == 12
    pair = next(t for t in doc["tasks"] if t["id"] == "pair")
    assert pair["intermediate"]["first"]["probabilities"] == {"dtype": "float32", "shape": [2, 10]}
    assert pair["outputs"]["first.probabilities"]["shape"] == [2, 10]
    assert np.allclose(np.sum(pair["outputs"]["first.probabilities"]["data"], axis=1), 1.0, atol=1e-5)
    assert [s["name"] for s in doc["steps"]] == ["first", "second"] and doc["steps"][0]["batch_sizes"] == [12]
    # the 0.2 s target split by the measured mean service times: one path, so in their proportion, summing to 0.2
    first, second = doc["steps"]
    assert first["measured_latency_target_s"] + second["measured_latency_target_s"] == pytest.approx(0.2)
    ratio = first["measured_latency_target_s"] / second["measured_latency_target_s"]
    assert ratio == pytest.approx(first["service_ms"][0] / second["service_ms"][0], rel=1e-2)
    text = run("pipeline", "dry-run", str(PIPELINE), "--inputs", str(SAMPLES))
    assert text.exit_code == 0
    assert "task d0: ok" in text.stdout and "first: probabilities float32 (1, 10)" in text.stdout
    assert "first (digits): 12 ran, 0 skipped, 0 failed; batch sizes [12]" in text.stdout


def test_a_bad_sample_line_names_the_file_and_line(tmp_path):
    samples = tmp_path / "s.jsonl"
    samples.write_text('{"inputs": [[0.0]]}\n{"inputs": [1, "x"]}\n')
    result = run("pipeline", "dry-run", str(PIPELINE), "--inputs", str(samples))
    assert result.exit_code == 2 and f"{samples}:2:" in result.stderr


def test_a_task_the_model_refuses_gets_an_error_result_and_exit_1(tmp_path):
    samples = tmp_path / "s.jsonl"
    samples.write_text('{"id": "short", "inputs": [[0.5, 0.5, 0.5]]}\n' + SAMPLES.read_text().splitlines()[0] + "\n")
    result = run("pipeline", "dry-run", str(PIPELINE), "--inputs", str(samples), "--json")
    assert result.exit_code == 1
    short, good = json.loads(result.stdout)["tasks"]
    assert short["status"] == "error" and short["error"]["code"] == "input_signature"
    assert short["error"]["message"].startswith("step 'first': ")
    assert good["status"] == "ok"


REPO = Path(__file__).resolve().parents[2] / "examples" / "model-repo"


def test_a_repository_model_with_named_outputs_routes_on_a_scalar_output(tmp_path):
    """ranker (examples/model-repo, a python model): scores float32 (B, 3) and best int64 (B);
    a second ranker step runs only for tasks whose best index is 2, and the result takes renamed outputs."""
    from autoglm.pipelines import dry_run, load_pipeline, read_samples

    spec = tmp_path / "pipeline.yaml"
    spec.write_text("name: rank-twice\nsteps:\n  - {name: rank, model: ranker, inputs: [input]}\n"
                    "  - name: again\n    model: ranker\n    inputs: [input]\n    when: rank.outputs.best == 2\n"
                    "output: {best: rank.outputs.best, again: again.outputs.scores}\n")
    rows = [[1.0] * 8, [-1.0] * 8]  # scores = x @ W: all ones -> increasing scores (best 2); all minus ones -> best 0
    samples = tmp_path / "s.jsonl"
    samples.write_text("".join(json.dumps({"id": f"r{i}", "inputs": [row]}) + "\n" for i, row in enumerate(rows)))
    pipeline = load_pipeline(spec, REPO)
    up, down = dry_run(pipeline, read_samples(samples, pipeline), model_repo=REPO).results
    weights = (np.arange(24, dtype=np.float32).reshape(8, 3) - 12.0) / 24.0
    assert up.outputs["best"].tolist() == [2] and down.outputs["best"].tolist() == [0]
    np.testing.assert_allclose(up.outputs["again"], np.asarray([rows[0]], np.float32) @ weights, rtol=1e-6)
    assert "again" not in down.outputs and down.skipped["again"].startswith("skipped: when 'rank.outputs.best == 2'")


def test_validate_against_a_repository_reports_an_invalid_model_yaml(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.yaml").write_text("format: python\nfactory: 'x:y'\ninputs: []\noutputs: []\n")
    spec = tmp_path / "p.yaml"
    spec.write_text("name: p\nsteps:\n  - {name: a, model: broken, inputs: [input]}\noutput: a.outputs\n")
    result = run("pipeline", "validate", str(spec), "--model-repo", str(tmp_path))
    assert result.exit_code == 2
    assert f"{spec}:3: key 'steps[0].model': model 'broken': its model.yaml is invalid:" in result.stderr
    assert "key 'inputs'" in result.stderr


def test_pipeline_run_refuses_an_invalid_file_before_any_broker_or_model(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOGLM_BOOTSTRAP_SERVERS", "127.0.0.1:9")  # nothing listens: it must not get there
    bad = tmp_path / "bad.yaml"
    bad.write_text(PIPELINE.read_text().replace("model: digits-linear", "model: digits-cubic"))
    result = run("pipeline", "run", str(bad))
    assert result.exit_code == 2
    assert f"error: {bad}:15: key 'steps[1].model': model 'digits-cubic': no such model" in result.stderr


def test_cli_target_and_topic_checks_exit_2_before_publishing(monkeypatch):
    monkeypatch.setenv("AUTOGLM_BOOTSTRAP_SERVERS", "127.0.0.1:9")
    step_alone = run("ctl", "pause", "--step", "second")
    assert step_alone.exit_code == 2 and "give --pipeline too" in step_alone.stderr
    topic_alone = run("publish", "--digits", "3", "--topic", "elsewhere")
    assert topic_alone.exit_code == 2 and "--topic goes with --pipeline" in topic_alone.stderr


def test_a_pipeline_worker_serves_its_pipelines_only_unless_models_are_named(monkeypatch):
    from autoglm.config import load_settings

    monkeypatch.delenv("AUTOGLM_MODELS", raising=False)
    assert load_settings(pipelines=(str(PIPELINE),)).models == ()
    assert load_settings(pipelines=(str(PIPELINE),), models="digits").models == ("digits",)
    monkeypatch.setenv("AUTOGLM_PIPELINES", f"{PIPELINE}, other.yaml")
    assert load_settings().pipelines == (str(PIPELINE), "other.yaml") and load_settings().models == ()
