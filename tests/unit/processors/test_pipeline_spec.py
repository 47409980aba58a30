"""``pipeline.yaml`` validation: each error kind with its file and line, all of them reported together."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

import pytest

from autoglm.processors.pipeline_spec import validate_pipeline
from autoglm.processors.signatures import DTYPES, Port, port_mismatch


@dataclass(frozen=True)
class Sig:
    inputs: tuple
    outputs: tuple


MODELS = {
    "digits": Sig((Port("image", "float32", (64,)),), (Port("probabilities", "float32", (10,)),)),
    "embed": Sig((Port("text", "str", (), True),), (Port("embedding", "float32", (384,)),)),
    "head": Sig((Port("embedding", "float32", (384,)),), (Port("logits", "float32", (3,)), Port("label", "int64", ()))),
    "pair": Sig((Port("a", "float32", (10,)), Port("b", "float32", (10,))), (Port("score", "float32", (1,)),)),
    "ints": Sig((Port("x", "int64", (3,)),), (Port("y", "float64", (3,)),)),
    "narrow": Sig((Port("x", "float32", (3,)),), (Port("y", "float32", (-1,)),)),
}


def lookup(name: str) -> Sig:
    if name not in MODELS:
        raise LookupError(f"no such model; known: {', '.join(MODELS)}")
    return MODELS[name]


def check(text: str):
    return validate_pipeline(textwrap.dedent(text).lstrip("\n"), "p.yaml", lookup)


def errors_of(text: str) -> list[tuple[int, str, str]]:
    pipeline, errors = check(text)
    assert pipeline is None and errors
    return [(e.line, e.key, e.reason) for e in errors]


GOOD = """
name: text-classify
latency_target_s: 0.4
steps:
  - name: classify
    model: head
    inputs: [embed.outputs.embedding]
    service_time_s: 0.001
  - name: embed
    model: embed
    inputs: input
    service_time_s: 0.003
output:
  label: classify.outputs.label
  logits: classify.outputs.logits
