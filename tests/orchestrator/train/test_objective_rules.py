"""The training loop's rules that need no Ray: the KL weights per epoch as the loop consumes its
loader, the learning-rate schedule (`lr_lambda`), and the choice of the best validation
(non-finite values never win)."""

from __future__ import annotations

import math

import pytest

from orchestrator.config import RunConfig
from orchestrator.train.checkpoint import TrainState
from orchestrator.train.data import TaskData
from orchestrator.train.objective import Objective, lr_lambda
from orchestrator.train.worker import is_better


class _EpochSampler:
    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class _Loader:
    """A loader of `n` micro-batches that tags each with the epoch its sampler was set to."""

    def __init__(self, n: int, sampler: _EpochSampler) -> None:
        self.n, self.sampler = n, sampler

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter([(self.sampler.epoch, i) for i in range(self.n)])


@pytest.mark.parametrize("grad_accum", [1, 2, 3])
@pytest.mark.parametrize("method", ["melora", "blob"])
def test_the_loops_kl_weights_sum_to_one_over_each_epoch(method: str, grad_accum: int) -> None:
    """Walk the real `TaskData.train_batches` over a 7-batch loader (not a multiple of 2 or 3) and
    take the weights the real `Objective` gives each optimiser step, grouped by the epoch of the
    step's first micro-batch; resuming at any step gives the same micro-batches."""
    run = RunConfig().with_overrides({"adapter.method": method, "optim.grad_accum": grad_accum})
    data = TaskData.__new__(TaskData)  # only what train_batches reads
    data.run, data.sampler = run, _EpochSampler()
    data.train_loader = _Loader(7, data.sampler)
    objective = Objective(None, run, batches_per_epoch=len(data.train_loader), rank=0)
    batches = data.train_batches(start_step=0)
    by_epoch: dict[int, float] = {}
    steps = 40
    for step in range(steps):
        micro = [next(batches) for _ in range(grad_accum)]
        by_epoch[micro[0][0]] = by_epoch.get(micro[0][0], 0.0) + objective.kl_weight(step)
        if step in (5, 17):  # a resumed run starts at the same micro-batch
            assert next(data.train_batches(start_step=step)) == micro[0]
    complete = sorted(by_epoch)[:-1]  # the last epoch is cut short by `steps`
    assert len(complete) >= 4
    for epoch in complete:
        assert by_epoch[epoch] == pytest.approx(1.0, rel=1e-12), (epoch, by_epoch)


def test_a_deterministic_method_has_no_kl_weight() -> None:
    run = RunConfig().with_overrides({"adapter.method": "lora", "optim.grad_accum": 2})
    assert Objective(None, run, batches_per_epoch=7, rank=0).kl_weight(0) == 0.0


# max_steps 100, warmup_ratio 0.1: 10 warm-up steps t = 0..9 at (t + 1) / 11, then the decay over
# the 90 steps t = 10..100, at progress p = (t - 10) / 90. Hand-computed (cos(pi/3) = 1/2,
# cos(2pi/3) = -1/2): linear 1 - p, cosine (1 + cos(pi p)) / 2, constant 1.
WARMUP = {0: 1 / 11, 4: 5 / 11, 9: 10 / 11}
DECAY = {  # t: (linear, cosine, constant)
    10: (1.0, 1.0, 1.0),
    40: (2 / 3, 3 / 4, 1.0),  # p = 1/3
    55: (1 / 2, 1 / 2, 1.0),  # p = 1/2
    70: (1 / 3, 1 / 4, 1.0),  # p = 2/3
    99: (1 / 90, 3.0459e-4, 1.0),  # p = 89/90; cosine: sin(pi/180)^2
    100: (0.0, 0.0, 1.0),  # p = 1
    130: (0.0, 0.0, 1.0),  # past max_steps: clipped, no negative or rising lr
}


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_the_lr_schedule_matches_hand_computed_values(schedule: str) -> None:
    """`lr_lambda` drives the lr of every run (LambdaLR in the worker, the KL SGD step) and the
    equivalence test's reference loop: its warm-up and each decay at chosen steps, against values
    computed by hand above, so that an off-by-one step or a wrong formula fails."""
    run = RunConfig().with_overrides(
        {"optim.max_steps": 100, "optim.warmup_ratio": 0.1, "optim.schedule": schedule}
    )
    factor = lr_lambda(run)
    column = ["linear", "cosine", "constant"].index(schedule)
    got = {t: factor(t) for t in [*WARMUP, *DECAY]}
    want = {**WARMUP, **{t: values[column] for t, values in DECAY.items()}}
    assert got == pytest.approx(want, rel=1e-4, abs=1e-12)


def test_the_lr_warm_up_is_a_whole_number_of_steps_and_can_be_none() -> None:
    """warmup_ratio x max_steps is cut to whole steps (0.02 x 60 = 1.2: one step, at 1/2, then a
    linear decay over 59 steps); with warmup_ratio 0 the first step runs at the full lr."""
    linear = {"optim.max_steps": 60, "optim.schedule": "linear"}
    short = lr_lambda(RunConfig().with_overrides({**linear, "optim.warmup_ratio": 0.02}))
    assert [short(0), short(1), short(30), short(60)] == pytest.approx([1 / 2, 1.0, 30 / 59, 0.0])
    none = lr_lambda(RunConfig().with_overrides({**linear, "optim.warmup_ratio": 0.0}))
    assert [none(0), none(30), none(60)] == pytest.approx([1.0, 1 / 2, 0.0], abs=1e-12)


def _select(values: list[float], metric: str = "val/nll") -> list[int | None]:
    """The best step after each validation, as the loop records it (val/acc: higher is better)."""
    run = RunConfig().with_overrides({"eval.select_metric": metric})
    state, best_steps = TrainState(), []
    for step, value in enumerate(values, start=1):
        if is_better(run, {metric: value}, state):
            state.best_value, state.best_step = value, step
        best_steps.append(state.best_step)
    return best_steps


def test_a_non_finite_validation_never_becomes_the_best() -> None:
    nan, inf = math.nan, math.inf
    # a NaN first validation used to freeze the selection: nothing could beat it
    assert _select([nan, 0.9, 0.7, 0.8]) == [None, 2, 3, 3]
    assert _select([0.9, nan, inf, 0.95, 0.5]) == [1, 1, 1, 1, 5]
    assert _select([nan, -inf, 0.3], metric="val/acc") == [None, None, 3]
    assert _select([0.2, 0.4, nan], metric="val/acc") == [1, 2, 2]


def test_a_best_value_that_is_not_finite_is_replaced_by_a_finite_one() -> None:
    run = RunConfig().with_overrides({"eval.select_metric": "val/nll"})
    state = TrainState(best_value=math.nan, best_step=3)  # as a checkpoint from before this rule
    assert is_better(run, {"val/nll": 5.0}, state)
    assert not is_better(run, {"val/nll": math.nan}, state)


def test_without_a_validation_split_the_latest_wins() -> None:
    run = RunConfig()
    assert is_better(run, {}, TrainState(best_value=0.1, best_step=1))
