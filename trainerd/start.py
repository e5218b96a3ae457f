"""How a trainer starts, decided once, on the main process, before torch loads.

`prepare` loads the config, waits for the cache (unless data.wait is off), decides the run (--new, --resume,
the checkpoint menu on a terminal, or the default below), takes the run's lock, reads and checks the
checkpoint it resumes against the cache, and returns a `Start` that the trainer hands to every rank.

Decisions:
- Without --new/--resume and not on a terminal (or with several processes): resume the newest
  checkpoint of the suggested run name (like `tiny_pydoc_64`) if it has one, else start that run new.
  Re-running the same command after a crash so goes on where it stopped.
- --new NAME of a run that already has checkpoints is refused (use --resume NAME).
- A resumed run starts from its saved config; the TOML file and the flags still win.
"""
from __future__ import annotations

import os
import re
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import click

from shared.cache import Cache, CacheError, open_cache, unlike
from shared.config import ConfigError
from shared.manifest import Manifest, ManifestError, load_manifest

from . import checkpoint as ck
from .config import LEGACY_WINDOW_CHUNKS, Config, load_config
from .evaluate import check_validation_cache
from .output import Console
from .rundir import Checkpoint, RunDir, TrainError, check_run_name


class _Stop:
    """The signal that asked the trainer to stop (None while none has)."""

    def __init__(self):
        self.sig = None

    def handler(self, signum, frame):
        if self.sig is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once, without saving
        self.sig = signum


STOP = _Stop()


def catch_stop_signals() -> dict:
    """SIGINT/SIGTERM only set STOP.sig: the loop saves at the next step boundary and exits 0. Returns the
    handlers they replace."""
    return {s: signal.signal(s, STOP.handler) for s in (signal.SIGINT, signal.SIGTERM)}


# -- run names -------------------------------------------------------------------------------------
_DATASET_NAMES = {"fineweb": "FineWeb", "wikitext": "WikiText", "openwebtext": "OpenWebText", "pydoc": "pydoc",
                  "tinystories": "TinyStories", "c4": "C4", "pile": "Pile", "slimpajama": "SlimPajama"}


def dataset_label(sources: list[str]) -> str:
    if not sources:
        return "data"
    s = sources[0]
    if s.startswith("hf:"):
        s = s[3:].split(":")[0].split("/")[-1]
    elif s.startswith("builtin:"):
        s = s.split(":", 1)[1]
    else:
        p = Path(s.split("*")[0].rstrip("/"))
        s = p.stem if p.suffix else p.name
        if re.fullmatch(r"(train|valid|validation|test|dev|data|part|shard)?[-_.]?\d*", s.lower()):
            s = p.parent.name or s  # a split or shard file: the folder names the dataset
    head = re.split(r"[-_.\s]+", s.strip())[0] or "data"
    label = _DATASET_NAMES.get(head.lower(), head)
    return re.sub(r"[^A-Za-z0-9]", "", label) or "data"


def suggest_name(cfg: Config, sources: list[str], seq_len: int) -> str:
    """`415M_FineWeb_512`, `tiny_pydoc_64`: the preset, the dataset, the sequence length."""
    model = cfg.model.preset.upper() if cfg.model.preset[0].isdigit() else cfg.model.preset
    return f"{model}_{dataset_label(sources)}_{seq_len}"


# -- the decision ----------------------------------------------------------------------------------
@dataclass
class Start:
    mode: str                 # "new" or "resume"
    run: str
    run_id: str
    ckpt: str | None = None   # checkpoint folder when resuming
    line: int = 1             # this process is line k of the run: training_logs/<run>_run_<k>.jsonl
    checked: bool = False     # the checkpoint and the validation cache were checked against the cache
    config: dict = field(default_factory=dict)  # the resolved config, the same on every rank

    @classmethod
    def resume_from(cls, c: Checkpoint) -> "Start":
        return cls("resume", c.run, c.run_id or uuid.uuid4().hex[:12], str(c.path))

    @classmethod
    def new_run(cls, name: str) -> "Start":
        return cls("new", name, uuid.uuid4().hex[:12])


