"""Fallback models: the policy (pure), FallbackRunner and the registry's ``fallback`` option.

Primary and fallback are tiny in-test models that scale their rows by
different factors (x2 and x3), so every output shows which model made it.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import numpy as np
import pytest

from autoglm.errors import ConfigError, InferenceError, ModelLoadError, UnknownModelError
from autoglm.models import InferenceModel, ModelRegistry, ModelRunner, Signature
from autoglm.models.fallback import FallbackPolicy, FallbackRunner
from autoglm.models.runner import ItemOutcome

TIMEOUT_S = 0.3
POISON = -1.0  # a task whose first value is POISON fails on every model


class ScaleModel(InferenceModel):
    """Rows float32 (n, 2) -> rows * factor. Fails while ``broken``; hangs while ``hanging``.

    ``load_failures``: how many load attempts fail before one succeeds.
    """

    signature = Signature(input_kind="tensor", input="float32 (B, 2)", output="float32 (B, 2)", output_dim=2)

    def __init__(self, name: str, factor: float, *, load_failures: int = 0):
        self.name = name
        self.factor = factor
        self.load_failures = load_failures
        self.broken = False
        self.hanging = False
        self.release = threading.Event()
        self.loads = 0
        self.calls = 0

    def load(self, device: str) -> None:
        self.loads += 1
        if self.load_failures:
            self.load_failures -= 1
            raise FileNotFoundError(f"{self.name}.pt")
        self.device = device

    def prepare(self, inputs: Any) -> np.ndarray:
        return np.asarray(inputs, dtype=np.float32).reshape(-1, 2)

    def collate(self, items: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate(items)

    def forward(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.broken:
            raise RuntimeError(f"{self.name} is down")
        if (batch[:, 0] == POISON).any():
            raise ValueError("poisoned task")
        if self.hanging:
            self.release.wait(30)
        return batch * self.factor


def items(n: int = 2, *, poison: Sequence[int] = ()) -> list[np.ndarray]:
    out = [np.array([[i + 1.0, i + 2.0]], dtype=np.float32) for i in range(n)]
    for i in poison:
        out[i][0, 0] = POISON
    return out


def pair(*, primary_load_failures: int = 0, fallback_load_failures: int = 0, **kwargs: Any) -> FallbackRunner:
    primary = ModelRunner(ScaleModel("main", 2.0, load_failures=primary_load_failures), device="cpu")
    backup = ModelRunner(ScaleModel("backup", 3.0, load_failures=fallback_load_failures), device="cpu")
    return FallbackRunner(primary, backup, **kwargs)


def served(outcomes: list[ItemOutcome]) -> str:
    """The one model that served a batch, checked against the values (x2 main, x3 backup)."""
    (name,) = {o.served_by for o in outcomes}
    for i, o in enumerate(outcomes):
        expected = np.array([[i + 1.0, i + 2.0]], dtype=np.float32) * (2.0 if name == "main" else 3.0)
        np.testing.assert_array_equal(o.output, expected)
    return name


@pytest.fixture
def runner():
    created: list[FallbackRunner] = []

    def make(**kwargs: Any) -> FallbackRunner:
        created.append(pair(**kwargs))
        return created[-1]

    yield make
    for r in created:
        r.primary.model.release.set()
        r.fallback.model.release.set()
        r.close(wait=False)


# -- the policy -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_failures", "probe_every", "primary_ok", "routes"),
    [
        # healthy throughout: always the primary
        (3, 10, [True] * 5, "PPPPP"),
        # three failures degrade; then every 4th batch probes; failed probes keep it degraded
        (3, 4, [False] * 3 + [False] * 2, "PPP" + "FFFP" + "FFFP"),
        # two failures then a success: the count starts again, no degradation
        (3, 4, [False, False, True, False, False], "PPPPP"),
        # a successful probe makes it healthy again
        (1, 2, [False, True, True], "P" + "FP" + "P"),
    ],
)
def test_policy_routes(max_failures, probe_every, primary_ok, routes):
    policy = FallbackPolicy(max_failures=max_failures, probe_every=probe_every)
    outcomes = iter(primary_ok)
    seen = ""
    for _ in routes:
        if policy.use_primary():
            seen += "P"
            policy.record(next(outcomes))
        else:
            seen += "F"
    assert seen == routes


def test_policy_primary_down_degrades_at_once():
    policy = FallbackPolicy(max_failures=3, probe_every=2)
    policy.primary_down()
    assert policy.degraded and [policy.use_primary() for _ in range(4)] == [False, True, False, True]


@pytest.mark.parametrize("kwargs", [{"max_failures": 0}, {"probe_every": 0}])
def test_policy_settings_must_be_positive(kwargs):
    with pytest.raises(ConfigError):
        FallbackPolicy(**kwargs)


# -- FallbackRunner ---------------------------------------------------------------------


async def test_healthy_primary_serves_and_the_fallback_is_warm_but_idle(runner):
    r = runner()
    await r.start()
    assert r.model is r.primary.model and r.name == "main" and r.device == "cpu"
    assert r.fallback.started and r.fallback.model.loads == 1
    assert served(await r.run_isolated(items(3), timeout_s=TIMEOUT_S)) == "main"
    assert r.fallback.model.calls == 0 and r.fallback_tasks == 0


async def test_fallback_serves_while_the_primary_fails_and_the_primary_comes_back(runner):
    r = runner(max_failures=3, probe_every=4)
    await r.start()
    primary = r.primary.model
    primary.broken = True
    seen = []
    primary_calls = []
    for batch in range(1, 12):
        if batch == 8:
            primary.broken = False
        seen.append(served(await r.run_isolated(items(2), timeout_s=TIMEOUT_S)))
        primary_calls.append(primary.calls)
        if batch == 3:
            assert r.degraded and r.policy.consecutive_failures == 3
    # batches 1-3: the primary fails (each bisected: 3 calls), its tasks are retried on the fallback;
    # 4-6 fallback only; 7 a failed probe; 8-10 fallback; 11 a probe that succeeds
    assert seen == ["backup"] * 10 + ["main"]
    assert primary_calls == [3, 6, 9, 9, 9, 9, 12, 12, 12, 12, 13]
    assert not r.degraded
    assert served(await r.run_isolated(items(2), timeout_s=TIMEOUT_S)) == "main"
    assert r.fallback_tasks == 2 * 10


async def test_primary_that_fails_to_load_is_served_by_the_fallback_until_a_retry_loads_it(runner, caplog):
    r = runner(primary_load_failures=2, probe_every=3)
    await r.start()
    assert not r.primary.started and r.degraded and r.started
    assert "failed to load" in caplog.text
    seen = []
    for _ in range(7):
        seen.append(served(await r.run_isolated(items(1), timeout_s=None)))
        await r.settle()
    # batch 3 retries the load in the background (fails: 2nd attempt), batch 6 retries again (loads)
    assert seen == ["backup"] * 6 + ["main"]
    assert r.primary.model.loads == 3 and r.primary.started and not r.degraded


async def test_tasks_of_a_hanging_primary_time_out_and_are_served_by_the_fallback(runner):
    r = runner()
    await r.start()
    r.primary.model.hanging = True
    outcomes = await r.run_isolated(items(2), timeout_s=TIMEOUT_S)
    assert served(outcomes) == "backup"
    assert r.primary.abandoned_threads == 1 and r.policy.consecutive_failures == 1
    assert r.abandoned_threads == 1 and r.forward_calls == 2  # one primary call (not bisected), one fallback


async def test_a_task_that_fails_on_both_models_names_both_failures(runner):
    r = runner()
    await r.start()
    outcomes = await r.run_isolated(items(3, poison=[1]), timeout_s=None)
    assert [o.served_by for o in outcomes] == ["main", "backup", "main"]
    error = outcomes[1].error
    assert error.code == "inference" and "'backup'" in error.message and "'main' failed" in error.message
    np.testing.assert_array_equal(outcomes[2].output, items(3)[2] * 2.0)
    assert r.policy.consecutive_failures == 0  # the primary served the others: not a model failure
    with pytest.raises(InferenceError, match="poisoned"):
        await r.run(items(2, poison=[0]))


async def test_without_a_loaded_fallback_the_primary_serves_alone(runner):
    r = runner(fallback_load_failures=1, max_failures=1)
    await r.start()
    r.primary.model.broken = True
    for _ in range(3):
        outcomes = await r.run_isolated(items(1), timeout_s=None)
        assert outcomes[0].served_by == "main" and outcomes[0].error.code == "inference"
    assert r.primary.model.calls == 3


def test_start_sync_fails_when_neither_model_loads(runner):
    r = runner(primary_load_failures=1, fallback_load_failures=1)
    with pytest.raises(ModelLoadError, match=r"'main' and its fallback 'backup' both failed.*main\.pt.*backup\.pt"):
        r.start_sync()


def test_models_that_cannot_stand_in_are_refused():
    class Wider(ScaleModel):
        signature = Signature(input_kind="tensor", input="float32 (B, 2)", output="float32 (B, 4)", output_dim=4)

    main, wide, twin = (ModelRunner(m) for m in (ScaleModel("main", 2.0), Wider("wide", 1.0), ScaleModel("main", 3.0)))
    try:
        with pytest.raises(ConfigError, match="rows of 4.*rows of 2"):
            FallbackRunner(main, wide)
        with pytest.raises(ConfigError, match="its own fallback"):
            FallbackRunner(main, twin)
    finally:
        for r in (main, wide, twin):
            r.close()


# -- the registry's fallback option --------------------------------------------------------


def registry() -> ModelRegistry:
    reg = ModelRegistry()
    reg.register("main", lambda: ScaleModel("main", 2.0), fallback="backup")
    reg.register("backup", lambda: ScaleModel("backup", 3.0))
    return reg


async def test_registry_builds_a_fallback_runner_when_a_fallback_is_named():
    reg = registry()
    assert reg.fallback_of("main") == "backup" and reg.fallback_of("backup") is None
    r = reg.create_runner("main", device="cpu", max_failures=1, probe_every=5)
    try:
        assert isinstance(r, FallbackRunner)
        assert (r.primary.name, r.fallback.name) == ("main", "backup")
        assert (r.policy.max_failures, r.policy.probe_every) == (1, 5)
        await r.start()
        assert served(await r.run_isolated(items(2), timeout_s=None)) == "main"
    finally:
        r.close()
    plain = reg.create_runner("backup", device="cpu")
    unpaired = reg.create_runner("main", device="cpu", use_fallback=False)
    assert type(plain) is ModelRunner and type(unpaired) is ModelRunner and unpaired.name == "main"
    plain.close()
    unpaired.close()


def test_registry_set_fallback_checks_names():
    reg = registry()
    reg.set_fallback("backup", "main")
    assert reg.fallback_of("backup") == "main"
    reg.set_fallback("main", None)
    assert reg.fallback_of("main") is None
    with pytest.raises(UnknownModelError, match="'nope'"):
        reg.set_fallback("main", "nope")
    with pytest.raises(ConfigError, match="its own fallback"):
        reg.set_fallback("main", "main")
    with pytest.raises(ValueError, match="its own fallback"):
        reg.register("solo", lambda: ScaleModel("solo", 1.0), fallback="solo")


def test_registry_names_a_missing_fallback_when_building():
    reg = ModelRegistry()
    reg.register("main", lambda: ScaleModel("main", 2.0), fallback="later")
    with pytest.raises(UnknownModelError, match="unknown model 'later'"):
        reg.create_runner("main")
