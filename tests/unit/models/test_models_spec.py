"""model.yaml: every kind of mistake is refused with the file, the key and the expected value."""

from __future__ import annotations

import textwrap

import pytest

from autoglm.errors import ConfigError, ModelSpecError
from autoglm.models.repository import ModelRepository, check_spec
from autoglm.models.spec import DTYPES, TensorSpec, parse_spec, read_spec
from autoglm.streams.codec import SUPPORTED_DTYPES

GOOD = {
    "format": "torchscript",
    "file": "model.pt",
    "inputs": [{"name": "x", "dtype": "float32", "shape": [4]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": [3]}],
}


def spec_of(**changes):
    doc = {**GOOD, **changes}
    return parse_spec({k: v for k, v in doc.items() if v is not None}, name="m", source="repo/m/model.yaml")


def test_a_good_spec_parses_with_its_defaults():
    spec = spec_of(max_rows=8, batching={"max_batch_size": 16, "mode": "fixed"}, device="cuda:1", fallback="other",
                   warmup={"rows": 2})
    assert (spec.name, spec.format, spec.max_rows, spec.device, spec.fallback) == ("m", "torchscript", 8, "cuda:1",
                                                                                  "other")
    assert spec.inputs == (TensorSpec("x", "float32", (4,)),)
    assert spec.batching.as_params() == {"max_batch_size": 16, "mode": "fixed"}
    assert spec.warmup_rows == 2 and spec.describe_inputs() == "x: float32 (B, 4)"
    assert spec_of().max_rows == 256 and spec_of().device == "auto"


@pytest.mark.parametrize(
    "changes, key, expected",
    [
        ({"colour": "red"}, "colour", "a known key"),
        ({"format": "tensorflow"}, "format", "one of ['torchscript', 'onnx', 'python', 'exported']"),
        ({"format": None}, "format", "one of"),
        ({"file": None}, "file", "the torchscript file's path"),
        ({"file": "../elsewhere.pt"}, "file", "a relative path inside the model folder"),
        ({"factory": "m:f"}, "factory", "no factory for format 'torchscript'"),
        ({"inputs": [{"name": "x", "dtype": "floa32", "shape": [4]}]}, "inputs[0].dtype", "one of ['bool'"),
        ({"inputs": [{"name": "x", "dtype": "float32", "shape": [0]}]}, "inputs[0].shape", "sizes >= 1 or -1"),
        ({"inputs": [{"name": "x", "dtype": "float32", "shape": [4], "layout": "nchw"}]}, "inputs[0].layout",
         "a known key"),
        ({"inputs": []}, "inputs", "a non-empty list"),
        ({"inputs": [{"name": "t", "text": True}, {"name": "u", "text": True}]}, "inputs", "a single input"),
        ({"outputs": [{"name": "y", "text": True}]}, "outputs[0].text", "no 'text' on an output"),
        ({"outputs": [{"name": "data", "dtype": "float32", "shape": [3]}]}, "outputs[0].name",
         "a name other than dtype, shape, data"),
        ({"outputs": [{"name": "y", "dtype": "float32", "shape": [3]}] * 2}, "outputs[1].name",
         "a name not used by another entry"),
        ({"max_rows": 0}, "max_rows", "an integer between 1"),
        ({"max_rows": True}, "max_rows", "an integer between 1"),
        ({"device": "tpu"}, "device", "'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ({"fallback": "m"}, "fallback", "the name of another model"),
        ({"batching": {"max_batch_size": 0}}, "batching.max_batch_size", "an integer between 1 and 65536"),
        ({"batching": {"max_wait_s": "fast"}}, "batching.max_wait_s", "a number of seconds"),
        ({"batching": {"mode": "greedy"}}, "batching.mode", "one of ['adaptive', 'fixed']"),
        ({"batching": {"linger": 1}}, "batching.linger", "a known key"),
        ({"warmup": {"rows": 999}}, "warmup.rows", "between 1 and max_rows (256)"),
        ({"warmup": {"inputs": {"z": [[1, 2, 3, 4]]}}}, "warmup.inputs", "exactly the inputs ['x']"),
    ],
)
def test_each_mistake_names_the_file_the_key_and_the_expected_value(changes, key, expected):
    with pytest.raises(ModelSpecError) as info:
        spec_of(**changes)
    err = info.value
    assert err.file == "repo/m/model.yaml" and err.key == key
    assert expected in err.expected
    assert str(err).startswith(f"repo/m/model.yaml: key {key!r}: expected ")
    assert isinstance(err, ConfigError) and err.code == "model_spec"


def test_python_needs_an_import_string_factory():
    with pytest.raises(ModelSpecError, match=r"key 'factory': expected an import string 'package.module:callable'"):
        parse_spec({**GOOD, "format": "python", "file": None}, name="m", source="f.yaml")
    spec = parse_spec({k: v for k, v in GOOD.items() if k != "file"} | {"format": "python", "factory": "a.b:make"},
                      name="m", source="f.yaml")
    assert spec.factory == "a.b:make" and spec.file is None


def test_the_spec_dtypes_are_the_wire_dtypes():
    assert set(DTYPES) == set(SUPPORTED_DTYPES)


def test_a_folder_name_that_cannot_be_a_topic_is_refused():
    with pytest.raises(ModelSpecError, match="a model folder named with"):
        parse_spec(GOOD, name="my model", source="x")


def test_yaml_errors_and_non_mappings_name_the_file(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.yaml").write_text("format: [torchscript\n")
    with pytest.raises(ModelSpecError, match=r"m/model.yaml: expected valid YAML"):
        read_spec(folder / "model.yaml")
    (folder / "model.yaml").write_text("- a\n- b\n")
    with pytest.raises(ModelSpecError, match=r"m/model.yaml: expected a YAML mapping"):
        read_spec(folder / "model.yaml")


def write(tmp_path, name, text):
    folder = tmp_path / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.yaml").write_text(textwrap.dedent(text))
    return folder


def test_a_missing_model_file_is_named_with_key_file(tmp_path):
    write(tmp_path, "m", """
        format: torchscript
        file: weights/model.pt
        inputs: [{name: x, dtype: float32, shape: [4]}]
        outputs: [{name: y, dtype: float32, shape: [3]}]
    """)
    with pytest.raises(ModelSpecError) as info:
        check_spec(ModelRepository(tmp_path).spec("m"))
    assert info.value.key == "file" and "weights/model.pt" in str(info.value)
    assert str(info.value).startswith(str(tmp_path / "m" / "model.yaml"))


@pytest.mark.parametrize(
    "factory, module_text, actual",
    [
        ("nosuchmodule_xyz:make", None, "No module named 'nosuchmodule_xyz'"),
        ("broken_mod_abc:make", "import nosuchdependency_q\n", "No module named 'nosuchdependency_q'"),
        ("noattr_mod_abc:make", "x = 1\n", "has no attribute 'make'"),
        ("notcallable_mod_abc:x", "x = 1\n", "is int"),
    ],
)
def test_a_factory_that_cannot_be_imported_is_named_with_key_factory(tmp_path, factory, module_text, actual):
    folder = write(tmp_path, "m", f"""
        format: python
        factory: "{factory}"
        inputs: [{{name: x, dtype: float32, shape: [4]}}]
        outputs: [{{name: y, dtype: float32, shape: [3]}}]
    """)
    if module_text is not None:
        (folder / (factory.split(":")[0] + ".py")).write_text(module_text)
    with pytest.raises(ModelSpecError) as info:
        ModelRepository(tmp_path).check()
    assert info.value.key == "factory" and actual in str(info.value)


def test_check_stops_before_building_anything_and_names_unknown_models(tmp_path):
    write(tmp_path, "good", """
        format: python
        factory: "never_imported_mod:make"
        inputs: [{name: x, dtype: float32, shape: [4]}]
        outputs: [{name: y, dtype: float32, shape: [3]}]
        fallback: ghost
    """)
    (tmp_path / "good" / "never_imported_mod.py").write_text("def make(spec):\n    raise SystemExit('built')\n")
    with pytest.raises(ModelSpecError, match="key 'fallback': expected a model of the repository or a built-in"):
        ModelRepository(tmp_path).check()
    from autoglm.errors import UnknownModelError

    with pytest.raises(UnknownModelError, match="unknown model 'resnet'; the repository and the built-ins have: "
                                                "digits, digits-linear, good, minilm"):
        ModelRepository(tmp_path).check(["resnet"])


def test_a_repository_that_is_not_a_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="is not a folder"):
        ModelRepository(tmp_path / "nope")
