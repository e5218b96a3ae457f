"""trainerd's training loop: `run()`, and `loop()` over named steps, read top to bottom.

    trainerd --cache-dir cache/ --run-dir runs/ --model tiny --new tiny_pydoc_64          # one process
    accelerate launch -m trainerd --config run.toml                                       # one GPU
    accelerate launch --multi_gpu --num_processes 2 -m trainerd --config run.toml         # 2 GPUs, or 2 CPU ranks
    trainerd --run-dir runs/ --resume latest                                              # go on where it stopped

What happens, in order: trainerd/start.py decides the run on the main process before torch loads (and
holds its lock); `run()` hands that decision to every rank, and the Trainer opens the cache, builds the
model and optimizer and loads the checkpoint. Then `loop()`: at every step boundary every rank grows its
data plan to rank 0's view of the cache (one small collective); it waits when it has caught up with the
packer, evaluates and saves every N steps, saves on SIGINT/SIGTERM (then exits 0) and at the end, and
ends when the cache is finished and the plan done, or at --max-steps.

- The loss is the mean over all real target tokens of the optimizer step, across micro-batches and ranks
  (each rank's summed loss is divided by the global target count): accumulation and world size keep it.
- The fault tests' hooks (TRAINERD_FAULT, see start.fault_hook) kill the process at a step or in a save,
  or fail one rank's batch read.
"""
from __future__ import annotations

import gc
import logging
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, gather_object

from shared.cache import CacheError
from shared.config import ConfigError

from . import checkpoint as ck
from .config import Config, load_config
from .data import Prefetcher
from .evaluate import Evaluator
from .follow import PlanSync
from .mix import SourceLosses, make_plan, reduce_step, resolve_endpoints
from .model import (build, checkpoint_activations, flops_per_token, num_params, param_groups, peak_flops, set_up_torch,
                    summed_loss, weights_digest)
from .output import Console, JsonlLog, end_line, eval_line, resumed_lines, shown_total, status_line
from .rundir import RunDir, TrainError
from .schedule import LRSchedule
from .start import STOP, Start, check_against_cache, fault_hook, resolve_mixed_precision, wait_for_caches


@dataclass
class TrainState:
    """The loop's own position: what a checkpoint's state.pt holds besides the schedule, the data and RNG."""
    step: int = 0                 # optimizer steps done
    tokens: int = 0               # real tokens trained on
    loss: float | None = None     # the last step's loss that had a target
    elapsed_s: float = 0.0        # training time of the earlier processes of this run

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, d: dict) -> None:
        self.step, self.tokens = int(d["step"]), int(d["tokens"])
        self.loss, self.elapsed_s = d.get("loss"), float(d.get("elapsed_s", 0.0))


def run(start: Start | None, lock=None) -> int:
    """Train; returns the exit status. Every rank of an `accelerate launch` runs this; `start` is rank 0's
    decision (None on the other ranks, which receive it here). The caller has routed SIGINT/SIGTERM to STOP
    (start.catch_stop_signals); `lock`, the run's, is released at the end."""
    try:
        cuda = torch.cuda.is_available()
        process = PartialState(cpu=not cuda)  # the process group, before the config (rank 0's) is known
        decision = [asdict(start) if start is not None else None]
        if process.num_processes > 1:
            broadcast_object_list(decision, from_process=0)
        start = Start(**decision[0])
        try:
            cfg = load_config(None, {}, base=start.config)
        except ConfigError as e:
            raise TrainError(str(e)) from None
        logging.basicConfig(level=cfg.log.level.upper(), format="%(asctime)s trainerd %(levelname)s %(message)s",
                            datefmt="%Y-%m-%dT%H:%M:%S")
        set_up_torch(cfg.train, cuda)
        mixed = resolve_mixed_precision(cfg.train.mixed_precision, cuda)
        # bf16 autocast is ours (around the forward only): Accelerate's would also convert the logits to
        # fp32 inside the forward, a copy of [batch, seq_len, vocab] per micro-batch. fp16 needs its scaler.
        accelerator = Accelerator(cpu=not cuda, mixed_precision="fp16" if mixed == "fp16" else "no",
                                  log_with=[t.strip() for t in cfg.log.log_with.split(",")] if cfg.log.log_with else None,
                                  project_dir=cfg.train.run_dir)
        trainer = Trainer(cfg, start, accelerator, mixed)
        try:
            trainer.finish(loop(trainer))
        finally:
            trainer.close()
        return 0
    finally:
        if lock is not None:
            lock.release()


