"""YAML read with pyyaml's node API (``yaml.compose``): plain values, and the line of every key and item.

Nothing here imports Kafka.
"""

from __future__ import annotations

from typing import Any

from autoglm.processors.errors import PipelineSpecError

class LocatedYaml:
    """A YAML document as plain values, with the line of every key and item (by path)."""

    def __init__(self, source: str):
        self.source = source
        self.lines: dict[tuple, int] = {}
        self.errors: list[PipelineSpecError] = []

    def line(self, path: tuple) -> int:
        while path not in self.lines and path:
            path = path[:-1]
        return self.lines.get(path, 0)

    def error(self, path: tuple, reason: str) -> None:
        self.errors.append(PipelineSpecError(self.source, self.line(path), dotted(path), reason))

    def convert(self, node: Any, path: tuple) -> Any:
        import yaml

        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self.convert(key_node, (*path, "<key>"))
                if not isinstance(key, (str, int, float, bool)) or key is None:
                    self.error((*path,), f"a mapping key must be a string, got {key!r}")
                    continue
                child = (*path, key)
                if key in out:
                    self.lines[(*child, "<dup>")] = key_node.start_mark.line + 1
                    self.error((*child, "<dup>"), f"duplicate key {key!r} (first at line {self.lines[child]})")
                    continue
                self.lines[child] = key_node.start_mark.line + 1
                out[key] = self.convert(value_node, child)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.convert(item, (*path, i)) for i, item in enumerate(node.value)]
        return yaml.SafeLoader("").construct_object(node)


def dotted(path: tuple) -> str:
    """``("steps", 1, "inputs", 0)`` -> ``steps[1].inputs[0]`` (markers such as ``<dup>`` dropped)."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).startswith("<"):
            out += f".{part}" if out else str(part)
    return out


def load_yaml(text: str, source: str) -> tuple[Any, LocatedYaml]:
    """Parse ``text`` into plain values and their lines; a syntax error becomes the doc's only error."""
    import yaml

    doc = LocatedYaml(source)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        doc.errors.append(PipelineSpecError(source, line, "", f"invalid YAML: {exc.problem or exc}"
                                            + (f" ({exc.context})" if exc.context else "")))
        return None, doc
    except yaml.YAMLError as exc:
        doc.errors.append(PipelineSpecError(source, 0, "", f"invalid YAML: {exc}"))
        return None, doc
    return (doc.convert(node, ()) if node is not None else None), doc
