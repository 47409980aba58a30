"""`autoglm publish --pipeline P --file F`: a line without `model` gets `pipeline:P` (found by the new-user review).

`autoglm/tasks.py` `records_from_jsonl` reused its ``model`` parameter as the loop variable, so
after a line that named a model every later line without one inherited that line's model instead
of ``pipeline:<name>`` (seen on Kafka: tasks rq4/rq5 came back as model 'other'). Fixed with a
separate loop variable.
"""
from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from autoglm.tasks import records_from_jsonl

_ROW = [0.0] * 64


def test_line_without_model_gets_the_pipeline_name(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    path.write_text("\n".join(orjson.dumps(d).decode() for d in (
        {"id": "a", "inputs": [_ROW]},
        {"id": "b", "model": "other", "inputs": [_ROW]},
        {"id": "c", "inputs": [_ROW]},
    )) + "\n")
    records = records_from_jsonl(path, "nu", topic="nu.pipelines.p.in", model="pipeline:p")
    models = {orjson.loads(value)["id"]: orjson.loads(value)["model"] for _, _, value in records}
    assert [t for t, _, _ in records] == ["nu.pipelines.p.in"] * 3
    assert models == {"a": "pipeline:p", "b": "other", "c": "pipeline:p"}
