"""Architecture fitness tests: layers and public APIs only (ARCHITECTURE.md, issue 10 item 6).

- ``processors/`` and ``models/`` import nothing of Kafka or faust, and nothing of ``streams``;
- ``streams/`` imports nothing of the composition package (``autoglm/``: settings, CLI, assembly);
- nothing in the project overrides a private method of, or reads a private attribute of, faust,
  mode or aiokafka (the worker uses their public APIs only).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import aiokafka
import faust
import mode
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("autoglm", "streams", "processors", "models")
KAFKA_LIBS = ("aiokafka", "faust", "mode", "kafka", "confluent_kafka")
#: the composition package's own modules (what ``streams/`` must not import)
COMPOSITION = {f"autoglm.{p.stem}" for p in (ROOT / "autoglm").glob("*.py") if p.stem != "__init__"}


def _modules(package: str):
    for path in sorted((ROOT / package).rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def _imports(tree: ast.AST) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            out += [f"{node.module}.{a.name}" for a in node.names]
    return out


@pytest.mark.parametrize("package", ["processors", "models"])
def test_pure_layers_import_no_kafka_and_no_streams(package):
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for path, tree in _modules(package)
        for name in _imports(tree)
        if name.split(".")[0] in KAFKA_LIBS or name.startswith("autoglm.streams")
    ]
    assert offenders == []


def test_streams_does_not_import_the_composition_package():
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for path, tree in _modules("streams")
        for name in _imports(tree)
        if name in COMPOSITION
    ]
    assert offenders == []


def _dependency_names(tree: ast.AST) -> dict[str, str]:
    """Local names bound to faust/mode/aiokafka modules or objects in one module -> dotted origin."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in KAFKA_LIBS:
                    names[(a.asname or a.name).split(".")[0]] = a.name.split(".")[0] if not a.asname else a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in KAFKA_LIBS:
            names.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
    return names


def _resolve(dotted: str):
    """The object a dotted path names (``mode.Service``, ``faust.app.base.BootStrategy``), or None."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr, None)
        return obj
    return None


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(tree: ast.AST) -> list[str]:
    """Private attributes read from a dependency's names, and private methods of a dependency's
    class overridden in a subclass (a private method of our own in such a subclass is fine)."""
    deps = _dependency_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in deps:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        if isinstance(node, ast.ClassDef):
            bases = []
            for b in node.bases:
                text = ast.unparse(b)
                head = text.split(".")[0]
                if head in deps:
                    bases.append(_resolve(deps[head] + text[len(head):]))
            if not bases:
                continue
            for f in node.body:
                if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and _is_private(f.name):
                    if any(base is None or hasattr(base, f.name) for base in bases):
                        found.append(f"line {f.lineno}: {node.name}.{f.name} overrides a private method")
    return found


def _dependency_private_names() -> set[str]:
    """Private attribute names of the dependency classes the worker deals with."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient
    from faust.transport.base import Consumer, Producer

    names: set[str] = set()
    for cls in (faust.App, faust.Worker, mode.Service, Consumer, Producer, AIOKafkaConsumer, AIOKafkaProducer,
                AIOKafkaAdminClient):
        for klass in cls.__mro__:
            names |= {n for n in vars(klass) if _is_private(n)}
    return names


def _own_private_names() -> set[str]:
    """Private names our own code defines (attributes assigned, methods, functions)."""
    names: set[str] = set()
    for package in PACKAGES:
        for _, tree in _modules(package):
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and _is_private(node.name):
                    names.add(node.name)
                elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and _is_private(node.attr):
                    names.add(node.attr)
                elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and _is_private(node.id):
                    names.add(node.id)
    return names


def test_no_private_api_of_faust_mode_or_aiokafka():
    offenders = [f"{path.relative_to(ROOT)} {use}" for package in PACKAGES
                 for path, tree in _modules(package) for use in private_uses(tree)]
    # reads like ``app.consumer._unacked_messages``: a dependency's private name that our code never defines
    theirs = _dependency_private_names() - _own_private_names()
    for package in PACKAGES:
        for path, tree in _modules(package):
            offenders += [f"{path.relative_to(ROOT)} line {node.lineno}: {ast.unparse(node)}"
                          for node in ast.walk(tree)
                          if isinstance(node, ast.Attribute) and node.attr in theirs]
    assert offenders == []


def test_the_private_api_check_finds_what_it_looks_for():
    """The check itself: an override and a private read of a dependency are found, our own are not."""
    code = (
        "import faust\nfrom aiokafka import AIOKafkaConsumer\n"
        "class C(faust.App):\n    def _new_consumer(self): pass\n    def _ours(self): pass\n"
        "x = AIOKafkaConsumer._fetcher\ny = faust.App._conf\nself_ok = object()._private\n"
    )
    found = private_uses(ast.parse(code))
    assert len(found) == 3 and "C._new_consumer" in found[0]
    assert aiokafka and faust and mode  # the libraries named in the check are installed
