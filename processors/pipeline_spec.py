"""``pipeline.yaml``: parse and validate a pipeline of models, reporting every problem with its line.

::

    name: digits-routing                  # [a-zA-Z0-9._-]; topics are <prefix>.pipelines.<name>.*
    input:                                # optional; or just the topic as a string
      topic: my-images                    # default <prefix>.pipelines.<name>.in
      signature:                          # optional: the tasks' inputs, checked against the steps reading them
        - {name: image, dtype: float32, shape: [64]}
    latency_target_s: 0.2                 # optional: split into step targets (see split_latency)
    join_window_ms: 10000                 # default window of the steps that join several sources
    steps:
      - name: first
        model: digits                     # a repository or built-in model
        inputs: [input]                   # input, input.<name>, <step>.outputs, <step>.outputs.<name>
        tensor_map: {input: image}        # optional: reference -> the model input's name
        batching: {max_batch_size: 64, max_wait_s: 0.01, latency_target_s: 0.05}
        service_time_s: 0.004             # optional: weight of the latency split (else the model's target, else 1)
      - name: second
        model: digits-linear
        inputs: [input]
        when: "max(first.outputs.probabilities) < 0.9"   # or a list (all must hold); or attributes.k == "v"
    output:                               # a list of references (named <step>.<output>) or {name: reference}
      - first.outputs.probabilities
      - second.outputs.probabilities

:func:`validate_pipeline` reads the file with pyyaml's node API (``yaml.compose``), so each
problem carries its line, and keeps going after a problem so that all of them are reported
together, as :class:`~autoglm.processors.errors.PipelineSpecError` s. Model signatures come
from a ``lookup`` callable (the composition layer reads them from the model repository).

Nothing here imports Kafka or torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import Any, Callable, Mapping, Sequence

from autoglm.processors.dag import (
    DEFAULT_JOIN_WINDOW_MS, INPUT, OPERATORS, REDUCERS, RESERVED_STEP_NAMES, Condition, Pipeline, Ref, Step,
    heaviest_path, split_latency, topological_order,
)
from autoglm.processors.errors import PipelineSpecError
from autoglm.processors.signatures import DTYPES, ModelSignatureLike, Port, PortLike, SignatureLookup, describe_port, \
    port_mismatch
from autoglm.processors.tunables import TUNABLES
from autoglm.processors.yaml_lines import LocatedYaml, load_yaml

NAME_RE = re.compile(r"^[a-zA-Z0-9._-]{1,200}$")
STEP_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,100}$")  # no dots: a reference splits on them
TOPIC_RE = re.compile(r"^[a-zA-Z0-9._-]{1,249}$")
REF_RE = re.compile(r"^(?:(input)(?:\.([a-zA-Z0-9_-]+))?|([a-zA-Z0-9_-]+)\.outputs(?:\.([a-zA-Z0-9._-]+))?)$")
_OPS = "|".join(sorted((re.escape(o) for o in OPERATORS), key=len, reverse=True))
WHEN_RE = re.compile(rf"^\s*(?:(?P<func>[a-z]+)\(\s*(?P<fref>[^()\s]+)\s*\)|attributes\.(?P<attr>[\w.-]+)|"
                     rf"(?P<ref>[^()\s<>=!]+))\s*(?P<op>{_OPS})\s*(?P<value>.+?)\s*$")
JOIN_WINDOW_MS_MAX = 3_600_000

_TOP_KEYS = ("name", "description", "input", "latency_target_s", "join_window_ms", "steps", "output")
_INPUT_KEYS = ("topic", "signature")
_STEP_KEYS = ("name", "description", "model", "inputs", "tensor_map", "when", "batching", "join_window_ms",
              "service_time_s")
_PORT_KEYS = ("name", "dtype", "shape", "text")


# -- the checks ---------------------------------------------------------------------------------


def validate_pipeline(text: str, source: str, lookup: SignatureLookup) -> tuple[Pipeline | None, list[PipelineSpecError]]:
    """Parse and check a ``pipeline.yaml``.

    Args:
        text: the file's content.
        source: the file's path, for messages.
        lookup: a model's declared signature by name; raises ``LookupError`` (message: why) for a
            model that does not exist or whose spec is invalid.

    Returns:
        ``(pipeline, [])`` when the file is valid (steps in topological order, step latency
        targets set when the pipeline has one); ``(None, errors)`` otherwise, every problem found,
        sorted by line: YAML syntax, unknown keys, missing or ill-typed values, malformed or
        dangling references, name collisions, unknown models, cycles, signature mismatches
        between a step's inputs and what feeds them, latency targets over the pipeline's.
    """
    data, doc = load_yaml(text, source)
    if data is None and doc.errors:  # a syntax error: nothing to check further
        return None, doc.errors
    return _Checker(doc, lookup).run(data)


class _Checker:
    def __init__(self, doc: LocatedYaml, lookup: SignatureLookup):
        self.doc = doc
        self.lookup = lookup
        self.models: dict[str, ModelSignatureLike | None] = {}
        self.step_models: dict[str, str] = {}
        self.step_paths: dict[str, tuple] = {}
        self.input_ports: tuple[Port, ...] | None = None

    def err(self, path: tuple, reason: str) -> None:
        self.doc.error(path, reason)

    def run(self, data: Any) -> tuple[Pipeline | None, list[PipelineSpecError]]:
        if not isinstance(data, Mapping):
            self.err((), f"expected a YAML mapping with the keys {', '.join(_TOP_KEYS)}, got {type(data).__name__}")
            return None, self.doc.errors
        self.unknown_keys(data, (), _TOP_KEYS)
        name = data.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            self.err(("name",), "expected a name of [a-zA-Z0-9._-] (it is part of topic names), got "
                     + ("nothing" if name is None else repr(name)))
        topic = self.input(data.get("input"))
        window = self.window(data, ("join_window_ms",), DEFAULT_JOIN_WINDOW_MS)
        total = self.seconds(data, ("latency_target_s",), TUNABLES["latency_target_s"].check)
        raw_steps = self.step_list(data.get("steps"))
        steps = [s for s in (self.step(raw, i, window) for i, raw in raw_steps) if s is not None]
        known = {s.name for s in steps}
        outputs = self.outputs(data.get("output"), known)
        order = self.order(steps)
        for s in steps:
            self.signatures(s)
        if order is not None and total is not None:
            steps = self.latency(steps, order, total)
        else:
            steps = [replace(s, latency_target_s=s.batching.get("latency_target_s")) for s in steps]
        if self.doc.errors:
            return None, sorted(self.doc.errors, key=lambda e: e.line)
        by_name = {s.name: s for s in steps}
        return Pipeline(name=name, input_topic=topic, steps=tuple(by_name[n] for n in order or []),
                        outputs=outputs, latency_target_s=total, source=self.doc.source,
                        input_names=tuple(p.name for p in self.input_ports or ())), []

    # -- generic values -----------------------------------------------------------------------

    def unknown_keys(self, data: Mapping, path: tuple, known: Sequence[str]) -> None:
        for key in data:
            if key not in known:
                self.err((*path, key), f"unknown key {key!r}; expected one of {', '.join(known)}")

    def seconds(self, data: Mapping, path: tuple, check: Callable[[Any], Any]) -> float | None:
        value = data.get(path[-1])
        if value is None:
            return None
        try:
            return float(check(value))
        except ValueError as exc:
            self.err(path, str(exc))
            return None

    def window(self, data: Mapping, path: tuple, default: int) -> int:
        value = data.get(path[-1], default)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= JOIN_WINDOW_MS_MAX:
            self.err(path, f"expected an integer number of milliseconds between 1 and {JOIN_WINDOW_MS_MAX}, "
                           f"got {value!r}")
            return default
        return value

    # -- input ----------------------------------------------------------------------------------

    def input(self, value: Any) -> str | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = {"topic": value}
            path_topic: tuple = ("input",)
        elif isinstance(value, Mapping):
            self.unknown_keys(value, ("input",), _INPUT_KEYS)
            path_topic = ("input", "topic")
        else:
            self.err(("input",), f"expected a topic name or a mapping of {', '.join(_INPUT_KEYS)}, got {value!r}")
            return None
        topic = value.get("topic")
        if topic is not None and (not isinstance(topic, str) or not TOPIC_RE.match(topic)):
            self.err(path_topic, f"expected a Kafka topic name ([a-zA-Z0-9._-], at most 249), got {topic!r}")
            topic = None
        if "signature" in value:
            self.input_ports = self.ports(value["signature"], ("input", "signature"))
        return topic

    def ports(self, value: Any, path: tuple) -> tuple[Port, ...] | None:
        if not isinstance(value, list) or not value:
            self.err(path, f"expected a non-empty list of {{name, dtype, shape}} or {{name, text: true}}, got {value!r}")
            return None
        ports: list[Port] = []
        for i, item in enumerate(value):
            where = (*path, i)
            if not isinstance(item, Mapping):
                self.err(where, f"expected a mapping {{name, dtype, shape}}, got {item!r}")
                continue
            self.unknown_keys(item, where, _PORT_KEYS)
            name = item.get("name")
            if not isinstance(name, str) or not STEP_NAME_RE.match(name):
                self.err((*where, "name"), f"expected a name of [a-zA-Z0-9_-], got {name!r}")
                continue
            if name in {p.name for p in ports}:
                self.err((*where, "name"), f"name {name!r} collides with another input of the signature")
            if item.get("text") is True:
                ports.append(Port(name, "str", (), True))
                continue
            dtype, shape = item.get("dtype"), item.get("shape")
            if dtype not in DTYPES:
                self.err((*where, "dtype"), f"expected one of {', '.join(DTYPES)}, got {dtype!r}")
                continue
            if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool)
                                                      and (d >= 1 or d == -1) for d in shape):
                self.err((*where, "shape"), f"expected the shape of one row, sizes >= 1 or -1, got {shape!r}")
                continue
            ports.append(Port(name, dtype, tuple(shape)))
        return tuple(ports)

    # -- steps ----------------------------------------------------------------------------------

    def step_list(self, value: Any) -> list[tuple[int, Mapping]]:
        if not isinstance(value, list) or not value:
            self.err(("steps",), "expected a non-empty list of steps {name, model, inputs}, got "
                     + ("nothing" if value is None else repr(value)))
            return []
        out = []
        for i, raw in enumerate(value):
            if not isinstance(raw, Mapping):
                self.err(("steps", i), f"expected a step mapping {{name, model, inputs}}, got {raw!r}")
                continue
            out.append((i, raw))
        # names first, so that references to later steps resolve
        for i, raw in out:
            name = raw.get("name")
            path = ("steps", i, "name")
            if not isinstance(name, str) or not STEP_NAME_RE.match(name):
                self.err(path, f"expected a step name of [a-zA-Z0-9_-], got {'nothing' if name is None else repr(name)}")
            elif name in RESERVED_STEP_NAMES:
                self.err(path, f"step name {name!r} is reserved (input and attributes read as the pipeline "
                               "input and the task attributes; in is the input topic's last part)")
            elif name in self.step_paths:
                self.err(path, f"step name {name!r} collides with the step at line "
                               f"{self.doc.line(self.step_paths[name])}")
            else:
                self.step_paths[name] = ("steps", i)
                self.step_models[name] = raw.get("model") if isinstance(raw.get("model"), str) else ""
        return out

    def model(self, name: Any, path: tuple) -> ModelSignatureLike | None:
        if not isinstance(name, str) or not name:
            self.err(path, f"expected a model's name (a repository or built-in model), got {name!r}")
            return None
        if name not in self.models:
            try:
                self.models[name] = self.lookup(name)
            except LookupError as exc:
                self.models[name] = None
                self.err(path, f"model {name!r}: {exc.args[0] if exc.args else exc}")
                return None
        return self.models[name]

    def step(self, raw: Mapping, i: int, window: int) -> Step | None:
        path = ("steps", i)
        self.unknown_keys(raw, path, _STEP_KEYS)
        name = raw.get("name")
        mine = isinstance(name, str) and self.step_paths.get(name) == path
        self.model(raw.get("model"), (*path, "model"))
        inputs = self.refs(raw.get("inputs"), (*path, "inputs"), what="inputs")
        tensor_map = self.tensor_map(raw.get("tensor_map"), (*path, "tensor_map"), inputs)
        when = self.when(raw.get("when"), (*path, "when"))
        batching = self.batching(raw.get("batching"), (*path, "batching"))
        service = None
        if "service_time_s" in raw:
            service = self.seconds(raw, (*path, "service_time_s"), TUNABLES["latency_target_s"].check)
        step_window = self.window(raw, (*path, "join_window_ms"), window)
        if not mine or inputs is None:
            return None
        step = Step(name=name, model=raw.get("model"), inputs=tuple(inputs), tensor_map=tensor_map, when=when,
                    batching=batching, join_window_ms=step_window, service_time_s=service,
                    line=self.doc.line(path))
        if "join_window_ms" in raw and len(step.sources()) < 2:
            self.err((*path, "join_window_ms"), f"step {name!r} joins nothing (it reads only "
                     f"{', '.join(step.sources()) or 'nothing'}); a join window applies to a step with several sources")
        return step

    def refs(self, value: Any, path: tuple, *, what: str) -> list[Ref] | None:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            self.err(path, f"expected a reference or a list of them ({INPUT}, {INPUT}.<name>, <step>.outputs, "
                           f"<step>.outputs.<name>), got {'nothing' if value is None else repr(value)}")
            return None
        refs = []
        for j, text in enumerate(items):
            where = path if isinstance(value, str) else (*path, j)
            ref = self.ref(text, where)
            if ref is not None:
                refs.append(ref)
        return refs if len(refs) == len(items) else None

    def ref(self, text: Any, path: tuple) -> Ref | None:
        match = REF_RE.match(text) if isinstance(text, str) else None
        if match is None:
            self.err(path, f"malformed reference {text!r}; expected {INPUT}, {INPUT}.<name>, <step>.outputs "
                           "or <step>.outputs.<name>")
            return None
        if match.group(1):
            name = match.group(2)
            if name is not None and self.input_ports is not None and name not in {p.name for p in self.input_ports}:
                self.err(path, f"dangling reference {text!r}: the input signature has "
                               f"{', '.join(p.name for p in self.input_ports)}")
                return None
            return Ref(None, name, text)
        step, name = match.group(3), match.group(4)
        if step not in self.step_paths:
            self.err(path, f"dangling reference {text!r}: no step {step!r}; the steps are "
                           f"{', '.join(self.step_paths) or '(none)'}")
            return None
        sig = self.model_of(step)
        if name is not None and sig is not None and name not in {o.name for o in sig.outputs}:
            self.err(path, f"dangling reference {text!r}: model {self.step_models[step]!r} of step {step!r} "
                           f"has the outputs {', '.join(o.name for o in sig.outputs)}")
            return None
        return Ref(step, name, text)

    def model_of(self, step: str) -> ModelSignatureLike | None:
        model = self.step_models.get(step)
        if not model:
            return None
        if model not in self.models:
            try:
                self.models[model] = self.lookup(model)
            except LookupError:
                self.models[model] = None  # reported at the step's own 'model' key
        return self.models[model]

    def tensor_map(self, value: Any, path: tuple, inputs: list[Ref] | None) -> dict[str, str]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.err(path, f"expected a mapping of reference -> model input name, got {value!r}")
            return {}
        known = {r.text for r in inputs or []}
        for ref in inputs or []:
            sig = self.model_of(ref.step) if ref.step is not None and ref.name is None else None
            known |= {f"{ref.text}.{o.name}" for o in (sig.outputs if sig else ())}
        out = {}
        for key, target in value.items():
            if inputs is not None and key not in known:
                self.err((*path, key), f"{key!r} is not among the step's inputs ({', '.join(sorted(known))})")
            elif not isinstance(target, str) or not NAME_RE.match(target):
                self.err((*path, key), f"expected the model input's name, got {target!r}")
            else:
                out[str(key)] = target
        return out

    def when(self, value: Any, path: tuple) -> tuple[Condition, ...]:
        if value is None:
            return ()
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            self.err(path, f"expected a condition or a list of them (all must hold), got {value!r}")
            return ()
        out = []
        for j, text in enumerate(items):
            cond = self.condition(text, path if isinstance(value, str) else (*path, j))
            if cond is not None:
                out.append(cond)
        return tuple(out)

    def condition(self, text: Any, path: tuple) -> Condition | None:
        form = ("'[max|min|mean|sum|argmax](<step>.outputs.<name>) OP VALUE' or 'attributes.<key> OP VALUE', "
                f"OP one of {' '.join(OPERATORS)}")
        match = WHEN_RE.match(text) if isinstance(text, str) else None
        if match is None:
            self.err(path, f"malformed condition {text!r}; expected {form}")
            return None
        value = _literal(match.group("value"))
        if value is None:
            self.err(path, f"condition {text!r}: the value must be a number or a quoted string, "
                           f"got {match.group('value')!r}")
            return None
        op, attr = match.group("op"), match.group("attr")
        if attr is not None:
            return Condition(op, value, attribute=attr, text=text)
        func = match.group("func")
        if func is not None and func not in REDUCERS:
            self.err(path, f"condition {text!r}: unknown function {func!r}; expected one of {', '.join(REDUCERS)}")
            return None
        if isinstance(value, str):
            self.err(path, f"condition {text!r}: an output compares with a number, got the string {value!r}")
            return None
        ref = self.ref(match.group("fref") or match.group("ref"), path)
        if ref is None:
            return None
        if ref.step is None:
            self.err(path, f"condition {text!r}: a condition reads a step's output or an attribute, not the input")
            return None
        sig = self.model_of(ref.step)
        if sig is not None:
            outs = [o for o in sig.outputs if ref.name is None or o.name == ref.name]
            if len(outs) != 1:
                self.err(path, f"condition {text!r}: name one output of step {ref.step!r} "
                               f"({', '.join(o.name for o in sig.outputs)})")
                return None
            if func is None and any(d != 1 for d in outs[0].shape):
                self.err(path, f"condition {text!r}: {describe_port(outs[0])} is not a scalar per row; "
                               f"reduce it with one of {', '.join(REDUCERS)}")
                return None
        return Condition(op, value, ref=ref, func=func, text=text)

    def batching(self, value: Any, path: tuple) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.err(path, f"expected a mapping of {', '.join(TUNABLES)}, got {value!r}")
            return {}
        self.unknown_keys(value, path, tuple(TUNABLES))
        out = {}
        for key, tunable in TUNABLES.items():
            if key in value:
                try:
                    out[key] = tunable.check(value[key])
                except ValueError as exc:
                    self.err((*path, key), str(exc))
        return out

    # -- output, order, signatures, latency ---------------------------------------------------------

    def outputs(self, value: Any, known: set[str]) -> dict[str, Ref]:
        path = ("output",)
        if isinstance(value, Mapping):
            pairs = [((*path, k), str(k), v) for k, v in value.items()]
        elif isinstance(value, (str, list)) and value:
            items = [value] if isinstance(value, str) else value
            pairs = [(path if isinstance(value, str) else (*path, j), None, v) for j, v in enumerate(items)]
        else:
            self.err(path, "expected a reference, a list of them, or a mapping result name -> reference "
                           f"(<step>.outputs.<name>), got {'nothing' if value is None else repr(value)}")
            return {}
        out: dict[str, Ref] = {}
        for where, name, text in pairs:
            ref = self.ref(text, where)
            if ref is None:
                continue
            if ref.step is None:
                self.err(where, f"the result is made of step outputs; {text!r} is the pipeline input")
                continue
            sig = self.model_of(ref.step)
            names = [ref.name] if ref.name is not None else [o.name for o in sig.outputs] if sig else []
            if name is not None and len(names) != 1:
                self.err(where, f"result {name!r} must name one output of step {ref.step!r} ({', '.join(names)})")
                continue
            for n in names:
                result_name = name or f"{ref.step}.{n}"
                if result_name in out:
                    self.err(where, f"result name {result_name!r} collides with another output")
                    continue
                out[result_name] = Ref(ref.step, n, f"{ref.step}.outputs.{n}")
        return out

    def order(self, steps: list[Step]) -> list[str] | None:
        deps = {s.name: s.upstream() for s in steps}
        order, cycle = topological_order(deps)
        if cycle:
            self.err(self.step_paths[cycle[0]], f"the steps form a cycle: {' -> '.join(cycle)}")
            return None
        return order

    def signatures(self, step: Step) -> None:
        sig = self.model_of(step.name)
        if sig is None:
            return
        path = (*self.step_paths[step.name], "inputs")
        gathered: list[tuple[str, PortLike | None]] = []
        for ref in step.inputs:
            if ref.step is None:
                ports = self.input_ports
                if ports is None:
                    gathered.append((step.tensor_map.get(ref.text, ref.name or INPUT), None))
                    continue
                chosen = [p for p in ports if ref.name is None or p.name == ref.name]
            else:
                up = self.model_of(ref.step)
                if up is None:
                    return
                chosen = [o for o in up.outputs if ref.name is None or o.name == ref.name]
            for p in chosen:
                full = ref.text if ref.name is not None or ref.step is None else f"{ref.text}.{p.name}"
                gathered.append((step.tensor_map.get(full, step.tensor_map.get(ref.text, p.name)), p))
        wanted = list(sig.inputs)
        if len(wanted) == 1 and len(gathered) == 1:
            pairs = [(wanted[0], gathered[0][1])]
        else:
            names = [g[0] for g in gathered]
            need = [w.name for w in wanted]
            if sorted(names) != sorted(need) or len(set(names)) != len(names):
                if any(p is None for _, p in gathered) and self.input_ports is None and len(gathered) == 1:
                    return  # the whole undeclared input: its names are the task's
                self.err(path, f"step {step.name!r} gives the tensors {', '.join(names)}; model {step.model!r} "
                               f"takes {', '.join(need)} (rename them with tensor_map)")
                return
            by_name = dict(gathered)
            pairs = [(w, by_name[w.name]) for w in wanted]
        for down, up in pairs:
            if up is None:
                continue
            problem = port_mismatch(up, down)
            if problem:
                self.err(path, f"step {step.name!r}, model {step.model!r}: {problem}")

    def latency(self, steps: list[Step], order: list[str], total: float) -> list[Step]:
        by_name = {s.name: s for s in steps}
        deps = {s.name: s.upstream() for s in steps}
        weights = {}
        for name in order:
            s = by_name[name]
            model_target = getattr(getattr(self.model_of(name), "batching", None), "latency_target_s", None)
            weights[name] = s.service_time_s or model_target or 1.0
        split = split_latency(order, deps, weights, total)
        targets = {n: by_name[n].batching.get("latency_target_s", split[n]) for n in order}
        worst, path = heaviest_path(order, deps, targets)
        if worst > total * (1 + 1e-9):
            self.err(("latency_target_s",), f"the step latency targets along {' -> '.join(path)} sum to "
                                            f"{worst:g} s, over the pipeline's {total:g} s")
        return [replace(s, latency_target_s=targets[s.name]) for s in steps]


def _literal(text: str) -> float | str | None:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None