def _menu_choices(rd: RunDir, cks: list[Checkpoint]) -> None:
    click.echo(f"Checkpoints in {rd.checkpoints_dir}:")
    if not cks:
        click.echo("  (none)")
    for i, c in enumerate(cks, 1):
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(c.time or 0))
        loss = f"  loss {c.loss:.3f}" if c.loss is not None else ""
        click.echo(f"  {i}. {c.name}  step {c.step:,}{loss}  {when}")
    click.echo("  N. Start New Training")
    click.echo("  X. Checkpoint Management")


def _menu_new_name(rd: RunDir, suggested: str) -> str | None:
    taken = {c.run for c in rd.checkpoints(complete=True)}
    options = [suggested] + [f"{suggested}_{k}" for k in range(2, 6)]
    free = [o for o in options if o not in taken]
    click.echo("Name suggestions: " + ", ".join(free[:3]))
    name = check_run_name(click.prompt("Run name", default=free[0] if free else suggested).strip())
    if name in taken:
        click.echo(f"run {name} already has checkpoints; pick it from the list to resume it")
        return None
    return name


def interactive_menu(run_dir: str, suggested: str) -> Start:
    """The checkpoint menu: pick a checkpoint, start new, or manage checkpoints. Ctrl-C there aborts: the
    stop handlers, which let a training run reach its next save, would only note it while the prompt kept
    waiting, and the run picked next would stop at once."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return _menu(run_dir, suggested)
    finally:
        signal.signal(signal.SIGINT, previous)


def _menu(run_dir: str, suggested: str) -> Start:
    rd = RunDir(run_dir)
    while True:
        cks = rd.checkpoints(complete=True)  # newest first
        _menu_choices(rd, cks)
        answer = click.prompt("Choice", default="1" if cks else "N").strip().upper()
        if answer == "X":
            from .admin import menu
            menu(run_dir)
        elif answer == "N":
            name = _menu_new_name(rd, suggested)
            if name is not None:
                return Start.new_run(name)
        elif answer.isdigit() and 1 <= int(answer) <= len(cks):
            return Start.resume_from(cks[int(answer) - 1])
        else:
            click.echo(f"{answer!r} is not a choice")


def decide_start(run_dir: str, new: str | None, resume: str | None, suggested: str, interactive: bool) -> Start:
    rd = RunDir(run_dir)
    if new and resume:
        raise TrainError("use either --new NAME or --resume latest|NAME, not both")
    if resume:
        return Start.resume_from(rd.find(resume))
    if new:
        check_run_name(new)
        if rd.checkpoints(new, complete=True):
            raise TrainError(f"run {new} already has checkpoints in {rd.checkpoints_dir}: "
                             f"use --resume {new}, or another name")
        return Start.new_run(new)
    if interactive:
        return interactive_menu(run_dir, suggested)
    newest = rd.newest(suggested)
    return Start.resume_from(newest) if newest else Start.new_run(suggested)


# -- the cache and the precision -------------------------------------------------------------------
def wait_for_cache(cfg: Config, console: Console, fail=None, cache_dir: str | None = None) -> Cache:
    """The cache (`cache_dir`, by default the first of data.cache_dir), waiting for its manifest to appear
    unless data.wait is off. `fail(msg)` raises the error (the trainer's ranks pass their own); by default a
    TrainError."""
    fail = fail or _raise
    cache_dir = cache_dir or cfg.data.cache_dir[0]
    waited_since = time.monotonic()
    while True:
        try:
            cache = open_cache(cache_dir)
            if not cache.chunks and not cfg.data.wait:
                fail(f"cache {cache_dir} has no chunks yet (without --no-wait the trainer waits)")
            return cache
        except CacheError as e:
            if not cfg.data.wait:
                fail(f"{e} (without --no-wait the trainer waits for it)")
            if cfg.data.wait_seconds and time.monotonic() - waited_since > cfg.data.wait_seconds:
                fail(f"{e}: gave up after {cfg.data.wait_seconds:g} s")
            if STOP.sig is not None:  # stopped before anything was trained: nothing to save
                console.message(f"stopped by signal {STOP.sig} while waiting for the cache")
                raise SystemExit(0)
            console.waiting(f"waiting for the cache {cache_dir}: {e}")
            time.sleep(0.5)


def wait_for_caches(cfg: Config, console: Console, fail=None) -> list[Cache]:
    """Every cache of data.cache_dir (wait_for_cache each), checked to share the first one's seq_len and
    tokenizer."""
    caches = [wait_for_cache(cfg, console, fail, d) for d in cfg.data.cache_dir]
    for c in caches[1:]:
        if problem := caches_differ(caches[0].manifest, c.dir, c.manifest):
            (fail or _raise)(problem)
    return caches


def _raise(msg: str):
    raise TrainError(msg)


def caches_differ(first: Manifest, cache_dir, m: Manifest) -> str | None:
    """Why the cache `cache_dir` (manifest m) cannot be mixed with the first cache of the run, or None."""
    why = unlike(m, first, f"cache {cache_dir}", "the first cache")
    return why and f"{why}: the caches of a run share it"


def mixed_precision_asked(asked: str) -> str:
    """no, bf16, fp16, or auto (bf16 where CUDA has it, else no). auto takes `accelerate launch
    --mixed_precision` (or its config file) first; accelerate launch sets "no" when it was not asked
    (ACCELERATE_MIXED_PRECISION is always set), so fp32 on CUDA takes trainerd's own --mixed-precision no."""
    if asked != "auto":
        return asked
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launched not in ("no", "bf16", "fp16"):
        raise TrainError(f"accelerate's mixed precision {launched!r} is not supported here (no, bf16, fp16)")
    return launched if launched != "no" else "auto"


def resolve_mixed_precision(asked: str, cuda: bool) -> str:
    """no, bf16 or fp16 for this process (see mixed_precision_asked)."""
    mixed = mixed_precision_asked(asked)
    if mixed == "auto":
        import torch
        mixed = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if mixed == "fp16" and not cuda:
        # Accelerate would skip fp16 on the CPU and silently train in fp32
        raise TrainError("train.mixed_precision fp16 needs CUDA; on the CPU use bf16 or no")
    return mixed


def check_kernels_asked(cfg: Config) -> None:
    """model.attention, model.flash_attention, model.liger_kernels and train.loss can name kernels this machine
    lacks: checked here, before anything is written (torch and transformers load only when one is named)."""
    m = cfg.model
    if m.attention == "auto" and not m.flash_attention and not m.liger_kernels and cfg.train.loss != "liger":
        return
    import torch

    from .model import check_kernels, resolve_attention
    cuda = torch.cuda.is_available()
    try:
        resolve_attention(m, cuda)
        check_kernels(m, cfg.train.loss, cuda, len(cfg.data.cache_dir))
    except ConfigError as e:
        raise TrainError(str(e)) from None


def fault_hook() -> tuple[str | None, int | None]:
    """The fault tests' hook, from the environment: TRAINERD_FAULT=kill-at-step:N (SIGKILL itself right
    after step N is logged), kill-in-save:N (SIGKILL in the middle of writing the checkpoint of step N) or
    read-error-at-step:N (the last rank alone fails to read its batch of step N, as a chunk read can)."""
    spec = os.environ.get("TRAINERD_FAULT", "")
    if not spec:
        return None, None
    kind, _, n = spec.partition(":")
    if kind not in ("kill-at-step", "kill-in-save", "read-error-at-step") or not n.isdigit():
        raise TrainError(f"TRAINERD_FAULT={spec!r}: expected kill-at-step:N, kill-in-save:N or read-error-at-step:N")
    return kind, int(n)


# -- the one start-up step ---------------------------------------------------------------------------
CACHE_REQUIRED = "data.cache_dir is required (--cache-dir)"


def _config(config_file: str | None, overrides: dict, base: dict | None = None, where: str = "") -> Config:
    try:
        return load_config(config_file, overrides, base=base)
    except ConfigError as e:
        raise TrainError(f"{where}{e}") from None


def _resumed_config(start: Start, run_dir: str, config_file: str | None, overrides: dict) -> Config:
    """The checkpoint's saved config under the file and the flags, after checking its files are all there."""
    folder = Path(start.ckpt)
    try:
        ck.check_files(folder, Checkpoint(folder).meta)
        saved = ck.read_json(folder, "config.json")
    except ck.CheckpointError as e:
        raise TrainError(str(e)) from None
    if not isinstance(saved.get("train", {}), dict):
        raise TrainError(f"checkpoint {folder.name}: config.json's train is not a table")
    saved.setdefault("train", {})["run_dir"] = run_dir
    if isinstance(saved.get("data"), dict) and "shuffle_window" not in saved["data"]:
        first = saved["data"].get("cache_dir") or [""]
        saved["data"]["shuffle_window"] = _legacy_window(folder, first if isinstance(first, str) else first[0])
    return _config(config_file, overrides, base=saved, where=f"checkpoint {folder.name}: ")


def _legacy_window(folder: Path, cache_dir: str) -> int:
    """The shuffle window, in sequences, of a checkpoint saved before data.shuffle_window existed: it shuffled
    within LEGACY_WINDOW_CHUNKS chunks, and a resume keeps its order (the data state checks it)."""
    try:
        manifest = load_manifest(cache_dir) if cache_dir else None
    except ManifestError:
        manifest = None
    if manifest is None:
        raise TrainError(f"checkpoint {folder.name} was saved before data.shuffle_window existed: it shuffled within "
                         f"{LEGACY_WINDOW_CHUNKS} chunks; give --shuffle-window {LEGACY_WINDOW_CHUNKS} x the cache's "
                         f"chunk_sequences to resume it while its cache {cache_dir or '(none)'} has no manifest")
    return LEGACY_WINDOW_CHUNKS * manifest.chunk_sequences


def check_against_cache(start: Start, cfg: Config, manifest: Manifest) -> None:
    """The checkpoint resumed, and the validation cache, fit the training cache (seq_len, tokenizer)."""
    if start.ckpt:
        try:
            problem = ck.compatibility_error(Path(start.ckpt), manifest)
        except ck.CheckpointError as e:
            problem = str(e)
        if problem:
            raise TrainError(problem)
    for d in cfg.data.cache_dir[1:]:  # the other caches, those that exist now (the trainer checks the rest)
        try:
            m = load_manifest(d)
        except ManifestError as e:
            raise TrainError(f"cache {d}: {e}") from None
        if m is not None and (problem := caches_differ(manifest, d, m)):
            raise TrainError(problem)
    if cfg.eval.every:
        check_validation_cache(cfg, manifest)


def _cache_now(cfg: Config, console: Console) -> Cache | None:
    """The cache if it has a manifest now; None when it has none yet and data.wait is on (the trainer's
    ranks wait for it together, after the process group exists, so a signal stops them all)."""
    if not cfg.data.wait:
        return wait_for_cache(cfg, console)  # fails at once
    try:
        return open_cache(cfg.data.cache_dir[0])
    except CacheError:
        return None


def prepare(config_file: str | None, overrides: dict, new: str | None, resume: str | None,
            console: Console) -> tuple[Start, object] | None:
    """(the run's Start, the run's lock, held until the trainer ends), or None on a rank other than 0: it
    gets rank 0's Start in the trainer (a second rank probing the lock could make rank 0's acquisition fail).

    Everything that can fail on bad input is checked before the lock is taken, so that fails writing nothing."""
    if os.environ.get("RANK", "0") != "0":
        return None
    cfg = _config(config_file, overrides)
    fault_hook()
    if mixed_precision_asked(cfg.train.mixed_precision) == "fp16":  # torch loads only to check fp16
        import torch
        resolve_mixed_precision("fp16", torch.cuda.is_available())
    if not cfg.data.cache_dir and not resume:
        raise TrainError(CACHE_REQUIRED)
    # without --new or --resume the run's name is suggested from the cache, so it is needed first
    cache = None if new or resume else wait_for_cache(cfg, console)
    interactive = os.environ.get("WORLD_SIZE", "1") == "1" and sys.stdin.isatty() and sys.stdout.isatty()
    suggested = suggest_name(cfg, cache.manifest.sources, cache.seq_len) if cache else ""
    run_dir = cfg.train.run_dir
    start = decide_start(run_dir, new, resume, suggested, interactive)
    if start.ckpt:
        cfg = _resumed_config(start, run_dir, config_file, overrides)
        if not cfg.data.cache_dir:
            raise TrainError(CACHE_REQUIRED)
    check_kernels_asked(cfg)
    if cache is None or Path(cfg.data.cache_dir[0]) != cache.dir:
        cache = _cache_now(cfg, console)
    if cache is not None:  # else every rank waits for it in the trainer, and rank 0 checks it then
        check_against_cache(start, cfg, cache.manifest)
        start.checked = True
    rd = RunDir(run_dir)
    lock = rd.lock_run(start.run)
    start.line = rd.next_line(start.run)
    for line in rd.remove_unfinished_saves(start.run):
        console.message(line)
    start.config = cfg.to_dict()
    return start, lock
