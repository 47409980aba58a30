"""ModelRunner.run_isolated: bisection to the failing tasks, per-batch timeout, thread recovery.

The models here are tiny torch models built in the test (no weights, no GPU).
The hang tests wait 0.3 s for a timeout: that is the behaviour under test, not
a speed target.
"""

from __future__ import annotations

import asyncio
import math
import threading
from typing import Any, Sequence

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm.errors import ConfigError, InferenceTimeoutError, ModelError
from autoglm.models import InferenceModel, ModelRunner, Signature
from autoglm.models.runner import ItemError, ItemOutcome

POISON = 666.0  # a row whose first value is POISON makes the forward raise
HANG = 999.0  # a row whose first value is HANG makes the forward wait for the test's release event
TIMEOUT_S = 0.3


class LinearModel(InferenceModel):
    """Rows float32 (n, 4) -> rows @ W + b, float32 (n, 3), with fixed weights.

    A batch holding a POISON row raises (or, with ``drop_row``, returns one row
    too few); a batch holding a HANG row (and no POISON row) blocks until
    ``release`` is set. Records the rows of every forward call.
    """

    name = "linear"
    signature = Signature(input_kind="tensor", input="float32 (B, 4)", output="float32 (B, 3)", output_dim=3)

    def __init__(self, *, drop_row: bool = False):
        rng = np.random.default_rng(0)
        self.weight = rng.standard_normal((4, 3)).astype(np.float32)
        self.bias = rng.standard_normal(3).astype(np.float32)
        self.drop_row = drop_row
        self.release = threading.Event()
        self.calls: list[int] = []
        self.threads: list[str] = []

    def load(self, device: str) -> None:
        self.device = device

    def prepare(self, inputs: Any) -> np.ndarray:
        return np.asarray(inputs, dtype=np.float32).reshape(-1, 4)

    def collate(self, items: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate(items)

    def forward(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(len(batch))
        self.threads.append(threading.current_thread().name)
        out = (torch.from_numpy(batch) @ torch.from_numpy(self.weight) + torch.from_numpy(self.bias)).numpy()
        if (batch[:, 0] == POISON).any():
            if self.drop_row:
                return out[1:]
            raise ValueError("poisoned row")
        if (batch[:, 0] == HANG).any():
            self.release.wait(30)
        return out

    def expected(self, item: np.ndarray) -> np.ndarray:
        """The output of one task, computed without the model: float32 (n, 3)."""
        return item @ self.weight + self.bias


def make_items(rows: Sequence[int], *, poison: Sequence[int] = (), hang: Sequence[int] = ()) -> list[np.ndarray]:
    """Tasks of ``rows[i]`` rows each, distinct values; tasks in ``poison``/``hang`` get a marked last row."""
    items, start = [], 0.0
    for i, n in enumerate(rows):
        item = np.arange(start, start + 4 * n, dtype=np.float32).reshape(n, 4) / 10.0
        start += 4 * n
        if i in poison:
            item[-1, 0] = POISON
        if i in hang:
            item[-1, 0] = HANG
        items.append(item)
    return items


def bisection_bound(n: int, k: int) -> int:
    """The documented worst case of forward calls: min(2n - 1, 1 + 2k * ceil(log2 n))."""
    return min(2 * n - 1, 1 + 2 * k * math.ceil(math.log2(n))) if n > 1 else 1


@pytest.fixture
def linear():
    model = LinearModel()
    runner = ModelRunner(model, device="cpu")
    runner.start_sync()
    yield runner
    model.release.set()  # frees any forward a test left hanging
    runner.close(wait=False)


# -- outcomes -----------------------------------------------------------------------


def test_item_outcome_holds_exactly_one_of_output_and_error():
    with pytest.raises(ValueError):
        ItemOutcome("m")
    with pytest.raises(ValueError):
        ItemOutcome("m", output=np.zeros((1, 1), np.float32), error=ItemError("x", "y"))
    assert ItemOutcome("m", error=ItemError("x", "y")).ok is False
    assert ItemOutcome("m", output=np.zeros((1, 1), np.float32)).ok is True


# -- a clean batch ----------------------------------------------------------------


async def test_clean_batch_is_one_forward_with_the_outputs_of_run(linear):
    items = make_items([1, 3, 2])
    outcomes = await linear.run_isolated(items, timeout_s=None)
    assert linear.model.calls == [6]
    plain = await linear.run(items)
    for item, outcome, ref in zip(items, outcomes, plain):
        assert outcome.ok and outcome.served_by == "linear"
        np.testing.assert_array_equal(outcome.output, ref)
        np.testing.assert_allclose(outcome.output, linear.model.expected(item), rtol=1e-5, atol=1e-5)


async def test_empty_batch_runs_nothing(linear):
    assert await linear.run_isolated([], timeout_s=TIMEOUT_S) == []
    assert linear.model.calls == [] and linear.forward_calls == 0


# -- bisection --------------------------------------------------------------------


async def test_one_poisoned_task_of_eight_gets_the_only_error(linear):
    items = make_items([2, 1, 1, 3, 1, 2, 1, 1], poison=[5])
    outcomes = await linear.run_isolated(items, timeout_s=None)
    assert [o.ok for o in outcomes] == [True] * 5 + [False] + [True] * 2
    bad = outcomes[5].error
    assert bad.code == "inference" and "poisoned row" in bad.message and bad.retriable
    clean = [item for i, item in enumerate(items) if i != 5]
    reference = await linear.run(clean)  # a clean run of the other tasks
    for outcome, ref in zip([o for i, o in enumerate(outcomes) if i != 5], reference):
        np.testing.assert_allclose(outcome.output, ref, rtol=1e-6, atol=1e-6)
    # [0,8) fails; [0,4) ok, [4,8) fails; [4,6) fails, [6,8) ok; [4,5) ok, [5,6) fails: 7 calls
    assert len(linear.model.calls) - 1 == 7 == bisection_bound(8, 1)
    assert linear.model.calls[:7] == [12, 7, 5, 3, 1, 2, 2]


async def test_wrong_row_count_is_isolated_like_an_exception():
    model = LinearModel(drop_row=True)
    with ModelRunner(model, device="cpu") as runner:
        items = make_items([1, 2, 1, 1], poison=[2])
        outcomes = await runner.run_isolated(items, timeout_s=None)
    assert [o.ok for o in outcomes] == [True, True, False, True]
    assert "returned 0 rows for 1 input rows" in outcomes[2].error.message
    for i in (0, 1, 3):
        np.testing.assert_allclose(outcomes[i].output, model.expected(items[i]), rtol=1e-5, atol=1e-5)


async def test_every_task_failing_costs_two_n_minus_one_calls(linear):
    items = make_items([1] * 5, poison=range(5))
    outcomes = await linear.run_isolated(items, timeout_s=None)
    assert not any(o.ok for o in outcomes)
    assert linear.forward_calls == len(linear.model.calls) == 2 * 5 - 1


@pytest.fixture(scope="module")
def shared_linear():
    runner = ModelRunner(LinearModel(), device="cpu")
    runner.start_sync()
    yield runner
    runner.close()


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.integers(1, 3), min_size=1, max_size=40),
    data=st.data(),
)
def test_bisection_isolates_exactly_the_poisoned_tasks(shared_linear, rows, data):
    """60 examples: any batch of 1-40 tasks, any set of poisoned tasks."""
    poison = data.draw(st.sets(st.integers(0, len(rows) - 1), max_size=len(rows)))
    items = make_items(rows, poison=poison)
    model = shared_linear.model
    before = len(model.calls)
    outcomes = asyncio.run(shared_linear.run_isolated(items, timeout_s=None))
    calls = len(model.calls) - before
    assert [not o.ok for o in outcomes] == [i in poison for i in range(len(rows))]
    for item, outcome in zip(items, outcomes):
        if outcome.ok:
            np.testing.assert_allclose(outcome.output, model.expected(item), rtol=1e-5, atol=1e-5)
            assert outcome.output.shape == (len(item), 3)
        else:
            assert outcome.error.code == "inference"
    assert calls <= bisection_bound(len(rows), len(poison))


