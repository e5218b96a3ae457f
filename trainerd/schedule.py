"""Learning rate over a total that is not known in advance.

The learning rate is a pure function of (step, the schedule's parameters, its small state); the state
changes only through `update()` at an optimizer-step boundary, and never so that the rate jumps:
a scheduler is never rebuilt and stepped N times (a rebuilt one follows the new plan from step 0 on,
so the rate at the current step jumps).

- Warmup: `warmup_fraction` of the steps of the FULL dataset estimate (the manifest's), fixed at the
  first update that has a step to train (or `warmup_steps`). Linear from peak/W to peak. Without an
  estimate (a source that gives no size) --max-steps or the token budget stand in for it; with none of
  them, the cache as it is then, with a warning.
- The decay, from peak to `min_lr_fraction * lr`, has the shape and the place of its kind: the table KINDS
  below, which schedule.kind, its --schedule flag and --help-config read (a new kind is an entry there).
  A kind decays either like wsd, over the last decay_fraction, or (`whole_run`) like cosine.
- wsd (default): warmup, constant, then a 1-sqrt decay over the last `decay_fraction` of the run. The end
  of the run becomes known when the cache is finished, from `--max-steps`, or from a token budget
  (`decay_tokens`: the decay starts there and lasts decay_fraction/(1-decay_fraction) of it). Growth
  before the decay starts moves nothing. An end that becomes known with fewer steps left than the decay
  should take (a trainer that kept up with the packer learns the final size near the end) gives a
  shorter decay, with a warning.
- cosine: from the end of the warmup to the current estimate of the total, continuous as it changes.

Continuity: a phase's progress q(s) is anchored, q(s) = q0 + (1 - q0) (s - s0) / (end - s0). When the end
moves at step s, the anchor becomes (s, q(s), new end): the rate at s is what it would have been, and only
the speed of the remaining decay changes. So the difference at an expansion is at most one normal step's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # config.py reads KINDS from this module: importing it here at run time would be circular
    from .config import ScheduleConfig


@dataclass(frozen=True)
class Kind:
    """A schedule kind: the shape of its decay and where the decay lies.

    shape: the decay's progress q in [0, 1] -> the share of (peak - min) above min: 1 at q = 0, 0 at q = 1.
    whole_run: True, the decay runs from the end of the warmup to the estimated end (like cosine);
    False, over the last decay_fraction of the run (like wsd).
    help: one line for --help and --help-config."""
    shape: Callable[[float], float]
    whole_run: bool
    help: str


KINDS: dict[str, Kind] = {
    "wsd": Kind(lambda q: 1.0 - math.sqrt(q), whole_run=False,
                help="warmup, constant, then a 1-sqrt decay over the last decay_fraction of the run"),
    "cosine": Kind(lambda q: 0.5 * (1.0 + math.cos(math.pi * q)), whole_run=True,
                   help="warmup, then a cosine decay over the current estimate of the run"),
}


class LRSchedule:
    def __init__(self, cfg: ScheduleConfig, peak_lr: float, max_steps: int | None = None,
                 tokens_per_step: int | None = None):
        self.kind = cfg.kind
        self._kind = KINDS[cfg.kind]
        self.peak = float(peak_lr)
        self.min = float(peak_lr) * cfg.min_lr_fraction
        self.warmup_fraction = cfg.warmup_fraction
        self.warmup_steps_cfg = cfg.warmup_steps
        self.decay_fraction = cfg.decay_fraction
        self.max_steps = max_steps
        self.budget_end: tuple[int, int] | None = None  # (decay start, end) from the token budget
        if cfg.decay_tokens and tokens_per_step:
            d = max(1, math.ceil(cfg.decay_tokens / tokens_per_step))
            k = max(1, round(d * self.decay_fraction / (1 - self.decay_fraction))) if self.decay_fraction < 1 else d
            self.budget_end = (d, d + k)
        # state
        self.warmup: int | None = None
        self.end: int | None = None        # the step count the schedule decays to (None: not known yet)
        self.anchor: tuple[int, float] | None = None  # (s0, q0) of the decay phase
        self._warned_late = False

    # -- state changes, only at optimizer-step boundaries ------------------------------------------------
    def update(self, step: int, total_steps: int, estimated_total_steps: int, finished: bool) -> list[str]:
        """Take in the plan as it is before optimizer step `step`; returns warnings for the log."""
        notes = []
        if self.warmup is None and (total_steps > step or finished):  # fixed when there is a step to train
            if self.warmup_steps_cfg is not None:
                self.warmup, source = self.warmup_steps_cfg, "schedule.warmup_steps"
            else:
                # the run's length as far as it is known: the full estimate (an unfinished cache whose
                # estimate is no larger than what it holds has none: its source gives no size),
                # --max-steps, the token budget; the cache as it is now only when none of them is known
                known = [(estimated_total_steps, "the full dataset estimate")] \
                    if finished or estimated_total_steps > total_steps else []
                known += [(n, what) for n, what in ((self.max_steps, "--max-steps"),
                                                    (self.budget_end and self.budget_end[1], "schedule.decay_tokens"))
                          if n]
                length, source = min(known) if known else (total_steps, "the cache as it is now")
                self.warmup = int(round(self.warmup_fraction * length))
                source = f"{self.warmup_fraction:g} of the {length:,} steps of {source}"
                if not known:
                    notes.append(f"no estimate of the full dataset (its source gives no size; packerd "
                                 f"--estimate-tokens sets one): warmup is {self.warmup:,} steps, "
                                 f"{self.warmup_fraction:g} of the {total_steps:,} the cache holds now; set "
                                 f"schedule.warmup_steps, --max-steps or schedule.decay_tokens")
            if not finished and self.warmup > total_steps:
                notes.append(f"warmup of {self.warmup:,} steps ({source}) is longer than "
                             f"the {total_steps:,} steps the cache holds now")
            if self.end is not None:
                # an end known before the warmup (--max-steps while the cache was still empty) placed the
                # decay as if there were no warmup: place it again (it has not begun)
                self._move_end(step, self.end)
        end = self._target_end(total_steps, estimated_total_steps, finished)
        if end is not None and end != self.end:
            self._move_end(step, end)
            if not self._kind.whole_run and not self._warned_late and self.decay_start is not None:
                planned = int(round(self.decay_fraction * end))
                have = end - self.decay_start
                if have + 1 < planned:  # (+1: the token budget's decay length is rounded on its own)
                    self._warned_late = True
                    notes.append(f"the decay starts at step {self.decay_start:,} with {have:,} steps left, not "
                                 f"{planned:,} ({self.decay_fraction:g} of {end:,}): the run's end became known late; "
                                 f"schedule.decay_tokens or --max-steps start it in time")
        return notes

    def _target_end(self, total: int, estimate: int, finished: bool) -> int | None:
        ends = []
        if self.max_steps:
            ends.append(self.max_steps)
        if finished:
            ends.append(total)
        if self._kind.whole_run:
            ends.append(max(estimate, total))
        elif self.budget_end:
            ends.append(self.budget_end[1])
        return min(ends) if ends else None

    def _move_end(self, step: int, end: int) -> None:
        w = self.warmup or 0
        if self.end is None or self.anchor is None:
            self.end = end
            self.anchor = (self._decay_start(step, end), 0.0)
            return
        s0, q0 = self.anchor
        if step <= s0 and q0 == 0.0:
            # the decay has not begun: place it again for the new end (nothing used the old one yet)
            self.end = end
            self.anchor = (self._decay_start(step, end), 0.0)
            return
        at = max(step, w)
        self.anchor = (at, self._progress(at))
        self.end = end

    def _decay_start(self, step: int, end: int) -> int:
        w = self.warmup or 0
        if self._kind.whole_run:
            return max(w, step)
        if self.budget_end and end == self.budget_end[1]:
            start = self.budget_end[0]
        else:
            start = end - int(round(self.decay_fraction * end))
        return max(start, step, w)

    # -- the rate --------------------------------------------------------------------------------
    def _progress(self, step: int) -> float:
        if self.anchor is None or self.end is None:
            return 0.0
        s0, q0 = self.anchor
        if step <= s0:
            return q0
        span = max(self.end - s0, 1)
        return min(1.0, q0 + (1.0 - q0) * (step - s0) / span)

    def lr(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based)."""
        w = self.warmup or 0
        if step < w:
            return self.peak * (step + 1) / (w + 1)
        return self.min + (self.peak - self.min) * self._kind.shape(self._progress(step))

    @property
    def decay_start(self) -> int | None:
        return self.anchor[0] if self.anchor and self.anchor[1] == 0.0 else None

    def state_dict(self) -> dict:
        return {"kind": self.kind, "peak": self.peak, "min": self.min, "warmup": self.warmup, "end": self.end,
                "anchor": list(self.anchor) if self.anchor else None, "max_steps": self.max_steps}

    def load_state_dict(self, d: dict) -> None:
        """The phase state (warmup, end, anchor) of a saved run; the rates come from the current config."""
        if d.get("kind") != self.kind:
            raise ValueError(f"the checkpoint's schedule is {d.get('kind')}, the config says {self.kind}")
        self.warmup = d["warmup"]
        self.end = d["end"]
        self.anchor = (int(d["anchor"][0]), float(d["anchor"][1])) if d.get("anchor") else None
