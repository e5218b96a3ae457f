"""trainerd's training loop: one file that reads top to bottom.

    trainerd --cache-dir cache/ --run-dir runs/ --model tiny --new tiny_pydoc_64          # one process
    accelerate launch -m trainerd --config run.toml                                       # one GPU
    accelerate launch --multi_gpu --num_processes 2 -m trainerd --config run.toml         # 2 GPUs, or 2 CPU ranks
    trainerd --run-dir runs/ --resume latest                                              # go on where it stopped

What happens, in order: decide which run (new, resume, or the checkpoint menu on a terminal), take the
run's lock, open the cache (waiting for it unless --no-wait), build the model and optimizer (and load a
checkpoint), then loop over optimizer steps. At every step boundary rank 0 tells all ranks how many
chunks the cache holds and whether it is finished (one small collective), so every rank grows its data
plan at the same step. The loop waits when it has caught up with the packer, saves a checkpoint every
N steps, on SIGINT/SIGTERM (then exits 0) and at the end, and ends when the cache is finished and the
plan done, or at --max-steps.

Decisions where the issue leaves a choice:
- Without --new/--resume and not on a terminal (or with several processes): resume the newest
  checkpoint of the suggested run name (like `tiny_pydoc_64`) if it has one, else start that run new.
  Re-running the same command after a crash so goes on where it stopped.
- --new NAME of a run that already has checkpoints is refused (use --resume NAME).
- The loss is the mean over all real target tokens of the optimizer step, across micro-batches and ranks
  (each rank's summed loss is divided by the global target count), so accumulation and world size do
  not change its meaning.
- Fault hooks for the fault tests, from the environment: TRAINERD_FAULT=kill-at-step:N (SIGKILL itself
  right after step N is logged), kill-in-save:N (SIGKILL in the middle of writing the checkpoint of step N)
  or read-error-at-step:N (the last rank alone fails to read its batch of step N, as a chunk read can).
"""
from __future__ import annotations

import errno
import gc
import json
import logging
import math
import os
import re
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import click
import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, gather_object

from shared.cache import CacheError, open_cache
from shared.config import ConfigError
from shared.fsutil import LockHeld, atomic_write_bytes
from shared.manifest import ManifestError, load_manifest

from . import checkpoint as ck
from .config import Config, _flatten, load_config
from .data import DataPlan, Prefetcher
from .follow import CacheFollower
from .model import (build_model, flash_attn_available, flops_per_token, model_from_config_dict, num_params,
                    param_groups, varlen_kwargs)
from .schedule import LRSchedule


LOGS_DIR = "training_logs"
RUNS_DIR = "runs"
LOCKS_DIR = ck.LOCKS_DIR

# bf16 dense peak FLOP/s by device name, for MFU
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
              "A10G": 125e12, "4090": 165e12, "3090": 71e12}


class TrainError(click.ClickException):
    """A user error: one line, non-zero exit."""


class _Stop:
    """The signal that asked the trainer to stop (None while none has)."""

    def __init__(self):
        self.sig = None

    def handler(self, signum, frame):
        if self.sig is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once, without saving
        self.sig = signum


STOP = _Stop()


# ---------------------------------------------------------------------------------------------------------
# run names and the start decision
# ---------------------------------------------------------------------------------------------------------
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


def check_run_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+=-]{0,99}", name) or ".." in name:
        raise TrainError(f"run name {name!r} must be letters, digits and _ . + = - (at most 100, no '..')")
    return name


@dataclass
class Start:
    mode: str                 # "new" or "resume"
    run: str
    run_id: str
    ckpt: str | None = None   # checkpoint folder when resuming
    log_k: int = 1            # this process writes training_logs/<run>_run_<log_k>.jsonl


def interactive_menu(run_dir: str, suggested: str) -> Start:
    """The checkpoint menu of the seed: pick a checkpoint, start new, or manage checkpoints."""
    while True:
        metas = list(reversed(ck.list_checkpoints(run_dir)))  # newest first
        click.echo(f"Checkpoints in {ck.ckpt_root(run_dir)}:")
        if not metas:
            click.echo("  (none)")
        for i, m in enumerate(metas, 1):
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.get("time", 0)))
            loss = m.get("loss")
            click.echo(f"  {i}. {m['name']}  step {m['step']:,}  loss {loss:.3f}  {when}" if loss is not None
                       else f"  {i}. {m['name']}  step {m['step']:,}  {when}")
        click.echo("  N. Start New Training")
        click.echo("  X. Checkpoint Management")
        answer = click.prompt("Choice", default="1" if metas else "N").strip().upper()
        if answer == "X":
            try:
                from . import admin
                menu = getattr(admin, "menu", None)
            except ImportError:
                menu = None
            if menu is None:
                click.echo("checkpoint management is unavailable (trainerd.admin.menu is missing)")
            else:
                menu(run_dir)
            continue
        if answer == "N":
            taken = {m.get("run") for m in ck.list_checkpoints(run_dir)}
            options = [suggested] + [f"{suggested}_{k}" for k in range(2, 6)]
            free = [o for o in options if o not in taken]
            click.echo("Name suggestions: " + ", ".join(free[:3]))
            name = check_run_name(click.prompt("Run name", default=free[0] if free else suggested).strip())
            if name in taken:
                click.echo(f"run {name} already has checkpoints; pick it from the list to resume it")
                continue
            return Start("new", name, uuid.uuid4().hex[:12])
        if answer.isdigit() and 1 <= int(answer) <= len(metas):
            m = metas[int(answer) - 1]
            return Start("resume", m["run"], m.get("run_id") or uuid.uuid4().hex[:12], m["path"])
        click.echo(f"{answer!r} is not a choice")