# -- timeouts -----------------------------------------------------------------------


async def test_a_hanging_batch_times_out_and_the_next_batch_runs_on_a_fresh_thread(linear, caplog):
    items = make_items([1, 2, 1, 1], hang=[1])
    outcomes = await linear.run_isolated(items, timeout_s=TIMEOUT_S)
    assert [o.error.code for o in outcomes] == ["inference_timeout"] * 4
    assert all(f"within {TIMEOUT_S} s" in o.error.message and o.error.retriable for o in outcomes)
    assert linear.model.calls == [5]  # not bisected after a timeout
    assert linear.abandoned_threads == 1 and linear.stuck_threads == 1
    assert "abandoned thread autoglm-model-linear_0" in caplog.text

    clean = make_items([2, 1])
    again = await linear.run_isolated(clean, timeout_s=TIMEOUT_S)
    assert all(o.ok for o in again)
    for item, outcome in zip(clean, again):
        np.testing.assert_allclose(outcome.output, linear.model.expected(item), rtol=1e-5, atol=1e-5)
    assert linear.model.threads == ["autoglm-model-linear_0", "autoglm-model-linear_1"]
    assert (await linear.run(clean))[0].shape == (2, 3)  # plain run uses the fresh thread too
    assert linear.abandoned_threads == 1


