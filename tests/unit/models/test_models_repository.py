"""Repository models of each format, made in the test, served by the runner as a worker would."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from autoglm.errors import InferenceError, InputSignatureError, ModelLoadError, ModelSpecError
from autoglm.models.adapters import CheckedModel, RepositoryModel
from autoglm.models.host import ModelHost
from autoglm.models.repository import ModelRepository, model_version

from . import repo_fixtures as rf


def offline(net: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy()


def runner_of(repo: ModelRepository, name: str):
    runner = repo.registry([name]).create_runner(name, device="cpu")
    runner.start_sync()
    return runner


@pytest.fixture
def x() -> np.ndarray:
    return np.random.default_rng(1).random((7, 4)).astype(np.float32)


def test_torchscript_results_equal_the_eager_module_whatever_the_batch(tmp_path, x):
    net = rf.torchscript_model(tmp_path)
    runner = runner_of(ModelRepository(tmp_path), "tiny")
    try:
        # tasks of 1, 2 and 4 rows in one batch, one given as a single row without the row axis
        items = [runner.model.prepare(x[0]), runner.model.prepare(x[1:3]), runner.model.prepare(x[3:7])]
        outs = runner.run_sync(items)
        assert [o.shape for o in outs] == [(1, 3), (2, 3), (4, 3)]
        assert np.abs(np.concatenate(outs) - offline(net, x)).max() <= 1e-6
        assert outs[0].dtype == np.float32
    finally:
        runner.close()


def test_onnx_exported_from_the_same_module_gives_the_same_results(tmp_path, x):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    net = rf.onnx_model(tmp_path)
    runner = runner_of(ModelRepository(tmp_path), "tiny-onnx")
    try:
        outs = runner.run_sync([runner.model.prepare(x[:3]), runner.model.prepare(x[3:])])
        assert np.abs(np.concatenate(outs) - offline(net, x)).max() <= 1e-5
    finally:
        runner.close()


def test_a_torch_export_archive_gives_the_same_results(tmp_path, x):
    net = rf.exported_model(tmp_path)
    runner = runner_of(ModelRepository(tmp_path), "tiny-exported")
    try:
        outs = runner.run_sync([runner.model.prepare(x[:1]), runner.model.prepare(x[1:])])
        assert [o.shape for o in outs] == [(1, 3), (6, 3)]
        assert np.abs(np.concatenate(outs) - offline(net, x)).max() <= 1e-6
    finally:
        runner.close()


def test_python_factory_with_two_named_outputs_of_different_dtypes(tmp_path, x):
    rf.python_model(tmp_path)
    runner = runner_of(ModelRepository(tmp_path), "two-heads")
    try:
        assert isinstance(runner.model, RepositoryModel)
        outs = runner.run_sync([runner.model.prepare(x[:2]), runner.model.prepare({"x": x[2:]})])
        logits = x @ (np.arange(12, dtype=np.float32).reshape(4, 3) / 10.0)
        assert sorted(outs[0]) == ["label", "logits"]
        assert outs[0]["logits"].dtype == np.float32 and outs[0]["label"].dtype == np.int64
        assert outs[0]["label"].shape == (2,) and outs[1]["logits"].shape == (5, 3)
        assert np.allclose(np.concatenate([outs[0]["logits"], outs[1]["logits"]]), logits, atol=1e-6)
        assert np.array_equal(np.concatenate([o["label"] for o in outs]), logits.argmax(axis=1))
        assert runner.model.warmup_outputs["logits"].shape == (3, 3)  # warmup: {rows: 3}
    finally:
        runner.close()


def test_prepare_checks_dtype_shape_names_and_max_rows(tmp_path):
    rf.torchscript_model(tmp_path)  # max_rows: 8
    model = ModelRepository(tmp_path).create("tiny")
    with pytest.raises(InputSignatureError, match=r"at most 8 rows per task \(max_rows in .*tiny/model.yaml\)"):
        model.prepare(np.zeros((9, 4), np.float32))
    with pytest.raises(InputSignatureError, match=r"expected x: float32 \(B, 4\), got x: float32 \(2, 5\)"):
        model.prepare(np.zeros((2, 5), np.float32))
    with pytest.raises(InputSignatureError, match=r"named inputs \['x'\]"):
        model.prepare({"z": np.zeros((2, 4), np.float32)})
    with pytest.raises(InputSignatureError):
        model.prepare(np.zeros((2, 4), np.bool_))
    assert model.prepare(np.zeros((2, 4), np.float64))["x"].dtype == np.float32  # floats are cast


def test_integral_floats_become_integer_inputs_and_fractions_do_not():
    from autoglm.models.spec import parse_spec

    spec = parse_spec({"format": "python", "factory": "a:b", "inputs": [{"name": "ids", "dtype": "int64",
                       "shape": [-1]}], "outputs": [{"name": "y", "dtype": "float32", "shape": []}]},
                      name="m", source="m.yaml")

    class Echo(RepositoryModel):
        def load_weights(self, device): ...
        def predict(self, batch): return batch["ids"].sum(axis=1).astype(np.float32)

    model = Echo(spec)
    prepared = model.prepare(np.array([[1.0, 2.0, 3.0]], np.float32))  # nested JSON lists decode as float32
    assert prepared["ids"].dtype == np.int64 and prepared["ids"].tolist() == [[1, 2, 3]]
    with pytest.raises(InputSignatureError, match="integral values"):
        model.prepare(np.array([[1.5]], np.float32))
    # variable axis: tasks of different lengths cannot share a batch; the runner bisects them apart
    from autoglm.models.runner import ModelRunner

    runner = ModelRunner(model, device="cpu")
    runner.start_sync()
    try:
        items = [model.prepare(np.array([[1, 2]], np.int64)), model.prepare(np.array([[1, 2, 3]], np.int64))]
        outcomes = asyncio.run(runner.run_isolated(items, timeout_s=None))
        assert [o.output.tolist() for o in outcomes] == [[3.0], [6.0]]
        with pytest.raises(InferenceError, match="different per-row shapes"):
            runner.run_sync(items)
    finally:
        runner.close()


def test_declared_outputs_that_the_model_contradicts_fail_at_warm_up_naming_the_key(tmp_path):
    rf.torchscript_model(tmp_path, out_shape="[5]")
    runner = ModelRepository(tmp_path).registry(["tiny"]).create_runner("tiny", device="cpu")
    with pytest.raises(ModelSpecError) as info:
        runner.start_sync()
    runner.close()
    assert info.value.key == "outputs[0].shape"
    assert "expected float32 (1, 5)" in str(info.value) and "got float32 (1, 3)" in str(info.value)


def test_a_file_that_is_not_torchscript_is_a_load_error_naming_the_file(tmp_path):
    rf.torchscript_model(tmp_path)
    torch.save({"w": torch.zeros(2)}, tmp_path / "tiny" / "model.pt")  # a state dict, not an archive
    runner = ModelRepository(tmp_path).registry(["tiny"]).create_runner("tiny", device="cpu")
    with pytest.raises(ModelLoadError, match=r"key 'file'.*is not a loadable TorchScript archive"):
        runner.start_sync()
    runner.close()


def test_a_python_factory_may_return_any_inference_model_and_its_warm_up_is_checked(tmp_path):
    folder = tmp_path / "wrapped"
    folder.mkdir()
    (folder / "wrapped_model.py").write_text(
        "import numpy as np\n"
        "from autoglm.models.base import InferenceModel, Signature\n"
        "class Doubler(InferenceModel):\n"
        "    name = 'doubler'\n"
        "    signature = Signature('tensor', 'float32 (B, 2)', 'float32 (B, 2)', 2)\n"
        "    def load(self, device): self.device = device\n"
        "    def prepare(self, inputs): return np.asarray(inputs, np.float32).reshape(-1, 2)\n"
        "    def collate(self, items): return np.concatenate(items)\n"
        "    def forward(self, batch): return (batch * 2).astype(np.float64)\n"
        "def make(spec): return Doubler()\n")
    rf.write_yaml(folder, """
        format: python
        factory: "wrapped_model:make"
        inputs: [{name: x, dtype: float32, shape: [2]}]
        outputs: [{name: y, dtype: float32, shape: [2]}]
    """)
    runner = ModelRepository(tmp_path).registry(["wrapped"]).create_runner("wrapped", device="cpu")
    assert isinstance(runner.model, CheckedModel) and runner.model.name == "wrapped"
    with pytest.raises(ModelSpecError, match=r"key 'outputs\[0\].dtype'.*got float64 \(1, 2\)"):
        runner.start_sync()
    runner.close()


def test_spec_fallback_and_device_reach_the_runner(tmp_path):
    rf.torchscript_model(tmp_path, "main", extra="fallback: spare\ndevice: cpu")
    rf.torchscript_model(tmp_path, "spare")
    runner = ModelRepository(tmp_path).registry(["main"]).create_runner("main")
    try:
        runner.start_sync()
        assert runner.fallback.name == "spare" and runner.device == "cpu"
    finally:
        runner.close()


def test_load_runners_is_all_or_nothing(tmp_path, monkeypatch):
    from autoglm.config import load_settings
    from autoglm.worker import load_runners

    rf.torchscript_model(tmp_path, "a")
    rf.torchscript_model(tmp_path, "b", out_shape="[2]")  # fails at warm-up
    settings = load_settings(model_repo=str(tmp_path), device="cpu")
    assert settings.models == ("a", "b")
    with pytest.raises(ModelSpecError, match="b/model.yaml: key 'outputs\\[0\\].shape'"):
        load_runners(settings)
    good = load_runners(load_settings(model_repo=str(tmp_path), models="a,digits-linear", device="cpu"))
    try:
        assert sorted(good) == ["a", "digits-linear"] and all(r.started for r in good.values())
    finally:
        for r in good.values():
            r.close()


async def test_model_host_loads_reloads_keeping_the_old_version_on_failure_and_unloads(tmp_path, x):
    net = rf.torchscript_model(tmp_path)
    changes = []
    host = ModelHost(ModelRepository(tmp_path), device="cpu", on_change=lambda n, r: changes.append((n, r)))
    v1 = await host.load("tiny")
    first = host.runners["tiny"]
    assert v1["sha256"] == model_version(ModelRepository(tmp_path).spec("tiny"))["sha256"] and v1["device"] == "cpu"
    assert await host.load("tiny") == v1 and host.runners["tiny"] is first  # already served: nothing to do

    rf.write_yaml(tmp_path / "tiny", (tmp_path / "tiny" / "model.yaml").read_text().replace("[3]", "[9]"))
    with pytest.raises(ModelSpecError, match="outputs\\[0\\].shape"):
        await host.reload("tiny")
    assert host.runners["tiny"] is first and first.started  # the old version keeps serving
    out = await first.run([first.model.prepare(x)])
    assert np.abs(out[0] - offline(net, x)).max() <= 1e-6

    rf.torchscript_model(tmp_path)  # a valid new version (same weights, new file)
    v2 = await host.reload("tiny")
    assert host.runners["tiny"] is not first and not first.started and v2["sha256"] is not None
    drained = []

    async def drain(name):
        drained.append(name)

    assert await host.unload("tiny", drain) == {"unloaded": True}
    assert drained == ["tiny"] and "tiny" not in host.runners
    assert [n for n, r in changes] == ["tiny", "tiny", "tiny"] and changes[-1][1] is None
    assert await host.unload("tiny") == {"unloaded": False}


def test_batching_defaults_and_versions_for_the_worker(tmp_path):
    rf.torchscript_model(tmp_path, "a", extra="batching: {max_batch_size: 16, mode: fixed}")
    rf.torchscript_model(tmp_path, "b")
    repo = ModelRepository(tmp_path)
    assert repo.batching_defaults(["a", "b", "digits"]) == {"a": {"max_batch_size": 16, "mode": "fixed"},
                                                            "b": {}, "digits": {}}
    versions = repo.versions(["a", "digits"])
    assert versions["digits"]["builtin"] is True
    before = versions["a"]
    rf.torchscript_model(tmp_path, "a", extra="batching: {max_batch_size: 32}")  # a new model.yaml
    after = repo.versions(["a"])["a"]
    assert after["sha256"] != before["sha256"] and after["mtime_ms"] >= before["mtime_ms"]


async def test_a_reload_whose_primary_fails_keeps_the_old_version_even_with_a_fallback(tmp_path):
    rf.torchscript_model(tmp_path, "main", extra="fallback: spare")
    rf.torchscript_model(tmp_path, "spare")
    repo = ModelRepository(tmp_path)
    started = load_runner_map(repo, "main")
    host = ModelHost(repo, started, device="cpu")
    assert len(host.versions()["main"]["sha256"]) == 16  # read from the files at construction
    old = host.runners["main"]
    (tmp_path / "main" / "model.pt").write_bytes(b"not an archive")
    with pytest.raises(ModelLoadError, match="the old version keeps serving"):
        await host.reload("main")
    assert host.runners["main"] is old and old.primary.started
    await host.close()


def load_runner_map(repo: ModelRepository, name: str) -> dict:
    runner = repo.registry([name]).create_runner(name, device="cpu")
    runner.start_sync()
    return {name: runner}


def test_cuda_n_is_a_device_choice_and_a_missing_gpu_is_a_clear_load_error():
    from autoglm.errors import ConfigError
    from autoglm.models.runner import select_device

    if torch.cuda.is_available():
        assert select_device("cuda:0") == "cuda:0"
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ModelLoadError, match=f"device 'cuda:{count}' was requested but this machine has {count}"):
        select_device(f"cuda:{count}")
    with pytest.raises(ConfigError, match="'cuda:N'"):
        select_device("gpu")
