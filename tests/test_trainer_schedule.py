"""Learning rate over a growing plan: warmup from the full estimate, no jump when the plan grows."""
from __future__ import annotations

import math

import pytest

from trainerd.config import ScheduleConfig
from trainerd.schedule import LRSchedule

PEAK = 1e-3


def simulate(sched: LRSchedule, plan_at, steps: int):
    """LR per step; plan_at(step) -> (total_steps, estimated_total_steps, finished). Returns lrs, change steps."""
    lrs, changes, last = [], [], None
    for s in range(steps):
        plan = plan_at(s)
        if last is not None and plan != last:
            changes.append(s)
        last = plan
        sched.update(s, *plan)
        lrs.append(sched.lr(s))
    return lrs, changes


def assert_no_jump(lrs, changes):
    diffs = [abs(b - a) for a, b in zip(lrs, lrs[1:])]  # diffs[s-1] = |lr(s) - lr(s-1)|
    normal = max(d for i, d in enumerate(diffs) if i + 1 not in changes)
    for s in changes:
        assert diffs[s - 1] <= normal * (1 + 1e-9), f"LR jumps at step {s}: {diffs[s - 1]:.3g} > {normal:.3g}"


def growing(step):
    # the packer adds data every 40 steps (the trainer keeps up); it finishes at step 600 with 700 steps
    if step >= 600:
        return (700, 700, True)
    total = 50 + 40 * (step // 40)
    return (total, 1000, False)


@pytest.mark.parametrize("kind", ["wsd", "cosine"])
def test_no_jump_when_the_plan_grows(kind):
    sched = LRSchedule(ScheduleConfig(kind=kind), PEAK)
    lrs, changes = simulate(sched, growing, 700)
    assert len(changes) > 10
    assert_no_jump(lrs, changes)
    assert lrs[-1] == pytest.approx(PEAK * 0.1, rel=0.05)  # decayed to the minimum at the end


def test_warmup_comes_from_the_full_estimate():
    sched = LRSchedule(ScheduleConfig(), PEAK)
    notes = sched.update(0, 100, 10_000, False)   # 100 steps in the cache now, 10,000 estimated
    assert sched.warmup == 250                     # 2.5% of the FULL estimate, not of the 100
    assert notes and "longer than" in notes[0]
    assert sched.lr(0) == pytest.approx(PEAK / 251)
    assert sched.lr(124) == pytest.approx(PEAK * 125 / 251)
    sched.update(100, 5000, 20_000, False)          # warmup is fixed once known
    assert sched.warmup == 250 and sched.lr(250) == PEAK


def test_wsd_constant_then_one_minus_sqrt_decay():
    sched = LRSchedule(ScheduleConfig(kind="wsd", warmup_steps=10, decay_fraction=0.2, min_lr_fraction=0.0), PEAK)
    lrs, _ = simulate(sched, lambda s: (1000, 1000, True), 1000)
    assert lrs[10] == lrs[799] == PEAK                            # constant until 80%
    assert lrs[900] == pytest.approx(PEAK * (1 - math.sqrt(100 / 200)))
    assert lrs[999] < lrs[998] < lrs[900] and lrs[999] == pytest.approx(PEAK * (1 - math.sqrt(199 / 200)))


def test_wsd_decay_starts_when_the_size_is_known_late():
    """Finished at step 900 of a 1000-step plan: the decay starts there (no jump), ending at 1000."""
    sched = LRSchedule(ScheduleConfig(kind="wsd", warmup_steps=10), PEAK)
    lrs, changes = simulate(sched, lambda s: (1000, 1000, s >= 900), 1000)
    assert lrs[899] == lrs[900] == PEAK and lrs[950] < PEAK
    assert lrs[-1] == pytest.approx(PEAK * 0.1 + PEAK * 0.9 * (1 - math.sqrt(99 / 100)))
    assert_no_jump(lrs, changes)


def test_wsd_token_budget_starts_the_decay():
    sched = LRSchedule(ScheduleConfig(kind="wsd", warmup_steps=0, decay_tokens=80_000, decay_fraction=0.2), PEAK,
                       tokens_per_step=100)
    lrs, _ = simulate(sched, lambda s: (5000, 5000, False), 1200)
    assert lrs[799] == PEAK and lrs[800] == PEAK and lrs[801] < PEAK   # decay from 800 steps (80,000 tokens)
    assert lrs[1000] == pytest.approx(PEAK * 0.1) and lrs[1199] == pytest.approx(PEAK * 0.1)


def test_cosine_follows_a_moving_estimate_smoothly():
    est = lambda s: 2000 if s < 300 else (3000 if s < 600 else 2500)  # grows, then shrinks
    sched = LRSchedule(ScheduleConfig(kind="cosine", warmup_steps=20), PEAK)
    lrs, changes = simulate(sched, lambda s: (est(s), est(s), s >= 2400), 2500)
    assert changes == [300, 600, 2400]
    assert_no_jump(lrs, changes)
    assert lrs[-1] == pytest.approx(PEAK * 0.1, rel=1e-3)


def test_state_dict_restores_the_same_rates():
    a = LRSchedule(ScheduleConfig(kind="cosine"), PEAK)
    simulate(a, growing, 350)
    b = LRSchedule(ScheduleConfig(kind="cosine"), PEAK)
    b.load_state_dict(a.state_dict())
    for s in range(350, 700):
        a.update(s, *growing(s))
        b.update(s, *growing(s))
        assert a.lr(s) == b.lr(s)
    with pytest.raises(ValueError, match="schedule"):
        LRSchedule(ScheduleConfig(kind="wsd"), PEAK).load_state_dict(a.state_dict())


def test_warmup_waits_for_data_and_stands_in_for_a_missing_estimate():
    sched = LRSchedule(ScheduleConfig(), PEAK)
    assert sched.update(0, 0, 0, False) == [] and sched.warmup is None   # an empty cache fixes nothing yet
    notes = sched.update(0, 40, 40, False)          # 40 steps and no estimate (the source gave no size)
    assert sched.warmup == 1 and "no estimate of the full dataset" in notes[0]
    # --max-steps or a token budget stand in for the estimate: 2.5% of them, not of the 40 steps there now
    sched = LRSchedule(ScheduleConfig(), PEAK, max_steps=4000)
    assert sched.update(0, 40, 40, False) and sched.warmup == 100
    sched = LRSchedule(ScheduleConfig(decay_tokens=80_000, decay_fraction=0.2), PEAK, tokens_per_step=100)
    sched.update(0, 40, 40, False)
    assert sched.warmup == 25                       # of the budget's 800 + 200 steps
    sched = LRSchedule(ScheduleConfig(), PEAK, max_steps=4000)
    assert sched.update(0, 40, 10_000, False) and sched.warmup == 100   # the smaller of estimate and max-steps


def test_a_late_end_warns_that_the_decay_is_short():
    sched = LRSchedule(ScheduleConfig(kind="wsd", warmup_steps=10), PEAK)
    notes = [n for s in range(1000) for n in sched.update(s, 1000, 1000, s >= 950)]
    assert len(notes) == 1 and "decay starts at step 950 with 50 steps left, not 200" in notes[0]
    on_time = LRSchedule(ScheduleConfig(kind="wsd", warmup_steps=10), PEAK)
    assert [n for s in range(1000) for n in on_time.update(s, 1000, 1000, s >= 700)] == []
    budget = LRSchedule(ScheduleConfig(kind="wsd", warmup_steps=0, decay_tokens=70_000), PEAK, tokens_per_step=100)
    assert [n for s in range(900) for n in budget.update(s, 5000, 5000, False)] == []


@pytest.mark.parametrize("kind", ["wsd", "cosine"])
def test_an_end_known_before_the_warmup_decays_after_it(kind):
    # --max-steps 1000 on a cache that is still empty: the end is known at step 0, the warmup only once
    # there is a step to train. The decay must still begin after the warmup, at the peak.
    sched = LRSchedule(ScheduleConfig(kind=kind, warmup_fraction=0.1, decay_fraction=0.95), PEAK, max_steps=1000)
    sched.update(0, 0, 0, False)
    assert sched.warmup is None and sched.anchor is not None
    sched.update(0, 500, 500, False)
    assert sched.warmup == 100
    assert sched.lr(100) == pytest.approx(PEAK)     # the first step after the warmup runs at the peak
    assert sched.lr(99) < sched.lr(100)             # still rising until then
    assert sched.lr(999) < 0.2 * PEAK               # and decays to the end


def test_the_warmup_warning_names_where_its_length_came_from():
    sched = LRSchedule(ScheduleConfig(warmup_fraction=0.5), PEAK, max_steps=400)
    notes = sched.update(0, 40, 40, False)
    assert any("0.5 of the 400 steps of --max-steps" in n for n in notes), notes
    sched = LRSchedule(ScheduleConfig(warmup_fraction=0.5), PEAK)
    notes = sched.update(0, 40, 1000, False)
    assert any("0.5 of the 1,000 steps of the full dataset estimate" in n for n in notes), notes