"""


def test_a_good_file_gives_the_dag_in_topological_order_with_split_targets():
    pipeline, errors = check(GOOD)
    assert errors == []
    assert [s.name for s in pipeline.steps] == ["embed", "classify"]  # declared the other way round
    assert [s.line for s in pipeline.steps] == [8, 4]
    # proportional to the declared service times along the one path: 0.4 * 3/4 and 0.4 * 1/4
    assert pipeline.step("embed").latency_target_s == pytest.approx(0.3)
    assert pipeline.step("classify").latency_target_s == pytest.approx(0.1)
    assert {k: r.text for k, r in pipeline.outputs.items()} == {
        "label": "classify.outputs.label", "logits": "classify.outputs.logits"}
    assert pipeline.topic("autoglm") == "autoglm.pipelines.text-classify.in"


def test_a_list_output_is_named_step_dot_output_and_a_whole_step_expands():
    pipeline, errors = check("""
        name: p
        steps:
          - {name: e, model: embed, inputs: [input]}
          - {name: h, model: head, inputs: [e.outputs]}
        output: [h.outputs, e.outputs.embedding]
    """)
    assert errors == []
    assert list(pipeline.outputs) == ["h.logits", "h.label", "e.embedding"]


@pytest.mark.parametrize("text, line, key, reason", [
    ("name: p\nsteps: [\n  - a: b\n", 3, "", "invalid YAML"),
    ("name: p\nsteps:\n  - name: a\n    model: digits\n    inputs: [input]\n    colour: red\noutput: a.outputs\n",
     6, "steps[0].colour", "unknown key 'colour'"),
    ("name: p\nfoo: 1\nsteps:\n  - {name: a, model: digits, inputs: [input]}\noutput: a.outputs\n",
     2, "foo", "unknown key"),
    ("name: p\nsteps:\n  - {name: a, model: digits, inputs: [input], batching: {max_batch: 3}}\noutput: a.outputs\n",
     3, "steps[0].batching.max_batch", "unknown key"),
    ("name: p\nsteps:\n  - {name: a, model: digits, inputs: [input]}\n  - name: b\n    model: digits\n"
     "    inputs: [x.outputs.probabilities]\noutput: a.outputs\n", 6, "steps[1].inputs[0]", "dangling reference"),
    ("name: p\nsteps:\n  - {name: a, model: digits, inputs: [input]}\noutput: a.outputs.logits\n",
     4, "output", "has the outputs probabilities"),
    ("name: p\nsteps:\n  - name: a\n    model: digits\n    inputs: [a.output.probabilities]\noutput: a.outputs\n",
     5, "steps[0].inputs[0]", "malformed reference"),
    ("name: p\nsteps:\n  - {name: a, model: narrow, inputs: [b.outputs.y]}\n  - {name: b, model: narrow, "
     "inputs: [a.outputs.y]}\noutput: a.outputs\n", 3, "steps[0]", "cycle: a -> b -> a"),
    ("name: p\nsteps:\n  - {name: a, model: nosuch, inputs: [input]}\noutput: a.outputs\n",
     3, "steps[0].model", "model 'nosuch': no such model"),
    ("name: p\nsteps:\n  - {name: a, model: digits, inputs: [input]}\n  - {name: a, model: digits, inputs: [input]}\n"
     "output: a.outputs\n", 4, "steps[1].name", "collides with the step at line 3"),
    ("name: p\nsteps:\n  - {name: input, model: digits, inputs: [input]}\noutput: [input.outputs]\n",
     3, "steps[0].name", "reserved"),
    ("name: p\nsteps:\n  - {name: a, model: digits, inputs: [input]}\n  - {name: in, model: digits, inputs: [input]}\n"
     "output: [a.outputs]\n", 4, "steps[1].name", "in is the input topic's last part"),
    ("name: p\nsteps:\n  - {name: a, model: digits, inputs: [input]}\n  - {name: b, model: digits, inputs: [input]}\n"
     "output:\n  x: a.outputs.probabilities\n  y: b.outputs.probabilities\n  x: b.outputs.probabilities\n",
     8, "output.x", "duplicate key 'x' (first at line 6)"),
    ("name: p\nsteps:\n  - {name: a, model: digits, inputs: [input]}\n  - {name: b, model: digits, inputs: [input]}\n"
     "output: [a.outputs, a.outputs.probabilities]\n", 5, "output[1]", "result name 'a.probabilities' collides"),
    # signatures: per-row shape, dtype, text vs tensor, names
    ("name: p\nsteps:\n  - {name: a, model: digits, inputs: [input]}\n  - name: b\n    model: digits\n"
     "    inputs: [a.outputs.probabilities]\noutput: b.outputs\n", 6, "steps[1].inputs",
     "per-row shape: image: float32 (B, 64), gets probabilities: float32 (B, 10)"),
    ("name: p\nsteps:\n  - {name: a, model: ints, inputs: [input]}\n  - {name: b, model: ints, "
     "inputs: [a.outputs.y]}\noutput: b.outputs\n", 4, "steps[1].inputs", "takes int64, gets float64"),
    ("name: p\nsteps:\n  - {name: a, model: digits, inputs: [input]}\n  - {name: b, model: embed, "
     "inputs: [a.outputs]}\noutput: b.outputs\n", 4, "steps[1].inputs", "input 'text' takes text, gets a tensor"),
    ("name: p\ninput:\n  signature: [{name: t, text: true}]\nsteps:\n  - {name: a, model: digits, inputs: [input]}\n"
     "output: a.outputs\n", 5, "steps[0].inputs", "takes a tensor (image: float32 (B, 64)), gets text"),
    ("name: p\nsteps:\n  - {name: a, model: digits, inputs: [input]}\n  - {name: b, model: digits, inputs: [input]}\n"
     "  - {name: c, model: pair, inputs: [a.outputs, b.outputs]}\noutput: c.outputs\n", 5, "steps[2].inputs",
     "gives the tensors probabilities, probabilities; model 'pair' takes a, b"),
    ("name: p\nsteps:\n  - {name: a, model: digits, inputs: [input]}\n  - name: b\n    model: digits\n"
     "    inputs: [input]\n    when: a.outputs.probabilities > 0.5\noutput: b.outputs\n", 7, "steps[1].when",
     "not a scalar per row"),
    ("name: p\nsteps:\n  - {name: a, model: digits, inputs: [input]}\n  - name: b\n    model: digits\n"
     "    inputs: [input]\n    when: median(a.outputs.probabilities) > 0.5\noutput: b.outputs\n", 7, "steps[1].when",
     "unknown function 'median'"),
    ("name: p\nsteps:\n  - {name: a, model: digits, inputs: [input], tensor_map: {b.outputs: x}}\noutput: a.outputs\n",
     3, "steps[0].tensor_map.b.outputs", "not among the step's inputs"),
    ("name: p\nlatency_target_s: 0.1\nsteps:\n  - {name: a, model: digits, inputs: [input], "
     "batching: {latency_target_s: 0.3}}\noutput: a.outputs\n", 2, "latency_target_s", "sum to 0.3 s, over"),
    ("name: p\nsteps:\n  - {name: a, model: digits, inputs: [input], join_window_ms: 50}\noutput: a.outputs\n",
     3, "steps[0].join_window_ms", "joins nothing"),
    ("name: p\nsteps: []\noutput: a.outputs\n", 2, "steps", "non-empty list"),
])
def test_each_error_kind_names_the_line_key_and_reason(text, line, key, reason):
    found = errors_of(text)
    assert any(l == line and k == key and reason in r for l, k, r in found), found


def test_every_error_is_reported_together_in_line_order_with_the_file():
    pipeline, errors = check("""
        name: two words
        colour: blue
        steps:
          - name: a
            model: digits
            inputs: [c.outputs.y]
          - name: b
            model: nosuch
            inputs: [a.outputs.logits]
          - name: c
            model: narrow
            inputs: [a.outputs.probabilities]
          - {name: a, model: digits, inputs: [input]}
        output: [a.outputs, nope.outputs.x]
    """)
    assert pipeline is None
    lines = [e.line for e in errors]
    assert lines == sorted(lines)
    kinds = {(e.line, e.key): e.reason for e in errors}
    assert "name" in kinds.get((1, "name"), "name") and (1, "name") in kinds
    assert (2, "colour") in kinds
    assert "cycle" in kinds[(4, "steps[0]")]
    assert "no such model" in kinds[(8, "steps[1].model")]
    assert "dangling" in kinds[(9, "steps[1].inputs[0]")]
    assert "per-row shape" in kinds[(12, "steps[2].inputs")]
    assert "collides" in kinds[(13, "steps[3].name")]
    assert "dangling" in kinds[(14, "output[1]")]
    assert all(str(e).startswith(f"p.yaml:{e.line}: ") for e in errors)


def test_a_file_that_is_not_a_mapping_and_a_missing_name():
    assert "expected a YAML mapping" in errors_of("- 1\n- 2\n")[0][2]
    assert errors_of("steps:\n  - {name: a, model: digits, inputs: [input]}\noutput: a.outputs\n")[0][:2] == (1, "name")


def test_safe_casts_and_variable_axes_are_accepted():
    assert port_mismatch(Port("y", "int32", (3,)), Port("x", "int64", (3,))) is None
    assert port_mismatch(Port("y", "float16", (-1,)), Port("x", "float32", (3,))) is None
    assert "no safe cast" in port_mismatch(Port("y", "float64", (3,)), Port("x", "float32", (3,)))
    assert "per-row shape" in port_mismatch(Port("y", "float32", (3, 1)), Port("x", "float32", (3,)))


def test_declared_input_signature_and_tensor_map_feed_a_two_input_model():
    pipeline, errors = check("""
        name: p
        input:
          topic: my-in
          signature: [{name: image, dtype: float32, shape: [64]}]
        steps:
          - {name: a, model: digits, inputs: [input.image]}
          - {name: b, model: digits-2, inputs: [input]}
          - name: c
            model: pair
            inputs: [a.outputs.probabilities, b.outputs.probabilities]
            tensor_map: {a.outputs.probabilities: a, b.outputs.probabilities: b}
            join_window_ms: 250
        output: {score: c.outputs.score}
    """.replace("digits-2", "digits"))
    assert errors == []
    c = pipeline.step("c")
    assert c.join_window_ms == 250 and c.sources() == ["a", "b"]
    assert pipeline.input_topic == "my-in" and pipeline.input_names == ("image",)


def test_the_wire_dtypes_are_the_model_specs():
    from autoglm.models.spec import DTYPES as MODEL_DTYPES

    assert DTYPES == MODEL_DTYPES


def test_when_parses_attributes_outputs_and_lists():
    pipeline, errors = check("""
        name: p
        input: my.topic
        steps:
          - {name: h, model: head, inputs: [input.embedding]}
          - name: g
            model: head
            inputs: [input]
            when: ['attributes.tier == "gold"', "h.outputs.label != 1", "argmax(h.outputs.logits) >= 2"]
        output: g.outputs.label
    """)
    assert errors == []
    conds = pipeline.step("g").when
    assert [(c.attribute, c.op, c.value) for c in conds[:1]] == [("tier", "==", "gold")]
    assert (conds[1].ref.text, conds[1].func, conds[1].op, conds[1].value) == ("h.outputs.label", None, "!=", 1.0)
    assert (conds[2].func, conds[2].ref.name) == ("argmax", "logits")
    assert pipeline.step("g").upstream() == ["h"] and pipeline.input_topic == "my.topic"
    assert [s.name for s in pipeline.steps] == ["h", "g"]


def test_a_bad_topic_and_a_string_compared_with_an_output():
    found = errors_of("""
        name: p
        input: {topic: "bad topic"}
        steps:
          - {name: h, model: head, inputs: [input]}
          - {name: g, model: head, inputs: [input], when: "h.outputs.label == 'x'"}
        output: g.outputs.label
    """)
    assert (2, "input.topic") in [(l, k) for l, k, _ in found]
    assert any(k == "steps[1].when" and "compares with a number" in r for _, k, r in found)
