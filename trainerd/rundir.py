"""The run folder: every file and folder name in it, and every listing of it. The trainer, `ckpt` and
`packtrain` all read and change a run folder through this module.

    RUN_DIR/checkpoints/<run>-step<8 digits>/          one checkpoint (trainerd/checkpoint.py writes it)
    RUN_DIR/checkpoints/<run>-step<8 digits>_run_<k>/  the same step saved again by line k of the run
    RUN_DIR/checkpoints/.tmp-<name>-<pid>/             a save (or a delete) in progress
    RUN_DIR/training_logs/<run>_run_<k>.jsonl          the log of the run's k-th trainer process (its line)
    RUN_DIR/training_logs/<run>_run_<k>.rank<r>.data.jsonl   the optional data trace of rank r
    RUN_DIR/runs/<run>.json                            the run's record: id, creation time, first config
    RUN_DIR/.locks/<run>.lock                          held by the trainer of that run while it runs
    RUN_DIR/.triton-cache/                             Triton's compiled kernels (TRITON_CACHE_DIR, unless set)

Each trainer process of a run is a line k, one more than any line the folder shows. A checkpoint takes the
plain name of its step; a line resumed from an older step that reaches a step already saved by the line it
left saves under its own name (`_run_<k>`). So no save ever replaces or moves an existing folder.

Newest means most recently saved (then highest step): a run resumed from an older checkpoint follows a new
line, and that line is what `--resume RUN`, pruning and `packtrain`'s summary take.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import click

from shared.fsutil import FolderLock, LockHeld, atomic_write_bytes, fsync_dir, probe_locks

log = logging.getLogger("trainerd")

CHECKPOINTS = "checkpoints"
LOGS = "training_logs"
RUNS = "runs"
LOCKS = ".locks"
TRITON_CACHE = ".triton-cache"
TMP_PREFIX = ".tmp-"
META = "meta.json"
FORMAT = 1   # meta.json's format

NAME_RE = re.compile(r"^(?P<run>.+)-step(?P<step>\d+)(?:_run_(?P<line>\d+))?$")
TRASH_MARK = "~"  # after TMP_PREFIX: a checkpoint being deleted (no run name starts with it)
TMP_RE = re.compile(rf"^\.tmp-{re.escape(TRASH_MARK)}?(?P<name>(?P<run>.+)-step\d+(?:_run_\d+)?)-(?P<pid>\d+)$")
LOG_RE = re.compile(r"^(?P<run>.+)_run_(?P<k>\d+)\.jsonl$")


class TrainError(click.ClickException):
    """A user error of trainerd or ckpt: one line, non-zero exit."""


def ckpt_name(run: str, step: int, line: int | None = None) -> str:
    return f"{run}-step{step:08d}" + (f"_run_{line}" if line else "")


def check_run_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+=-]{0,99}", name) or ".." in name:
        raise TrainError(f"run name {name!r} must be letters, digits and _ . + = - (at most 100, no '..')")
    return name


def check_name(name: str, what: str = "checkpoint") -> str:
    """Refuse anything that is not a plain folder or file name: separators, '..', a leading '.'."""
    seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if not name or ".." in name or "\0" in name or name.startswith(".") or any(s in name for s in seps):
        raise TrainError(f"{name!r} is not a {what} name (a name, not a path: no '/', '..' or leading '.')")
    return name


def as_number(x) -> float | None:
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _is_trash(name: str) -> bool:
    """A folder RunDir.delete renamed out of the listing (see TRASH_MARK)."""
    return name.startswith(TMP_PREFIX + TRASH_MARK)


def tree_bytes(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except FileNotFoundError:
                pass
    return total


class Checkpoint:
    """One checkpoint folder, described by its meta.json alone (the weights are never opened here)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.name = self.path.name
        self.meta: dict = {}
        self.error: str | None = None
        try:
            meta = json.loads((self.path / META).read_text())
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
            self.meta = meta
        except FileNotFoundError:
            self.error = f"{META} is missing"
        except (OSError, ValueError) as e:
            self.error = f"{META} is unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        self._from_name = NAME_RE.match(self.name)

    @property
    def complete(self) -> bool:
        """A finished save the trainer can resume: meta.json of this format with a step."""
        return self.error is None and self.meta.get("format") == FORMAT and isinstance(self.meta.get("step"), int)

    @property
    def run(self) -> str | None:
        run = self.meta.get("run")
        if isinstance(run, str):
            return run
        return self._from_name.group("run") if self._from_name else None

    @property
    def step(self) -> int | None:
        step = self.meta.get("step")
        if isinstance(step, int) and not isinstance(step, bool):
            return step
        return int(self._from_name.group("step")) if self._from_name else None

    @property
    def run_id(self) -> str | None:
        return self.meta.get("run_id")

    @property
    def loss(self) -> float | None:
        return as_number(self.meta.get("loss"))

    @property
    def time(self) -> float | None:
        t = as_number(self.meta.get("time"))
        return t if t is not None and 0 <= t < 1e11 else None  # a time a clock can show (no nan, no 1e300)

    @property
    def files(self) -> dict:
        files = self.meta.get("files")
        return files if isinstance(files, dict) else {}

    @property
    def size(self) -> int | None:
        """Bytes of the files meta.json records (no stat, no read of the weights)."""
        sizes = [f.get("bytes") for f in self.files.values() if isinstance(f, dict)]
        if not sizes or not all(isinstance(b, int) for b in sizes):
            return None
        return sum(sizes)

    def summary(self) -> dict:
        return {"name": self.name, "run": self.run, "run_id": self.run_id, "step": self.step, "loss": self.loss,
                "val_loss": as_number(self.meta.get("val_loss")), "tokens": self.meta.get("tokens"),
                "time": self.time, "size": self.size, "path": str(self.path), "error": self.error}

    def sort_key(self):
        return (self.time or 0.0, self.step if self.step is not None else -1, self.name)