def decide_start(run_dir: str, new: str | None, resume: str | None, suggested: str, interactive: bool) -> Start:
    if new and resume:
        raise TrainError("use either --new NAME or --resume latest|NAME, not both")
    if resume:
        try:
            m = ck.find_checkpoint(run_dir, resume)
        except ck.CheckpointError as e:
            raise TrainError(str(e)) from None
        return Start("resume", m["run"], m.get("run_id") or uuid.uuid4().hex[:12], m["path"])
    if new:
        check_run_name(new)
        if ck.list_checkpoints(run_dir, run=new):
            raise TrainError(f"run {new} already has checkpoints in {ck.ckpt_root(run_dir)}: "
                             f"use --resume {new}, or another name")
        return Start("new", new, uuid.uuid4().hex[:12])
    if interactive:
        return interactive_menu(run_dir, suggested)
    mine = ck.list_checkpoints(run_dir, run=suggested)
    if mine:
        m = mine[-1]  # the most recently saved
        return Start("resume", m["run"], m.get("run_id") or uuid.uuid4().hex[:12], m["path"])
    return Start("new", suggested, uuid.uuid4().hex[:12])


# ---------------------------------------------------------------------------------------------------------
# output: the status line and the JSON-lines log (rank 0 only)
# ---------------------------------------------------------------------------------------------------------
def fmt_eta(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "--:--h"
    m = int(seconds // 60)
    return f"{m // 60:02d}:{m % 60:02d}h"


def status_line(step: int, total: int, loss: float | None, tokens_per_s: float | None, mfu: float | None,
                eta_s: float | None) -> str:
    """`Step 770/26,235 ( 2.9%) | Loss 5.583 | 106,212 tok/s | ETA 04:23h`, with `| MFU 41.2%` on a GPU
    (`Loss -` for a step without a target)."""
    line = f"Step {step:,}/{total:,} ({100 * step / max(total, 1):4.1f}%) | "
    line += f"Loss {loss:.3f} | " if loss is not None else "Loss - | "
    line += f"{tokens_per_s:,.0f} tok/s" if tokens_per_s else "- tok/s"
    if mfu is not None:
        line += f" | MFU {100 * mfu:.1f}%"
    return line + f" | ETA {fmt_eta(eta_s)}"


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

    @staticmethod
    def next_index(run_dir: str, run: str) -> int:
        """k of this trainer process: one more than the highest log of the run (call holding the run lock)."""
        folder = Path(run_dir) / LOGS_DIR
        ks = [int(m.group(1)) for p in folder.glob(f"{run}_run_*.jsonl")  # run names hold no glob characters
              if (m := re.fullmatch(re.escape(run) + r"_run_(\d+)\.jsonl", p.name))]
        return max(ks, default=0) + 1

    def write(self, record: dict) -> None:
        """One record per line; the file is opened for appending and line-buffered."""
        if self.f is not None:
            try:
                self.f.write(json.dumps(record, separators=(",", ":")) + "\n")
            except OSError as e:
                raise self._failed(e) from None

    def event(self, kind: str, /, **fields) -> None:
        self.write({"event": kind, "time": round(time.time(), 3), **fields})

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


# ---------------------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------------------
def resolve_mixed_precision(asked: str, cuda: bool) -> str:
    """no, bf16 or fp16. auto: bf16 or fp16 when `accelerate launch --mixed_precision` (or its config file)
    asked for it, else bf16 where CUDA has it, else no. accelerate launch sets "no" when it was not asked
    (ACCELERATE_MIXED_PRECISION is always set), so fp32 on CUDA takes trainerd's own --mixed-precision no."""
    mixed = asked
    if mixed == "auto":
        launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if launched not in ("no", "bf16", "fp16"):
            raise TrainError(f"accelerate's mixed precision {launched!r} is not supported here (no, bf16, fp16)")
        mixed = launched if launched != "no" else ("bf16" if cuda and torch.cuda.is_bf16_supported() else "no")
    if mixed == "fp16" and not cuda:
        # Accelerate would skip fp16 on the CPU and silently train in fp32
        raise TrainError("train.mixed_precision fp16 needs CUDA; on the CPU use bf16 or no")
    return mixed


def run(config_file: str | None, overrides: dict, new: str | None = None, resume: str | None = None) -> int:
    """Train; returns the exit status. Every rank of an `accelerate launch` runs this."""
    # -- config, a first pass: enough to find the run folder and the cache ------------------------------
    try:
        cfg = load_config(config_file, overrides)
    except ConfigError as e:
        raise TrainError(str(e)) from None
    logging.basicConfig(level=cfg.log.level.upper(), format="%(asctime)s trainerd %(levelname)s %(message)s",
                        datefmt="%Y-%m-%dT%H:%M:%S")
    cuda = torch.cuda.is_available()
    resolve_mixed_precision(cfg.train.mixed_precision, cuda)  # fail before anything is written
    state = PartialState(cpu=not cuda)  # the process group, before the run (and so the config) is known
    world, main = state.num_processes, state.is_main_process
    console = Console(main, cfg.log.every)
    # SIGINT/SIGTERM only set a flag: the loop saves at the next step boundary and exits 0
    old_handlers = {s: signal.signal(s, STOP.handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def fail(msg: str):
        raise TrainError(msg) if main else SystemExit(1)

    # -- which run: rank 0 decides (menu on a terminal), every rank follows -------------------------------
    run_dir = cfg.train.run_dir
    decision: list = [None]
    lock = None
    if main:
        try:
            if not cfg.data.cache_dir and not resume:
                raise TrainError("data.cache_dir is required (--cache-dir)")
            if cfg.data.cache_dir and (not cfg.data.wait or not (new or resume)):
                # fail before anything is written; and a suggested run name needs the cache's manifest
                _open_cache(cfg, console, fail)
            sources, seq_len = _peek_cache(cfg.data.cache_dir)
            interactive = world == 1 and sys.stdin.isatty() and sys.stdout.isatty()
            for line in ck.restore_interrupted_resaves(run_dir):
                console.message(line)  # before deciding: a checkpoint away from its place is passed over
            start = decide_start(run_dir, new, resume, suggest_name(cfg, sources, seq_len), interactive)
            lock = ck.acquire_run_lock(run_dir, start.run)
            start.log_k = JsonlLog.next_index(run_dir, start.run)
            saved = None
            if start.ckpt:  # a resumed run starts from its saved config; the file and flags still win
                ck.check_files(Path(start.ckpt), ck.read_meta(Path(start.ckpt)) or {})
                saved = ck.read_json(Path(start.ckpt), "config.json")
                saved.setdefault("train", {})["run_dir"] = run_dir
            decision[0] = {"start": start.__dict__, "saved": saved}
        except LockHeld:
            decision[0] = {"error": f"another trainer is running run {start.run} ({run_dir}/{LOCKS_DIR}/{start.run}.lock is held)"}
        except (TrainError, ck.CheckpointError, OSError) as e:
            decision[0] = {"error": e.format_message() if isinstance(e, TrainError) else str(e)}
    if world > 1:
        broadcast_object_list(decision, from_process=0)
    if "error" in decision[0]:
        fail(decision[0]["error"])
    start = Start(**decision[0]["start"])

    try:
        if decision[0]["saved"] is not None:
            try:
                cfg = load_config(config_file, overrides, base=decision[0]["saved"])
            except ConfigError as e:
                fail(f"checkpoint {Path(start.ckpt).name}: {e}")
        # -- the process: threads, determinism, precision -------------------------------------------------
        if cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        mixed = resolve_mixed_precision(cfg.train.mixed_precision, cuda)
        # bf16 autocast is ours (around the forward only): Accelerate's would also convert the logits to
        # fp32 inside the forward, a copy of [batch, seq_len, vocab] per micro-batch. fp16 needs its scaler.
        accelerator = Accelerator(cpu=not cuda, mixed_precision="fp16" if mixed == "fp16" else "no",
                                  log_with=[t.strip() for t in cfg.log.log_with.split(",")] if cfg.log.log_with else None,
                                  project_dir=run_dir)
        return _train(cfg, start, accelerator, console, mixed)
    finally:
        if lock is not None:
            lock.release()
        for s, h in old_handlers.items():
            signal.signal(s, h)


def _open_cache(cfg: Config, console: Console, fail):
    """The cache, waiting for its manifest to appear unless data.wait is off."""
    waited_since = time.monotonic()
    while True:
        try:
            cache = open_cache(cfg.data.cache_dir)
            if not cache.chunks and not cfg.data.wait:
                fail(f"cache {cfg.data.cache_dir} has no chunks yet (without --no-wait the trainer waits)")
            return cache
        except CacheError as e:
            if not cfg.data.wait:
                fail(f"{e} (without --no-wait the trainer waits for it)")
            if cfg.data.wait_seconds and time.monotonic() - waited_since > cfg.data.wait_seconds:
                fail(f"{e}: gave up after {cfg.data.wait_seconds:g} s")
            if STOP.sig is not None:  # stopped before anything was trained: nothing to save
                console.message(f"stopped by signal {STOP.sig} while waiting for the cache")
                raise SystemExit(0)
            console.waiting(f"waiting for the cache {cfg.data.cache_dir}: {e}")
            time.sleep(0.5)


def _peek_cache(cache_dir: str) -> tuple[list[str], int]:
    """Sources and seq_len of the cache, for the run-name suggestion (empty when it has no manifest yet)."""
    try:
        m = load_manifest(cache_dir) if cache_dir else None
    except ManifestError:
        m = None
    return (m.sources, m.seq_len) if m is not None else ([], 0)


def _train(cfg: Config, start: Start, accelerator, console: Console, mixed: str) -> int:
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    main = accelerator.is_main_process
    cuda = device.type == "cuda"
    run_dir = cfg.train.run_dir
    ckpt_dir = Path(start.ckpt) if start.ckpt else None

    def fail(msg: str, alone: bool = False):
        """Rank 0 raises the one-line error. `alone`: this rank may have met it alone (a chunk read, a
        manifest that lags), so another rank says it too, or it would show only as broken collectives."""
        if main:
            raise TrainError(msg)
        if alone:
            click.echo(f"Error (rank {rank}): {msg}", err=True)
        raise SystemExit(1)

    if not cfg.data.cache_dir:
        fail("data.cache_dir is required (--cache-dir)")

    # -- the cache: wait for it to appear unless told not to -----------------------------------------------
    cache = _open_cache(cfg, console, fail)
    tok = dict(cache.manifest.tokenizer)
    if ckpt_dir is not None:
        try:
            problem = ck.compatibility_error(ckpt_dir, cache.manifest)
        except ck.CheckpointError as e:
            problem = str(e)
        if problem:
            fail(problem)

    # -- model and optimizer ------------------------------------------------------------------------------
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    use_flash = cfg.model.flash_attention
    if use_flash is None:
        use_flash = cuda and flash_attn_available()
    elif use_flash and not (cuda and flash_attn_available()):
        fail("model.flash_attention is on but flash_attn is not installed or CUDA is not available")
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    try:
        if ckpt_dir is not None:
            raw_model = model_from_config_dict(ck.read_json(ckpt_dir, "model_config.json"), use_flash)
            # every rank loads the full weights before accelerator.prepare; FSDP2's fully_shard then keeps
            # each rank's shards of these values, so one path serves every launch mode
            ck.load_weights(ckpt_dir, raw_model)
        else:
            raw_model = build_model(cfg.model, int(tok["vocab_size"]), cache.seq_len, int(tok["eos_id"]), use_flash)
    except (ck.CheckpointError, ConfigError) as e:
        fail(str(e))
    if raw_model.config.vocab_size < int(tok["vocab_size"]):
        fail(f"the model's vocabulary ({raw_model.config.vocab_size}) is smaller than the tokenizer's ({tok['vocab_size']})")
    n_params = num_params(raw_model)
    flops_tok = flops_per_token(raw_model.config, n_params, cache.seq_len)
    raw_model.to(device)
    optimizer = torch.optim.AdamW(param_groups(raw_model, cfg.train.weight_decay), lr=cfg.train.lr,
                                  betas=(cfg.train.beta1, cfg.train.beta2), eps=cfg.train.eps,
                                  **({"fused": True} if cuda else {}))
    model = torch.compile(raw_model) if cfg.train.compile else raw_model
    model, optimizer = accelerator.prepare(model, optimizer)
    # FSDP2 shards raw_model in place (its parameters become DTensor shards): saving then gathers the full
    # state on every rank, and the optimizer state is loaded shard by shard
    sharded = ck.is_sharded(raw_model)

    # -- data plan, schedule and the saved state ----------------------------------------------------------
    mb, accum = cfg.train.micro_batch_size, cfg.train.grad_accum
    global_batch = mb * accum * world
    # every rank starts from no chunks and grows to rank 0's count at the first step boundary, so ranks
    # that opened the cache at different moments agree
    try:
        plan = DataPlan(cache, seed=cfg.train.seed, global_batch=global_batch, rank=rank, world_size=world,
                        target_epochs=cfg.data.target_epochs, epoch_fraction=cfg.data.epoch_fraction,
                        known_chunks=0, finished=False)
    except ValueError as e:
        fail(str(e))
    sched = LRSchedule(cfg.schedule, cfg.train.lr, cfg.train.max_steps, tokens_per_step=global_batch * cache.seq_len)
    step, tokens_done, elapsed_before = 0, 0, 0.0
    last_loss = None
    if ckpt_dir is not None:
        try:
            state = ck.load_torch(ckpt_dir, "state.pt")
            ck.load_optimizer(ckpt_dir, raw_model, optimizer)  # moved to the parameters' device
            sched.load_state_dict(state["schedule"])
            plan.load_state_dict(state["data"])
        except (ck.CheckpointError, KeyError, ValueError, CacheError) as e:
            fail(f"cannot resume from {ckpt_dir.name}: {e}")
        step, tokens_done = int(state["step"]), int(state["tokens"])
        elapsed_before = float(state.get("elapsed_s", 0.0))
        last_loss = state.get("loss")
        rngs = state["rng"]
        ck.set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])

    # -- run records: the run file, the log, trackers -----------------------------------------------------
    logs = Path(run_dir) / LOGS_DIR
    jsonl = JsonlLog(logs / f"{start.run}_run_{start.log_k}.jsonl" if main else None)
    # optional data trace, every rank: which sequences it trained on at each step (audits order and disjointness)
    trace = JsonlLog(logs / f"{start.run}_run_{start.log_k}.rank{rank}.data.jsonl" if cfg.log.data_trace else None)
    if main:
        for line in ck.remove_stale_temporaries(run_dir, start.run):
            console.message(line)
        if start.mode == "new":
            rec = {"run": start.run, "run_id": start.run_id, "created": time.time(), "config": cfg.to_dict()}
            (Path(run_dir) / RUNS_DIR).mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(Path(run_dir) / RUNS_DIR / f"{start.run}.json", json.dumps(rec, indent=2).encode())
        jsonl.event("started", run=start.run, run_id=start.run_id, mode=start.mode, step=step, world_size=world,
                    device=str(device), mixed_precision=mixed, params=n_params,
                    global_batch=global_batch, seq_len=cache.seq_len, flash_attention=bool(use_flash),
                    compile=cfg.train.compile, config=cfg.to_dict())
        if ckpt_dir is not None:
            later = [m["name"] for m in ck.list_checkpoints(run_dir, run=start.run) if m["step"] > step]
            jsonl.event("resumed", step=step, checkpoint=ckpt_dir.name, tokens=tokens_done, later_checkpoints=later)
            console.message(f"resumed {start.run} from {ckpt_dir.name} (step {step:,})")
            if later:
                # the kept checkpoints are the most recently saved: this line's saves push the old line's out
                fate = (f"checkpoint.keep = {cfg.checkpoint.keep} keeps the most recently saved, so those and "
                        f"{ckpt_dir.name} are the first to go as this run saves" if cfg.checkpoint.keep
                        else "none is pruned (checkpoint.keep = 0)")
                console.message(f"warning: {start.run} has {len(later)} checkpoint(s) past step {step:,} "
                                f"({later[-1]} the last saved); this run's saves now count as its newest, {fate}")
        else:
            console.message(f"new run {start.run} ({start.run_id}): {cfg.model.preset}, {n_params:,} parameters, "
                            f"global batch {global_batch} x {cache.seq_len} tokens, {world} process(es) on {device}")
        console.message(f"logging to {jsonl.path}")
        if cfg.log.log_with:
            accelerator.init_trackers(start.run, config=_flat(cfg.to_dict()))

    fault_kind, fault_step = _fault()
    follower, follow_error = None, None  # rank 0 follows; its error stops every rank at the next step boundary
    if main:
        try:
            follower = CacheFollower(cfg.data.cache_dir, cfg.data.endpoint, cfg.data.reconcile_seconds,
                                     curve_dir=cfg.data.curve_dir or None)
        except CacheError as e:
            follow_error = str(e)
    prefetch = Prefetcher(plan, depth=cfg.data.prefetch, pin_memory=cuda, start=step)


    # -- checkpoint: RNG states of every rank are gathered; rank 0 writes ---------------------------------
    t_start = time.monotonic()
    saved_step = step  # nothing new to save before the first step of this process

    def save(reason: str) -> None:
        nonlocal saved_step
        if step == saved_step:
            return
        rngs = gather_object([ck.rng_state()]) if world > 1 else [ck.rng_state()]
        # sharded: gathering the full weights and optimizer state is a collective, so every rank takes
        # part; rank 0 receives them (on the CPU) and writes. Unsharded: rank 0 saves its own copy.
        full_weights, full_optim = ck.gather_full_state(raw_model, optimizer) if sharded else (None, None)
        if main:
            t0 = time.monotonic()
            name = ck.ckpt_name(start.run, step)
            elapsed = elapsed_before + time.monotonic() - t_start
            state = {"step": step, "tokens": tokens_done, "loss": last_loss, "elapsed_s": elapsed,
                     "world_size": world, "schedule": sched.state_dict(), "data": plan.state_dict(), "rng": rngs,
                     "run": start.run, "run_id": start.run_id}
            meta = {"run": start.run, "run_id": start.run_id, "step": step, "loss": last_loss, "tokens": tokens_done,
                    "time": time.time(), "elapsed_s": round(elapsed, 3), "world_size": world,
                    "model": cfg.model.preset, "params": n_params}
            try:
                path = ck.save_checkpoint(run_dir, name, model=raw_model, weights=full_weights,
                                          optimizer_state=full_optim if sharded else optimizer.state_dict(),
                                          state=state, meta=meta, config=cfg.to_dict(),
                                          model_config=raw_model.config.to_dict(), tokenizer=tok,
                                          kill_after_weights=(fault_kind == "kill-in-save" and step == fault_step))
            except (OSError, RuntimeError) as e:  # disk full surfaces as OSError, or RuntimeError from torch.save
                errno_ = getattr(e, "errno", None)
                what = "disk full" if errno_ == 28 or "No space" in str(e) or "unexpected pos" in str(e) else \
                    (str(e).strip().splitlines() or [type(e).__name__])[0]
                try:
                    jsonl.event("checkpoint_failed", step=step, name=name, error=what)
                except TrainError:
                    pass  # the log lives on the same full disk
                raise click.ClickException(f"cannot save checkpoint {name} in {run_dir}: {what}; "
                                           f"the previous checkpoint is intact") from None
            pruned = ck.prune(run_dir, start.run, cfg.checkpoint.keep, keep_name=name)
            dt = time.monotonic() - t0
            jsonl.event("checkpoint_saved", step=step, name=name, reason=reason, seconds=round(dt, 3), pruned=pruned)
            console.message(f"saved checkpoint {path} ({reason}, {dt:.1f} s)")
        saved_step = step
        if world > 1:
            accelerator.wait_for_everyone()

    # -- the training loop --------------------------------------------------------------------------------
    # everything built so far (model, optimizer, torch's modules) lives for the whole run: move it out of the
    # garbage collector's view, whose full passes over torch's objects otherwise pause a step for ~0.2 s
    gc.freeze()
    known, finished, est_seen = -1, False, -1  # what the plan was last grown with
    notify_ms = None                 # the slowest notification (commit to receipt) since the last growth
    waiting_since = None
    t_prev = None
    rate_ema = None                  # optimizer steps per second, for the ETA
    corrupt_logged: set[int] = set()  # chunk ids whose corrupt_chunk event is in the log
    status = "done"
    try:
        while True:
            # sync the plan: rank 0's view of the cache, and any rank's stop signal, at a step boundary
            # corrupt chunks this rank met since the last step (found by its prefetch thread)
            data_events = [dict(ev, rank=accelerator.process_index) for ev in plan.take_events()]
            # chunks, finished, stop, estimate, rank 0 failed, some rank has data events
            view = [0, 0, int(STOP.sig is not None), 0, 0, int(bool(data_events))]
            if main and follow_error is None:
                try:
                    fs = follower.poll(200 if waiting_since is not None else 0)
                except CacheError as e:  # e.g. the cache was rebuilt under the run: every rank stops below
                    follow_error = str(e)
                else:
                    view[0], view[1], view[3] = fs.known_chunks, int(fs.finished), fs.est_total_sequences
                    for ev in fs.events:
                        if ev.get("latency_ms") is not None:
                            notify_ms = ev["latency_ms"] if notify_ms is None else max(notify_ms, ev["latency_ms"])
                        kind = ev.pop("event")
                        jsonl.event("cache_finished" if kind == "finished" else kind, step=step, **ev)
            view[4] = int(follow_error is not None)
            if world > 1:
                t = torch.tensor(view, dtype=torch.int64, device=device)
                torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
                view = t.tolist()  # note: a host sync point, once per optimizer step
            if view[4]:
                fail(f"cannot follow the cache: {follow_error}")
            new_known, new_finished, stop, est = view[0], bool(view[1]), bool(view[2]), view[3]
            if (new_known, new_finished, est) != (known, finished, est_seen):
                before = plan.total_steps
                try:
                    plan.grow(new_known, new_finished, step, est_total_sequences=est)
                except (ValueError, CacheError) as e:
                    fail(f"cannot follow the cache: {e}", alone=True)
                est_seen = est
                if main and (new_known, new_finished) != (known, finished):
                    jsonl.event("plan_expanded" if known >= 0 else "plan", step=step, chunks=new_known,
                                previous_chunks=max(known, 0), finished=new_finished, total_steps=plan.total_steps,
                                previous_total_steps=before, estimated_total_steps=plan.estimated_total_steps,
                                latency_ms=_commit_latency_ms(cache, new_known) if known >= 0 else None,
                                notify_latency_ms=notify_ms)
                notify_ms = None
                known, finished = new_known, new_finished
            if view[5]:  # corrupt chunks: skipped loudly, quarantined, never trained on; rank 0 logs every rank's
                if world > 1:
                    every: list = [None] * world
                    torch.distributed.all_gather_object(every, data_events)
                    # the rank that quarantined a chunk first: another one may only have found its file gone
                    data_events = sorted((ev for evs in every for ev in evs), key=lambda ev: ev.get("quarantined") is None)
                for ev in data_events:
                    if main and ev["chunk_id"] not in corrupt_logged:  # another rank may meet it again, quarantined
                        corrupt_logged.add(ev["chunk_id"])
                        jsonl.event(ev.pop("event"), step=step, **ev)
            for note in sched.update(step, plan.total_steps, plan.estimated_total_steps, plan.finished):
                if main:
                    console.message(f"warning: {note}")
                    jsonl.event("warning", step=step, message=note)

            # termination conditions
            if stop:
                status = "stopped"
                break
            if cfg.train.max_steps and step >= cfg.train.max_steps:
                break
            if plan.finished and step >= plan.total_steps:
                break
            if not plan.ready(step):
                if waiting_since is None:
                    waiting_since = time.monotonic()
                    if main:
                        jsonl.event("waiting", step=step, chunks=known, total_steps=plan.total_steps)
                if main:
                    console.waiting(f"Step {step:,}/{plan.total_steps:,} | waiting for data ({known:,} chunks in the "
                                    f"cache, {time.monotonic() - waiting_since:.0f} s)")
                t_prev = None
                continue
            if waiting_since is not None:
                if main:
                    jsonl.event("waited", step=step, seconds=round(time.monotonic() - waiting_since, 3))
                waiting_since = None

            # one optimizer step: grad_accum micro-batches of this rank's share of global step `step`
            try:
                if fault_kind == "read-error-at-step" and step + 1 == fault_step and rank == world - 1:
                    raise CacheError(f"fault hook: rank {rank} cannot read its batch of step {step + 1}")
                batch = prefetch.get(step)
            except CacheError as e:  # a chunk read found the cache rebuilt (or every chunk corrupt)
                fail(f"cannot follow the cache: {e}", alone=True)
            trace.write({"step": step, "seq_ids": batch.seq_ids})
            input_ids, position_ids, labels = batch.to(device, non_blocking=True)
            counts = torch.tensor([batch.num_targets, batch.num_tokens], dtype=torch.float64, device=device)
            if world > 1:
                torch.distributed.all_reduce(counts)
            n_targets = counts[0].clamp(min=1)
            scale = (world / n_targets).to(torch.float32)
            lr = sched.lr(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), dtype=torch.float32, device=device)
            # a global batch of padding rows only (every row from corrupt chunks): no optimizer step, which
            # would still move the weights (momentum, weight decay). Only a rank without a target of its
            # own asks for the global count (a host sync, rare); a rank with one knows it is not empty.
            empty = batch.num_targets == 0 and int(counts[0].item()) == 0
            for micro in range(0 if empty else accum):
                rows = slice(micro * mb, (micro + 1) * mb)
                kwargs = {}
                if use_flash:
                    ids, pos = input_ids[rows].reshape(1, -1), position_ids[rows].reshape(1, -1)
                    kwargs = varlen_kwargs(batch.position_ids[rows])
                    kwargs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kwargs.items()}
                else:
                    ids, pos = input_ids[rows], position_ids[rows]
                sync = micro == accum - 1
                ctx = accelerator.no_sync(model) if (not sync and world > 1) else _nullcontext()
                with ctx:
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed == "bf16"):
                        logits = model(input_ids=ids, position_ids=pos, use_cache=False, **kwargs).logits
                    logits = logits.view(-1, cache.seq_len, logits.shape[-1])  # [mb, L, V] (flash: from [1, mb*L, V])
                    tgt = labels[rows][:, 1:]
                    summed = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1),
                                             ignore_index=-100, reduction="sum")
                    # each rank's sum over the global target count, times world: DDP's mean makes it the global mean
                    accelerator.backward(summed * scale)
                loss_sum += summed.detach()
            if empty:
                if main:
                    jsonl.event("empty_step", step=step + 1, message="every row of this global batch came from "
                                "corrupt chunks: no optimizer step")
                loss = None  # nothing was trained on: the step's record says so (null), last_loss stays
            else:
                if cfg.train.grad_clip:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if world > 1:
                    torch.distributed.all_reduce(loss_sum)
                loss = (loss_sum / n_targets).item()  # note: a host sync point; the step's kernels are done after it
            if cuda:
                torch.cuda.synchronize()
            step += 1
            step_tokens = int(counts[1].item())
            tokens_done += step_tokens
            if loss is not None:
                last_loss = loss

            # log: whole optimizer steps, real tokens only
            now = time.perf_counter()
            dt = (now - t_prev) if t_prev is not None else None
            t_prev = now
            tps = step_tokens / dt if dt else None
            if dt:
                rate_ema = 1 / dt if rate_ema is None else 0.9 * rate_ema + 0.1 / dt
            if main:
                total = _shown_total(cfg, plan, sched)
                jsonl.write({"step": step, "loss": loss, "lr": lr, "tokens": tokens_done,
                             "step_tokens": step_tokens, "tokens_per_s": round(tps, 1) if tps else None,
                             "step_s": round(dt, 6) if dt else None, "total_steps": total})
                peak = _peak_flops(device)
                mfu = flops_tok * tps / (peak * world) if peak and tps else None
                console.status(status_line(step, total, loss, tps, mfu, (total - step) / rate_ema if rate_ema else None), step)
                if cfg.log.log_with:
                    accelerator.log({"lr": lr, "tokens_per_s": tps or 0.0, **({"loss": loss} if loss is not None else {})},
                                    step=step)
            if fault_kind == "kill-at-step" and step == fault_step:
                os.kill(os.getpid(), signal.SIGKILL)

            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                save("every")
        # the end: save what was trained
        save("signal" if status == "stopped" else "end")
        weights = _weights_digest(raw_model)
        digests = gather_object([weights]) if world > 1 else [weights]
        if main:
            console.close()
            wall = time.monotonic() - t_start
            jsonl.event("finished" if status == "done" else "stopped", step=step, tokens=tokens_done, seconds=round(wall, 3),
                        data_wait_s=round(prefetch.waited_seconds, 3), weights_xxh64=digests,
                        signal=STOP.sig)
            what = "stopped by signal" if status == "stopped" else "done"
            console.message(f"{what}: step {step:,}, {tokens_done:,} tokens, loss {last_loss if last_loss is not None else float('nan'):.3f}; "
                            f"checkpoints in {ck.ckpt_root(run_dir)}; resume with --resume {start.run}")
        jsonl.close()  # a last flush that fails is reported here; the finally below stays quiet
        trace.close()
    finally:
        console.close()
        prefetch.close()
        if follower is not None:
            follower.close()
        jsonl.close(quiet=True)
        trace.close(quiet=True)
        if cfg.log.log_with and main:
            accelerator.end_training()
    return 0


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _fault() -> tuple[str | None, int | None]:
    spec = os.environ.get("TRAINERD_FAULT", "")
    if not spec:
        return None, None
    kind, _, n = spec.partition(":")
    if kind not in ("kill-at-step", "kill-in-save", "read-error-at-step") or not n.isdigit():
        raise TrainError(f"TRAINERD_FAULT={spec!r}: expected kill-at-step:N, kill-in-save:N or read-error-at-step:N")
    return kind, int(n)