async def test_abandoned_thread_is_a_daemon_so_exit_does_not_wait_for_it(linear):
    await linear.run_isolated(make_items([1], hang=[0]), timeout_s=TIMEOUT_S)
    assert linear.stuck_threads == 1
    model_threads = [t for t in threading.enumerate() if t.name.startswith("autoglm-model-linear_")]
    assert model_threads and all(t.daemon for t in model_threads)


async def test_timeout_while_bisecting_fails_the_rest_without_splitting_further(linear):
    # forward checks POISON first: the whole batch raises, then [0,2) holds HANG and times out
    items = make_items([1, 1, 1, 1], hang=[0], poison=[2])
    outcomes = await linear.run_isolated(items, timeout_s=TIMEOUT_S)
    assert [o.error.code for o in outcomes] == ["inference_timeout"] * 4
    assert "did not return within" in outcomes[0].error.message
    assert "not run" in outcomes[2].error.message and "not run" in outcomes[3].error.message
    assert linear.model.calls == [4, 2] and linear.abandoned_threads == 1


async def test_poison_before_a_hang_is_isolated_then_the_hanging_half_times_out(linear):
    items = make_items([1, 1, 1, 1], poison=[1], hang=[3])
    outcomes = await linear.run_isolated(items, timeout_s=TIMEOUT_S)
    assert outcomes[0].ok and outcomes[1].error.code == "inference"
    assert [outcomes[2].error.code, outcomes[3].error.code] == ["inference_timeout"] * 2
    np.testing.assert_allclose(outcomes[0].output, linear.model.expected(items[0]), rtol=1e-5, atol=1e-5)
    assert linear.model.calls == [4, 2, 1, 1, 2]


async def test_no_timeout_waits_for_a_slow_forward(linear):
    items = make_items([1], hang=[0])
    pending = asyncio.ensure_future(linear.run_isolated(items, timeout_s=None))
    done, _ = await asyncio.wait({pending}, timeout=TIMEOUT_S)
    assert not done  # still waiting: no timeout was asked for
    linear.model.release.set()
    (outcome,) = await pending
    assert outcome.ok and linear.abandoned_threads == 0


async def test_timeout_must_be_positive(linear):
    with pytest.raises(ConfigError, match="timeout_s"):
        await linear.run_isolated(make_items([1]), timeout_s=0)


async def test_run_isolated_refuses_before_start_and_after_close():
    runner = ModelRunner(LinearModel(), device="cpu")
    with pytest.raises(ModelError, match="not started"):
        await runner.run_isolated(make_items([1]), timeout_s=None)
    await runner.start()
    runner.close()
    with pytest.raises(ModelError, match="closed"):
        await runner.run_isolated(make_items([1]), timeout_s=None)


def test_timeout_error_carries_its_limit():
    exc = InferenceTimeoutError("x", timeout_s=0.5, batch_size=3)
    assert (exc.code, exc.retriable, exc.timeout_s, exc.batch_size) == ("inference_timeout", True, 0.5, 3)
    assert ItemError.of(exc) == ItemError("inference_timeout", "x", True)