def loop(t: "Trainer") -> str:
    """Optimizer steps until the plan is done, --max-steps, or a stop signal; returns "done" or "stopped"."""
    # everything built so far (model, optimizer, torch's modules) lives for the whole run: move it out of the
    # garbage collector's view, whose full passes over torch's objects otherwise pause a step for ~0.2 s
    gc.freeze()
    while True:
        stop = t.agree_on_plan()
        # termination conditions
        if stop:
            return "stopped"
        if t.cfg.train.max_steps and t.state.step >= t.cfg.train.max_steps:
            return "done"
        if t.plan.finished and t.state.step >= t.plan.total_steps:
            return "done"
        if not t.plan.ready(t.state.step):
            t.wait_for_data()
            continue
        t.waited()
        loss, tokens = t.train_step()
        t.log_step(loss, tokens)
        if t.fault == ("kill-at-step", t.state.step):
            os.kill(os.getpid(), signal.SIGKILL)
        if t.cfg.eval.every and t.state.step % t.cfg.eval.every == 0:
            t.evaluate()
        if t.cfg.checkpoint.every and t.state.step % t.cfg.checkpoint.every == 0:
            t.save("every")


class Trainer:
    """The parts of one training process and the named steps of the loop."""

    def __init__(self, cfg: Config, start: Start, accelerator: Accelerator, mixed: str):
        self.cfg, self.start, self.accelerator, self.mixed = cfg, start, accelerator, mixed
        self.rank, self.world, self.device = accelerator.process_index, accelerator.num_processes, accelerator.device
        self.main = accelerator.is_main_process
        self.rd = RunDir(cfg.train.run_dir)
        self.console = Console(self.main, cfg.log.every)
        self.fault = fault_hook()
        self.caches = wait_for_caches(cfg, self.console, self.fail)
        self.cache = self.caches[0]  # the model's tokenizer and seq_len (every cache shares them)
        if self.main and not start.checked:  # the cache appeared only now
            check_against_cache(start, cfg, self.cache.manifest)
        self.state = TrainState()
        self.build_model()
        self.build_data()
        if start.ckpt:
            self.load(Path(start.ckpt))
        self.open_records()
        self.sync = PlanSync(self.plan, cfg.data, resolve_endpoints(cfg.data, self.caches),
                             rank=self.rank, world=self.world, device=self.device, log=self.jsonl, fail=self.fail)
        self.evaluator = Evaluator(cfg, self.cache, rank=self.rank, world=self.world, device=self.device,
                                   mixed=mixed, attention=self.attention, fail=self.fail) if cfg.eval.every else None
        self.val: dict | None = None  # the last evaluation: step, val_loss, val_sequences, val_tokens
        self.prefetch = Prefetcher(self.plan, depth=cfg.data.prefetch, pin_memory=self.device.type == "cuda",
                                   start=self.state.step)
        self.t_start, self.saved_step = time.monotonic(), self.state.step  # nothing to save before a step
        self.waiting_since = None
        self.t_prev, self.rate_ema = None, None   # the last step's end; optimizer steps per second, for the ETA

    def fail(self, msg: str, alone: bool = False):
        """Rank 0 raises the one-line error. `alone`: this rank may have met it alone (a chunk read, a
        manifest that lags), so another rank says it too, or it would show only as broken collectives."""
        if self.main:
            raise TrainError(msg)
        if alone:
            click.echo(f"Error (rank {self.rank}): {msg}", err=True)
        raise SystemExit(1)

    # -- set-up -------------------------------------------------------------------------------------
    def build_model(self) -> None:
        cfg, cuda = self.cfg, self.device.type == "cuda"
        tok = self.cache.manifest.tokenizer
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        try:
            # every rank loads the full weights before accelerator.prepare; FSDP2's fully_shard then keeps
            # each rank's shards of these values, so one path serves every launch mode
            self.raw_model, self.attention = build(cfg.model, tok, self.cache.seq_len, cuda,
                                                   Path(self.start.ckpt) if self.start.ckpt else None)
        except (ck.CheckpointError, ConfigError) as e:
            self.fail(str(e))
        if cfg.train.activation_checkpointing:
            checkpoint_activations(self.raw_model)
        self.n_params = num_params(self.raw_model)
        self.flops_tok = flops_per_token(self.raw_model.config, self.n_params, self.cache.seq_len)
        self.raw_model.to(self.device)
        t = cfg.train
        optimizer = torch.optim.AdamW(param_groups(self.raw_model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                                      eps=t.eps, **({"fused": True} if cuda else {}))
        model = torch.compile(self.raw_model) if t.compile else self.raw_model
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        # FSDP2 shards raw_model in place (its parameters become DTensor shards): saving then gathers the full
        # state on every rank, and the optimizer state is loaded shard by shard
        self.sharded = ck.is_sharded(self.raw_model)
        # evaluation calls the model inside DDP (no gradient, no reducer); a sharded one as prepared
        self.eval_model = self.model if self.sharded else model

    def build_data(self) -> None:
        cfg = self.cfg
        self.global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * self.world
        try:
            self.plan = make_plan(self.caches, cfg, global_batch=self.global_batch, rank=self.rank, world_size=self.world)
        except ValueError as e:
            self.fail(str(e))
        self.mix = SourceLosses(self.plan, self.device) if len(self.caches) > 1 else None  # each cache's share, loss
        self.sched = LRSchedule(cfg.schedule, cfg.train.lr, cfg.train.max_steps,
                                tokens_per_step=self.global_batch * self.cache.seq_len)

    def stateful(self) -> dict:
        """The parts a checkpoint's state.pt holds, each with state_dict/load_state_dict."""
        return {"train": self.state, "schedule": self.sched, "data": self.plan}

    def load(self, folder: Path) -> None:
        try:
            saved = ck.load_torch(folder, "state.pt")
            ck.load_optimizer(folder, self.raw_model, self.optimizer)  # moved to the parameters' device
            for key, part in self.stateful().items():
                part.load_state_dict(saved if key == "train" else saved[key])
            rngs = saved["rng"]  # one per rank; ranks beyond the saved ones take rank 0's
            ck.set_rng_state(rngs[self.rank] if self.rank < len(rngs) else rngs[0])
        except (ck.CheckpointError, KeyError, ValueError, CacheError) as e:
            self.fail(f"cannot resume from {folder.name}: {e}")

    def open_records(self) -> None:
        """The run's record, the JSON-lines log (rank 0), the optional data trace (every rank), trackers."""
        cfg, start, rd = self.cfg, self.start, self.rd
        self.jsonl = JsonlLog(rd.log_path(start.run, start.line) if self.main else None)
        self.trace = JsonlLog(rd.trace_path(start.run, start.line, self.rank) if cfg.log.data_trace else None)
        if not self.main:
            return
        if start.mode == "new":
            rd.write_record(start.run, start.run_id, cfg.to_dict())
        self.jsonl.event("started", run=start.run, run_id=start.run_id, mode=start.mode, step=self.state.step,
                         world_size=self.world, device=str(self.device), mixed_precision=self.mixed,
                         params=self.n_params, global_batch=self.global_batch, seq_len=self.cache.seq_len,
                         attention=self.attention, loss=cfg.train.loss, compile=cfg.train.compile, config=cfg.to_dict())
        if start.ckpt:
            name, later = Path(start.ckpt).name, self.rd.later(start.run, self.state.step)
            self.jsonl.event("resumed", step=self.state.step, checkpoint=name, tokens=self.state.tokens,
                             later_checkpoints=later)
            for line in resumed_lines(start.run, name, self.state.step, later, cfg.checkpoint.keep):
                self.console.message(line)
        else:
            self.console.message(f"new run {start.run} ({start.run_id}): {cfg.model.preset}, {self.n_params:,} "
                                 f"parameters, global batch {self.global_batch} x {self.cache.seq_len} tokens, "
                                 f"{self.world} process(es) on {self.device}")
        self.console.message(f"logging to {self.jsonl.path}")
        if cfg.log.log_with:
            self.accelerator.init_trackers(start.run, config=cfg.hyperparameters())

    # -- agree on the plan ----------------------------------------------------------------------------
    def agree_on_plan(self) -> bool:
        """Every rank grows its plan to rank 0's view of the cache (one collective), then the schedule takes
        it in. Returns whether some rank was asked to stop."""
        step = self.state.step
        stop = self.sync.agree(step, STOP.sig is not None, waiting=self.waiting_since is not None)
        for note in self.sched.update(step, self.plan.total_steps, self.plan.estimated_total_steps, self.plan.finished):
            if self.main:
                self.console.message(f"warning: {note}")
                self.jsonl.event("warning", step=step, message=note)
        return stop

    def wait_for_data(self) -> None:
        step = self.state.step
        if self.waiting_since is None:
            self.waiting_since = time.monotonic()
            if self.main:
                self.jsonl.event("waiting", step=step, chunks=self.sync.known, total_steps=self.plan.total_steps)
        if self.main:
            which = (f" of {', '.join(str(self.caches[i].dir) for i in self.plan.waiting_for(step))}" if self.mix else "")
            self.console.waiting(f"Step {step:,}/{self.plan.total_steps:,} | waiting for data{which} ({self.sync.known:,} "
                                 f"chunks known, {time.monotonic() - self.waiting_since:.0f} s)")
        self.t_prev = None

    def waited(self) -> None:
        if self.waiting_since is not None and self.main:
            self.jsonl.event("waited", step=self.state.step, seconds=round(time.monotonic() - self.waiting_since, 3))
        self.waiting_since = None

    # -- train one optimizer step -----------------------------------------------------------------------
    def train_step(self) -> tuple[float | None, int]:
        """grad_accum micro-batches of this rank's share of the next global batch, then the optimizer step.
        Returns the step's loss (None when the global batch held no target) and its real tokens."""
        step, world, device = self.state.step, self.world, self.device
        try:
            if self.fault == ("read-error-at-step", step + 1) and self.rank == world - 1:
                raise CacheError(f"fault hook: rank {self.rank} cannot read its batch of step {step + 1}")
            batch = self.prefetch.get(step)
        except CacheError as e:  # a chunk read found the cache rebuilt (or every chunk corrupt)
            self.fail(f"cannot follow the cache: {e}", alone=True)
        self.trace.write({"step": step, "seq_ids": batch.seq_ids})
        if self.mix:
            self.mix.begin(batch)
        counts = torch.tensor([batch.num_targets, batch.num_tokens], dtype=torch.float64, device=device)
        if world > 1:
            torch.distributed.all_reduce(counts)
        n_targets = counts[0].clamp(min=1)
        self.lr = self.sched.lr(step)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        # a global batch of padding rows only (every row from corrupt chunks): no optimizer step, which
        # would still move the weights (momentum, weight decay). Only a rank without a target of its
        # own asks for the global count (a host sync, rare); a rank with one knows it is not empty.
        if batch.num_targets == 0 and int(counts[0].item()) == 0:
            if self.main:
                self.jsonl.event("empty_step", step=step + 1, message="every row of this global batch came from "
                                 "corrupt chunks: no optimizer step")
            return None, int(counts[1].item())
        loss_sum = self.forward_backward(batch, scale=(world / n_targets).to(torch.float32))
        if self.cfg.train.grad_clip:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, self.by_source = reduce_step(loss_sum, world, self.mix, step)  # one all_reduce
        return (loss_sum / n_targets).item(), int(counts[1].item())  # note: a host sync point

    def forward_backward(self, batch, scale: torch.Tensor) -> torch.Tensor:
        """The summed loss of this rank's micro-batches; each one's gradient is scaled by world / global
        targets, so DDP's mean over ranks makes it the gradient of the global mean."""
        t = self.cfg.train
        input_ids, position_ids, labels = batch.to(self.device, non_blocking=True)
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        for micro in range(t.grad_accum):
            rows = slice(micro * t.micro_batch_size, (micro + 1) * t.micro_batch_size)
            last = micro == t.grad_accum - 1
            with self.accelerator.no_sync(self.model) if (not last and self.world > 1) else nullcontext():
                out = summed_loss(self.model, input_ids[rows], position_ids[rows], labels[rows], attention=self.attention,
                                  mixed=self.mixed, loss=t.loss, loss_chunk=t.loss_chunk,
                                  host_pos=batch.position_ids[rows], per_row=bool(self.mix))
                summed = self.mix.add(rows, *out) if self.mix else out  # several caches: the loss per cache too
                self.accelerator.backward(summed * scale)
            loss_sum += summed.detach()
        return loss_sum

    # -- log ------------------------------------------------------------------------------------------
    def log_step(self, loss: float | None, step_tokens: int) -> None:
        """Whole optimizer steps, real tokens only."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        s = self.state
        s.step += 1
        s.tokens += step_tokens
        s.loss = loss if loss is not None else s.loss
        now = time.perf_counter()
        dt = (now - self.t_prev) if self.t_prev is not None else None
        self.t_prev = now
        tps = step_tokens / dt if dt else None
        if dt:
            self.rate_ema = 1 / dt if self.rate_ema is None else 0.9 * self.rate_ema + 0.1 / dt
        if not self.main:
            return
        total = shown_total(self.plan, self.cfg.train.max_steps)
        self.jsonl.write({"step": s.step, "loss": loss, "lr": self.lr, "tokens": s.tokens, "step_tokens": step_tokens,
                          "tokens_per_s": round(tps, 1) if tps else None, "step_s": round(dt, 6) if dt else None,
                          "total_steps": total, "plan_steps": self.plan.total_steps,
                          **(self.by_source if loss is not None else {})})
        peak = peak_flops(self.device)
        mfu = self.flops_tok * tps / (peak * self.world) if peak and tps else None
        eta = (total - s.step) / self.rate_ema if self.rate_ema else None
        val = self.val["val_loss"] if self.val else None
        self.console.status(status_line(s.step, total, loss, tps, mfu, eta, val), s.step)
        if self.cfg.log.log_with:
            self.accelerator.log({"lr": self.lr, "tokens_per_s": tps or 0.0,
                                  **({"loss": loss} if loss is not None else {})}, step=s.step)

    # -- evaluate -------------------------------------------------------------------------------------
    def evaluate(self) -> None:
        """The held-out loss with the weights after this optimizer step: the weights its checkpoint holds."""
        t0 = time.perf_counter()
        self.val = {"step": self.state.step, **self.evaluator.evaluate(self.eval_model)}
        self.t_prev = None  # the next step's time and tokens/s do not include the evaluation
        if self.main:
            self.jsonl.event("eval", **self.val, seconds=round(time.perf_counter() - t0, 3))
            self.console.message(eval_line(self.val, self.cfg.eval.sequences))
            if self.cfg.log.log_with and self.val["val_loss"] is not None:
                self.accelerator.log({"val_loss": self.val["val_loss"]}, step=self.state.step)

    # -- save -----------------------------------------------------------------------------------------
    def save(self, reason: str) -> None:
        """RNG states of every rank are gathered; rank 0 writes (sharded: every rank gathers the state)."""
        s = self.state
        if s.step == self.saved_step:
            return
        rngs = gather_object([ck.rng_state()]) if self.world > 1 else [ck.rng_state()]
        # sharded: gathering the full weights and optimizer state is a collective, so every rank takes
        # part; rank 0 receives them (on the CPU) and writes. Unsharded: rank 0 saves its own copy.
        weights, optim = ck.gather_full_state(self.raw_model, self.optimizer) if self.sharded else (None, None)
        if self.main:
            self.write_checkpoint(reason, rngs, weights, optim if self.sharded else self.optimizer.state_dict())
        self.saved_step = s.step
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def write_checkpoint(self, reason: str, rngs: list, weights: dict | None, optim: dict) -> None:
        s, start, t0 = self.state, self.start, time.monotonic()
        name = self.rd.save_name(start.run, s.step, start.line)
        elapsed = s.elapsed_s + time.monotonic() - self.t_start
        state = {**{k: part.state_dict() for k, part in self.stateful().items() if k != "train"},
                 **s.state_dict(), "elapsed_s": elapsed, "world_size": self.world, "rng": rngs,
                 "run": start.run, "run_id": start.run_id}
        meta = {"run": start.run, "run_id": start.run_id, "step": s.step, "loss": s.loss, "tokens": s.tokens,
                "time": time.time(), "elapsed_s": round(elapsed, 3), "world_size": self.world,
                "model": self.cfg.model.preset, "params": self.n_params,
                **({"val_loss": self.val["val_loss"], "val_step": self.val["step"]} if self.val else {})}
        try:
            path = ck.save_checkpoint(self.rd.path, name, model=self.raw_model, weights=weights, optimizer_state=optim,
                                      state=state, meta=meta, config=self.cfg.to_dict(),
                                      model_config=self.raw_model.config.to_dict(),
                                      tokenizer=dict(self.cache.manifest.tokenizer),
                                      kill_after_weights=self.fault == ("kill-in-save", s.step))
        except (OSError, RuntimeError) as e:
            what = ck.save_failure(e)
            self.jsonl.event("checkpoint_failed", step=s.step, name=name, error=what, quiet=True)  # same full disk
            raise TrainError(f"cannot save checkpoint {name} in {self.rd.path}: {what}; "
                             f"the previous checkpoint is intact") from None
        pruned = self.rd.prune(start.run, self.cfg.checkpoint.keep, keep_name=name)
        dt = time.monotonic() - t0
        self.jsonl.event("checkpoint_saved", step=s.step, name=name, reason=reason, seconds=round(dt, 3), pruned=pruned)
        self.console.message(f"saved checkpoint {path} ({reason}, {dt:.1f} s)")

    # -- the end --------------------------------------------------------------------------------------
    def finish(self, status: str) -> None:
        """Evaluate and save what was trained, and say where it is."""
        if status == "done" and self.evaluator is not None and (self.val or {}).get("step") != self.state.step:
            self.evaluate()
        self.save("signal" if status == "stopped" else "end")
        weights = weights_digest(self.raw_model)
        digests = gather_object([weights]) if self.world > 1 else [weights]
        s = self.state
        if self.main:
            self.console.close()
            self.jsonl.event("finished" if status == "done" else "stopped", step=s.step, tokens=s.tokens,
                             seconds=round(time.monotonic() - self.t_start, 3), weights_xxh64=digests,
                             data_wait_s=round(self.prefetch.waited_seconds, 3), signal=STOP.sig)
            self.console.message(end_line(status, s.step, s.tokens, s.loss, self.rd.checkpoints_dir, self.start.run))
        self.jsonl.close()  # a last flush that fails is reported here; close() below stays quiet
        self.trace.close()

    def close(self) -> None:
        self.console.close()
        self.prefetch.close()
        self.sync.close()
        self.jsonl.close(quiet=True)
        self.trace.close(quiet=True)
        if self.cfg.log.log_with and self.main:
            self.accelerator.end_training()