def _shown_total(cfg: Config, plan, sched) -> int:
    total = plan.total_steps if plan.finished else max(plan.total_steps, plan.estimated_total_steps)
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps) if total else cfg.train.max_steps
    return int(total)


def _commit_latency_ms(cache, known: int) -> float | None:
    """From the commit of the newest known chunk (manifest time) to now, when the plan has grown."""
    try:
        entry = cache.chunks[known - 1]
    except (IndexError, AttributeError, TypeError):
        return None
    return round((time.time() - entry.committed_at) * 1000, 2)


def _peak_flops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = _device_name(device)
    for key, flops in PEAK_FLOPS.items():
        if key in name:
            return flops
    return None


_names: dict = {}


def _device_name(device) -> str:
    if device not in _names:
        _names[device] = torch.cuda.get_device_name(device)
    return _names[device]


def _weights_digest(model) -> str:
    """xxh64 of this rank's weights: the whole model, or under FSDP2 this rank's shards (no collective)."""
    import xxhash
    from torch.distributed.tensor import DTensor
    h = xxhash.xxh64()
    for name, t in sorted(model.state_dict().items()):
        if isinstance(t, DTensor):
            t = t.to_local()
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _flat(d: dict) -> dict:
    """The config as dotted keys with scalar values: what trackers accept as hyperparameters."""
    return {k: v for k, v in _flatten(d).items() if isinstance(v, (int, float, str, bool))}
