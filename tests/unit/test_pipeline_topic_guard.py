"""A pipeline's input topic must not be one of the engine's own topics (found by the new-user review).

`autoglm/worker.py` `load_pipeline_stages` refused only an input topic that another pipeline of the
same worker reads or that starts with ``<prefix>.tasks.``; it accepted ``<prefix>.results``,
``<prefix>.dlq``, ``<prefix>.control``, ``<prefix>.status`` and another pipeline's intermediate
topic ``<prefix>.pipelines.<other>.<step>`` (now refused, naming the file and key). What that did
on a real broker (run by hand, 2026-12-02):

- input ``nu.results``: every result (and every ``rejected`` result the pipeline writes for it, since
  a result is not a task) is consumed again, dead-lettered and answered with a new result on
  ``nu.results``: an endless loop, ~75,000 records per partition of ``nu.results`` and the same in
  ``nu.dlq`` within 45 s, 3,150 copies of one task's result.
- input ``nu.pipelines.digits-routing.second`` on a second worker: it joins the same consumer group,
  takes 2 of the 3 partitions and dead-letters the digits-routing hops it steals (their tasks get a
  ``rejected`` ``schema`` result instead of their second step).

Pure logic (the stage builder reads only the YAML and the models' specs); no broker.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from autoglm.config import Settings
from autoglm.worker import load_pipeline_stages

_PIPELINE = """\
name: guard-{n}
input: {topic}
steps:
  - name: first
    model: digits
    inputs: [input]
output: [first.outputs.probabilities]
"""


def _settings(tmp_path: Path, topic: str) -> Settings:
    path = tmp_path / "pipeline.yaml"
    path.write_text(_PIPELINE.format(n=abs(hash(topic)) % 1000, topic=topic))
    return Settings(bootstrap_servers="127.0.0.1:9", topic_prefix="nu", pipelines=(str(path),))


def test_own_input_topic_is_accepted(tmp_path: Path) -> None:
    stages = load_pipeline_stages(_settings(tmp_path, "my-images"))
    assert [st.topic for st in stages.values()] == ["my-images"]


@pytest.mark.parametrize("topic", ["nu.results", "nu.dlq", "nu.control", "nu.status",
                                   "nu.pipelines.digits-routing.second"])
def test_engine_topic_as_input_is_refused(tmp_path: Path, topic: str) -> None:
    with pytest.raises(Exception, match=topic.replace(".", r"\.")):
        load_pipeline_stages(_settings(tmp_path, topic))