class Leftover:
    """Something `ckpt clean` may remove: an unfinished save or an orphaned log."""

    def __init__(self, path: Path, runs: tuple[str, ...] | None, why: str):
        self.path, self.runs, self.why = path, runs, why   # runs: the run it belongs to; None: unknown
        self.bytes = tree_bytes(path)


class RunDir:
    """A trainer run folder: checkpoints/, training_logs/, runs/, .locks/."""

    def __init__(self, path: str | os.PathLike | None, must_exist: bool = False):
        if path is None or str(path) == "":
            raise TrainError("no run folder: pass --run-dir DIR or set TRAINERD_RUN_DIR")
        self.path = Path(path)
        self.checkpoints_dir = self.path / CHECKPOINTS
        self.logs_dir = self.path / LOGS
        self.locks_dir = self.path / LOCKS
        if not must_exist:
            return
        if not self.path.is_dir():
            raise TrainError(f"run folder {self.path} does not exist")
        if not any((self.path / d).is_dir() for d in (CHECKPOINTS, LOGS, RUNS)):
            raise TrainError(f"{self.path} is not a run folder (it has no {CHECKPOINTS}/, {LOGS}/ or {RUNS}/)")

    # -- checkpoints --------------------------------------------------------------------------------
    def checkpoints(self, run: str | None = None, complete: bool = False) -> list[Checkpoint]:
        """Checkpoint folders (symbolic links and .tmp- folders left out), newest first; `complete`: only
        those a trainer can resume."""
        if not self.checkpoints_dir.is_dir():
            return []
        cks = [Checkpoint(Path(e.path)) for e in os.scandir(self.checkpoints_dir)
               if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)]
        cks = [c for c in cks if (run is None or c.run == run) and (c.complete or not complete)]
        return sorted(cks, key=Checkpoint.sort_key, reverse=True)

    def later(self, run: str, step: int) -> list[str]:
        """The complete checkpoints of RUN past `step`, oldest first: what a resume from `step` leaves ahead."""
        return [c.name for c in reversed(self.checkpoints(run, complete=True)) if c.step > step]

    def newest(self, run: str | None = None) -> Checkpoint | None:
        cks = self.checkpoints(run, complete=True)
        return cks[0] if cks else None

    def find(self, spec: str) -> Checkpoint:
        """'latest' (the newest of any run), a checkpoint name, or a run name (its newest checkpoint)."""
        cks = self.checkpoints(complete=True)
        if not cks:
            raise TrainError(f"no checkpoint in {self.checkpoints_dir} to resume from")
        if spec == "latest":
            return cks[0]
        for c in cks:
            if c.name == spec:
                return c
        for c in cks:
            if c.run == spec:
                return c
        raise TrainError(f"no checkpoint or run named {spec!r} in {self.checkpoints_dir} "
                         f"(see `ckpt list --run-dir {self.path}`)")

    def get(self, name: str) -> Checkpoint:
        """The checkpoint folder NAME, whatever its state (for `ckpt`)."""
        check_name(name)
        path = self.checkpoints_dir / name
        if path.resolve().parent != self.checkpoints_dir.resolve():
            raise TrainError(f"{name!r} resolves outside {self.checkpoints_dir}; refused")
        if path.is_symlink():
            raise TrainError(f"{path} is a symbolic link, not a checkpoint folder; refused")
        if not path.is_dir():
            raise TrainError(f"no checkpoint named {name!r} in {self.checkpoints_dir} (`ckpt list` shows the names)")
        return Checkpoint(path)

    def save_name(self, run: str, step: int, line: int) -> str:
        """The folder name for line `line`'s save of `step`: the plain name unless it is taken."""
        plain = ckpt_name(run, step)
        return plain if not (self.checkpoints_dir / plain).exists() else ckpt_name(run, step, line)

    def temporary(self, name: str, trash: bool = False) -> Path:
        return self.checkpoints_dir / f"{TMP_PREFIX}{TRASH_MARK if trash else ''}{name}-{os.getpid()}"

    def delete(self, ck: Checkpoint) -> None:
        """Rename the folder out of the listing first (a resume never sees half a checkpoint), then remove it.
        A crash in between leaves a .tmp-~ folder that the run's next trainer or `ckpt clean` removes (the
        mark tells it from a save cut before its rename, which may hold the only copy)."""
        trash = self.temporary(ck.name, trash=True)
        try:
            os.rename(ck.path, trash)
        except FileNotFoundError:
            return  # removed meanwhile
        (trash / META).unlink(missing_ok=True)  # first: a delete cut short leaves no complete checkpoint
        shutil.rmtree(trash)
        fsync_dir(self.checkpoints_dir)

    def prune_plan(self, keep: int, run: str | None = None, keep_name: str | None = None
                   ) -> tuple[list[Checkpoint], list[Checkpoint]]:
        """(checkpoints beyond the newest KEEP of each run, unreadable ones left alone). `keep_name` (the save
        just written) counts as the newest whatever its time says: a clock set back must not make it go first."""
        by_run: dict[str, list[Checkpoint]] = {}
        unreadable = []
        for c in self.checkpoints(run):  # one a trainer cannot resume never counts among the newest kept
            if c.error or c.run is None or c.step is None or not c.complete:
                unreadable.append(c)
            else:
                by_run.setdefault(c.run, []).append(c)
        doomed = []
        for r in sorted(by_run):
            ordered = sorted(by_run[r], key=lambda c: (c.name == keep_name, c.time or 0.0, c.step), reverse=True)
            doomed += ordered[keep:]
        return doomed, unreadable

    def prune(self, run: str, keep: int, keep_name: str) -> list[str]:
        """After the save `keep_name`: delete all but the newest KEEP checkpoints of RUN (0: keep all);
        returns the deleted names (one that cannot be removed is left, with a warning)."""
        deleted = []
        for c in self.prune_plan(keep, run=run, keep_name=keep_name)[0] if keep else []:
            try:
                self.delete(c)
                deleted.append(c.name)
            except OSError as e:  # a checkpoint that cannot be removed costs disk, not the run
                log.warning("could not prune %s: %s", c.name, e)
        return deleted

    # -- logs and records ---------------------------------------------------------------------------
    def log_files(self, run: str) -> list[Path]:
        """training_logs/<run>_run_<k>.jsonl in order of k."""
        if not self.logs_dir.is_dir():
            return []
        found = []
        for p in self.logs_dir.iterdir():
            m = LOG_RE.match(p.name)
            if m and m.group("run") == run and p.is_file():
                found.append((int(m.group("k")), p))
        return [p for _, p in sorted(found)]

    def next_line(self, run: str) -> int:
        """k of a new trainer process of RUN (call holding the run's lock): one more than any log or
        checkpoint name shows, so its saves and logs never meet an earlier line's."""
        ks = [int(LOG_RE.match(p.name).group("k")) for p in self.log_files(run)]
        if self.checkpoints_dir.is_dir():
            ks += [int(m.group("line")) for p in self.checkpoints_dir.iterdir()
                   if (m := NAME_RE.match(p.name)) and m.group("run") == run and m.group("line")]
        return max(ks, default=0) + 1

    def log_path(self, run: str, line: int) -> Path:
        return self.logs_dir / f"{run}_run_{line}.jsonl"

    def trace_path(self, run: str, line: int, rank: int) -> Path:
        return self.logs_dir / f"{run}_run_{line}.rank{rank}.data.jsonl"

    def record_path(self, run: str) -> Path:
        return self.path / RUNS / f"{run}.json"

    def write_record(self, run: str, run_id: str, config: dict) -> None:
        """runs/<run>.json, written once when the run starts: its id, creation time and first config."""
        rec = {"run": run, "run_id": run_id, "created": time.time(), "config": config}
        self.record_path(run).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.record_path(run), json.dumps(rec, indent=2).encode())

    # -- locks --------------------------------------------------------------------------------------
    def lock_path(self, run: str) -> Path:
        return self.locks_dir / f"{run}.lock"

    def lock_run(self, run: str, patience_s: float = 2.0) -> FolderLock:
        """The trainer's lock of RUN, held until release. Retries for `patience_s` before TrainError: `ckpt
        clean` probes locks for a moment (hold_run)."""
        self.locks_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + patience_s
        while True:
            try:
                return FolderLock(self.locks_dir, f"{run}.lock").acquire()
            except LockHeld:
                if time.monotonic() > deadline:
                    raise TrainError(self.busy_message(run)) from None
                time.sleep(0.05)

    def busy_message(self, run: str) -> str:
        return f"another trainer is running run {run} ({self.lock_path(run)} is held)"

    @contextmanager
    def hold_run(self, runs: tuple[str, ...] | None):
        """Yields False when a trainer of one of RUNS is alive (its lock is held); True while holding them.

        A probe: a lock file is not created and nothing is written to it. For None (a leftover no run can be
        read from) every lock counts."""
        if runs is None:
            paths = sorted(self.locks_dir.glob("*.lock")) if self.locks_dir.is_dir() else []
        else:
            paths = [self.lock_path(r) for r in runs]
        with probe_locks(paths) as free:
            yield free

    def is_training(self, runs: tuple[str, ...] | None) -> bool:
        with self.hold_run(runs) as free:
            return not free

    # -- leftovers ----------------------------------------------------------------------------------
    def unfinished_saves(self, run: str | None = None) -> list[Leftover]:
        """checkpoints/.tmp-* folders (of RUN only, when given): saves and deletes that a crash cut short.
        One that holds a complete checkpoint whose name is not listed is left out (see `stranded`)."""
        if not self.checkpoints_dir.is_dir():
            return []
        out = []
        for e in sorted(os.scandir(self.checkpoints_dir), key=lambda e: e.name):
            if not e.name.startswith(TMP_PREFIX) or self.stranded(Path(e.path)):
                continue
            m = TMP_RE.match(e.name)
            if run is None or (m and m.group("run") == run):
                what = "unfinished delete" if _is_trash(e.name) else "unfinished save"
                out.append(Leftover(Path(e.path), (m.group("run"),) if m else None, what))
        return out

    def stranded(self, folder: Path) -> str | None:
        """The name of the complete checkpoint a .tmp- folder holds when no folder of that name is listed
        (a save cut between its last fsync and its rename, or a folder moved aside by hand): never removed,
        as it may be the only copy; renamed to that name, it is listed again."""
        if _is_trash(folder.name):
            return None  # being deleted: asked for, never the only copy worth keeping
        c = Checkpoint(folder)
        name = c.meta.get("name")
        if not c.complete or not isinstance(name, str) or not NAME_RE.match(name) or "/" in name:
            return None
        return None if (self.checkpoints_dir / name).exists() else name

    def orphaned_logs(self) -> list[Leftover]:
        with_checkpoints = {c.run for c in self.checkpoints()}
        out = []
        if self.logs_dir.is_dir():
            for p in sorted(self.logs_dir.iterdir()):
                m = LOG_RE.match(p.name)
                if m and p.is_file() and m.group("run") not in with_checkpoints:
                    out.append(Leftover(p, (m.group("run"),), f"orphaned log: run {m.group('run')} has no checkpoint"))
        return out

    def remove_unfinished_saves(self, run: str) -> list[str]:
        """Remove what crashed saves of RUN left (call holding the run's lock); returns one line each."""
        out = []
        for item in self.unfinished_saves(run):
            shutil.rmtree(item.path, ignore_errors=True)
            out.append(f"removed {item.path.name}: an {item.why} of an earlier trainer")
        return out + self.stranded_lines()

    def stranded_lines(self) -> list[str]:
        """One line for each .tmp- folder that holds a complete checkpoint outside the listing."""
        tmp = sorted(p for p in self.checkpoints_dir.glob(f"{TMP_PREFIX}*") if p.is_dir()) \
            if self.checkpoints_dir.is_dir() else []
        return [f"kept {p.name}: it holds the complete checkpoint {name}, which is not listed; rename it to "
                f"{self.checkpoints_dir / name} to use it" for p in tmp if (name := self.stranded(p))]
