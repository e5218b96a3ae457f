"""What the trainer prints and writes as it goes (rank 0): the status line and the JSON-lines log."""
from __future__ import annotations

import errno
import json
import math
import sys
import time
from pathlib import Path

from .rundir import TrainError


def fmt_eta(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "--:--h"
    m = int(seconds // 60)
    return f"{m // 60:02d}:{m % 60:02d}h"


def shown_total(plan, max_steps: int | None) -> int:
    """The step count the status line and the log show: the plan's, its estimate while the cache grows,
    capped by --max-steps."""
    total = plan.total_steps if plan.finished else max(plan.total_steps, plan.estimated_total_steps)
    if max_steps:
        total = min(total, max_steps) if total else max_steps
    return int(total)


def status_line(step: int, total: int, loss: float | None, tokens_per_s: float | None, mfu: float | None,
                eta_s: float | None, val_loss: float | None = None) -> str:
    """`Step 770/26,235 ( 2.9%) | Loss 5.583 | 106,212 tok/s | ETA 04:23h`, with `| MFU 41.2%` on a GPU,
    `| Val 5.702` after a held-out evaluation (`Loss -` for a step without a target)."""
    line = f"Step {step:,}/{total:,} ({100 * step / max(total, 1):4.1f}%) | "
    line += f"Loss {loss:.3f} | " if loss is not None else "Loss - | "
    line += f"Val {val_loss:.3f} | " if val_loss is not None else ""
    line += f"{tokens_per_s:,.0f} tok/s" if tokens_per_s else "- tok/s"
    if mfu is not None:
        line += f" | MFU {100 * mfu:.1f}%"
    return line + f" | ETA {fmt_eta(eta_s)}"


def eval_line(val: dict, asked: int) -> str:
    """`eval: step 200, val_loss 5.702 on 256 sequences (32,512 targets)`, and how many the cache lacks."""
    if val["val_loss"] is None:
        return f"eval: step {val['step']:,}, the validation cache holds no sequence yet"
    short = (f"; the validation cache holds {val['val_sequences']:,} of the {asked:,} asked"
             if val["val_sequences"] < asked else "")
    return (f"eval: step {val['step']:,}, val_loss {val['val_loss']:.3f} on {val['val_sequences']:,} sequences "
            f"({val['val_tokens']:,} targets){short}")


def resumed_lines(run: str, name: str, step: int, later: list[str], keep: int) -> list[str]:
    """What a resumed trainer says: where from, and a warning when the run saved past that step."""
    lines = [f"resumed {run} from {name} (step {step:,})"]
    if later:
        # the kept checkpoints are the most recently saved: this line's saves push the old line's out
        fate = (f"checkpoint.keep = {keep} keeps the most recently saved, so those and {name} are the first to "
                f"go as this run saves" if keep else "none is pruned (checkpoint.keep = 0)")
        lines.append(f"warning: {run} has {len(later)} checkpoint(s) past step {step:,} ({later[-1]} the last "
                     f"saved); this run's saves now count as its newest, {fate}")
    return lines


def end_line(status: str, step: int, tokens: int, loss: float | None, checkpoints, run: str) -> str:
    what = "stopped by signal" if status == "stopped" else "done"
    return (f"{what}: step {step:,}, {tokens:,} tokens, loss {loss if loss is not None else float('nan'):.3f}; "
            f"checkpoints in {checkpoints}; resume with --resume {run}")


class Console:
    """The status line, refreshed in place on a terminal; plain periodic lines otherwise."""

    def __init__(self, enabled: bool, every: int, stream=sys.stderr):
        self.enabled = enabled
        self.every = every
        self.stream = stream
        self.tty = enabled and stream.isatty()
        self._open = False
        self._last_wait = 0.0

    def _write(self, line: str, in_place: bool) -> None:
        if not self.enabled:
            return
        if self.tty and in_place:
            self.stream.write("\r" + line + "\x1b[K")
            self._open = True
        else:
            if self._open:
                self.stream.write("\n")
                self._open = False
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, line: str) -> None:
        self._write(line, in_place=False)

    def status(self, line: str, step: int, force: bool = False) -> None:
        if self.tty:
            self._write(line, in_place=True)
        elif force or step % self.every == 0:
            self._write(line, in_place=False)

    def waiting(self, line: str) -> None:
        if self.tty:
            self._write(line, in_place=True)
        elif time.monotonic() - self._last_wait > 10:
            self._last_wait = time.monotonic()
            self._write(line, in_place=False)

    def close(self) -> None:
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False


class JsonlLog:
    """RUN_DIR/training_logs/<run>_run_<k>.jsonl: appended line by line, never rewritten."""

    def __init__(self, path: Path | None):
        self.path = path
        self.f = None
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self.f = open(path, "a", buffering=1)
            except OSError as e:
                raise self._failed(e) from None

    def write(self, record: dict) -> None:
        """One record per line; the file is opened for appending and line-buffered."""
        if self.f is not None:
            try:
                self.f.write(json.dumps(record, separators=(",", ":")) + "\n")
            except OSError as e:
                raise self._failed(e) from None

    def event(self, kind: str, /, quiet: bool = False, **fields) -> None:
        """An event record; `quiet`: a failure to write it is dropped (an error is on its way already)."""
        try:
            self.write({"event": kind, "time": round(time.time(), 3), **fields})
        except TrainError:
            if not quiet:
                raise

    def close(self, quiet: bool = False) -> None:
        """Close the file; quiet (in a finally) drops an error, so it never hides the one that got there."""
        f, self.f = self.f, None
        if f is not None:
            try:
                f.close()
            except OSError as e:
                if not quiet:
                    raise self._failed(e) from None

    def _failed(self, e: OSError) -> TrainError:
        # later writes do nothing: the record that failed stays in the buffer and each flush would fail again
        f, self.f = self.f, None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass
        what = "disk full" if e.errno == errno.ENOSPC else (e.strerror or type(e).__name__)
        return TrainError(f"{what} while writing the training log {self.path} (the steps after the last "
                          f"checkpoint are lost; {'make room, then ' if e.errno == errno.ENOSPC else ''}resume)")
