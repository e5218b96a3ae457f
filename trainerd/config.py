"""The trainer's typed configuration: one dataclass per TOML section, every field documented.

    [model]      architecture: a preset and the knobs that override it
    [data]       the cache, the packer's endpoint, epochs
    [train]      batch, optimizer, precision, run folder
    [schedule]   learning-rate schedule
    [checkpoint] how often and how many
    [log]        status line, JSON lines, trackers

Precedence, stated once: command-line flags > the TOML file (`--config`) > these defaults.
`python -m trainerd --help-config` prints every field with its default and help.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from shared.config import ConfigError, build, describe, load_toml, merge, opt, to_dict
from shared.protocol import DEFAULT_ENDPOINT

from .follow import curve_problem

PRESETS = ("tiny", "124m", "415m")


@dataclass
class ModelConfig:
    preset: Literal["tiny", "124m", "415m"] = opt("tiny", "Architecture preset: tiny (tests, CPU), 124m or 415m.")
    hidden_size: int | None = opt(None, "Width of the residual stream; default from the preset.")
    num_layers: int | None = opt(None, "Transformer blocks; default from the preset.")
    num_heads: int | None = opt(None, "Query heads; default from the preset.")
    num_kv_heads: int | None = opt(None, "Key/value heads (grouped-query attention); must divide num_heads.")
    intermediate_size: int | None = opt(None, "SwiGLU hidden width; default from the preset.")
    rope_theta: float = opt(10000.0, "RoPE base frequency.")
    init_std: float = opt(0.02, "Standard deviation of the initial weights.")
    flash_attention: bool | None = opt(None, "Use flash-attention varlen kernels: true, false, or unset = when "
                                             "flash_attn is installed and CUDA is used. Otherwise SDPA.")

    def validate(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"model.{name} must be at least 1 (got {v})")
        if self.init_std <= 0:
            raise ConfigError(f"model.init_std must be positive (got {self.init_std})")


@dataclass
class DataConfig:
    cache_dir: str = opt("", "Folder of the chunk cache written by packerd (required).")
    endpoint: str = opt(DEFAULT_ENDPOINT, "ZeroMQ endpoint where packerd announces chunks.")
    curve_dir: str = opt("", "Folder with server.key, client.key and client.key_secret from `packerd keys DIR`, "
                             "for an endpoint packerd runs with --curve-dir (encrypted, only key holders hear it; "
                             "without keys the trainer follows by re-reading the manifest alone). Empty: no CURVE.")
    target_epochs: float = opt(1.0, "Passes over the data (fractions allowed, e.g. 1.5).")
    epoch_fraction: float = opt(1.0, "Fraction of the dataset that makes one epoch (0 < f <= 1): each epoch takes "
                                     "that share of every chunk, a new random sample each epoch.")
    wait: bool = opt(True, "Wait for a missing or empty cache to appear (false: fail at once, --no-wait).")
    wait_seconds: float = opt(0.0, "With wait: give up after this many seconds (0 = wait forever).")
    reconcile_seconds: float = opt(2.0, "Re-read the manifest this often, so a lost notification loses nothing.")
    prefetch: int = opt(4, "Optimizer steps of batches prepared ahead in the background.")

    def validate(self) -> None:
        if self.target_epochs <= 0:
            raise ConfigError(f"data.target_epochs must be positive (got {self.target_epochs})")
        if not 0 < self.epoch_fraction <= 1:
            raise ConfigError(f"data.epoch_fraction must be in (0, 1] (got {self.epoch_fraction})")
        if not self.endpoint.startswith(("tcp://", "ipc://")):
            raise ConfigError(f"data.endpoint must start with tcp:// or ipc:// (got {self.endpoint!r})")
        if self.curve_dir and (problem := curve_problem(self.curve_dir)):
            raise ConfigError(f"data.curve_dir: {problem}")
        if self.reconcile_seconds <= 0:
            raise ConfigError(f"data.reconcile_seconds must be positive (got {self.reconcile_seconds})")
        if self.prefetch < 1:
            raise ConfigError(f"data.prefetch must be at least 1 (got {self.prefetch})")
        if self.wait_seconds < 0:
            raise ConfigError(f"data.wait_seconds must be 0 or more (got {self.wait_seconds})")


@dataclass
class TrainConfig:
    run_dir: str = opt("runs", "Folder of checkpoints, logs and run records (RUN_DIR).")
    micro_batch_size: int = opt(8, "Sequences per forward pass on each rank.")
    grad_accum: int = opt(1, "Micro-batches per optimizer step.")
    lr: float = opt(6e-4, "Peak learning rate.")
    weight_decay: float = opt(0.1, "AdamW weight decay (not applied to norms).")
    beta1: float = opt(0.9, "AdamW beta1.")
    beta2: float = opt(0.95, "AdamW beta2.")
    eps: float = opt(1e-8, "AdamW epsilon.")
    grad_clip: float = opt(1.0, "Clip the gradient norm to this value (0 = off).")
    max_steps: int | None = opt(None, "Stop after this many optimizer steps (unset: when the data is done).")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = opt(
        "auto", "auto: accelerate launch's --mixed_precision bf16/fp16 if given, else bf16 autocast on CUDA, fp32 on the CPU; "
        "or no, bf16, fp16 (fp16: CUDA only).")
    compile: bool = opt(False, "torch.compile the model (checkpoints stay uncompiled).")
    seed: int = opt(1337, "Seed of the weights and of the data order.")
    deterministic: bool = opt(False, "torch.use_deterministic_algorithms(True): bitwise-repeatable on the CPU.")
    threads: int = opt(0, "CPU threads per process (0: torch's default).")

    def validate(self) -> None:
        for name in ("micro_batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1 (got {getattr(self, name)})")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive (got {self.lr})")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be at least 1 (got {self.max_steps})")
        if self.grad_clip < 0:
            raise ConfigError(f"train.grad_clip must be 0 or more (got {self.grad_clip})")
        for name in ("weight_decay", "eps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be 0 or more (got {getattr(self, name)})")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be in [0, 1) (got {getattr(self, name)})")
        if self.threads < 0:
            raise ConfigError(f"train.threads must be 0 or more (got {self.threads})")
        if not self.run_dir:
            raise ConfigError("train.run_dir must not be empty")


@dataclass
class ScheduleConfig:
    kind: Literal["wsd", "cosine"] = opt("wsd", "wsd: warmup, constant, 1-sqrt decay; cosine: over the current estimate.")
    warmup_fraction: float = opt(0.025, "Warmup as a fraction of the steps of the FULL dataset estimate.")
    warmup_steps: int | None = opt(None, "Fixed warmup steps instead of warmup_fraction.")
    decay_fraction: float = opt(0.2, "wsd: the last fraction of the planned steps that decays.")
    decay_tokens: int | None = opt(None, "wsd: token budget at which the decay starts even if the size is unknown.")
    min_lr_fraction: float = opt(0.1, "The final learning rate as a fraction of train.lr.")

    def validate(self) -> None:
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"schedule.warmup_fraction must be in [0, 1) (got {self.warmup_fraction})")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps must be 0 or more (got {self.warmup_steps})")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"schedule.decay_fraction must be in (0, 1] (got {self.decay_fraction})")
        if self.decay_tokens is not None and self.decay_tokens < 1:
            raise ConfigError(f"schedule.decay_tokens must be positive (got {self.decay_tokens})")
        if not 0 <= self.min_lr_fraction <= 1:
            raise ConfigError(f"schedule.min_lr_fraction must be in [0, 1] (got {self.min_lr_fraction})")


@dataclass
class CheckpointConfig:
    every: int = opt(1000, "Save a checkpoint every this many optimizer steps (0 = only at the end and on a signal).")
    keep: int = opt(3, "Keep the newest N checkpoints of this run, the most recently saved (0 = keep all).")

    def validate(self) -> None:
        if self.every < 0:
            raise ConfigError(f"checkpoint.every must be 0 or more (got {self.every})")
        if self.keep < 0:
            raise ConfigError(f"checkpoint.keep must be 0 or more (got {self.keep})")


@dataclass
class LogConfig:
    every: int = opt(10, "When the output is not a terminal: print a status line every this many steps.")
    log_with: str | None = opt(None, "Accelerate tracker(s), e.g. tensorboard (needs it installed).")
    level: Literal["debug", "info", "warning"] = opt("info", "Logging level of the trainer's own messages.")
    data_trace: bool = opt(False, "Each rank also logs the (chunk, index) of every sequence it trains on, per step, "
                                  "to training_logs/<run>_run_<k>.rank<r>.data.jsonl (audits order and disjointness).")

    def validate(self) -> None:
        if self.every < 1:
            raise ConfigError(f"log.every must be at least 1 (got {self.every})")
        if self.log_with:
            # Accelerator skips a known tracker whose package is missing without a word: refuse it here
            from accelerate.tracking import get_available_trackers
            from accelerate.utils import LoggerType
            known = [t.value for t in LoggerType]
            installed = sorted(str(getattr(t, "value", t)) for t in get_available_trackers())
            for name in (n.strip() for n in self.log_with.split(",")):
                if name not in known:
                    raise ConfigError(f"log.log_with: unknown tracker {name!r} (known: {', '.join(known)})")
                if name != "all" and name not in installed:
                    raise ConfigError(f"log.log_with: tracker {name!r} is not installed in this environment "
                                      f"(installed: {', '.join(installed) or 'none'})")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> None:
        m = self.model
        if m.num_heads and m.num_kv_heads and m.num_heads % m.num_kv_heads:
            raise ConfigError(f"model.num_kv_heads ({m.num_kv_heads}) must divide model.num_heads ({m.num_heads})")
        if m.hidden_size and m.num_heads and m.hidden_size % m.num_heads:
            raise ConfigError(f"model.hidden_size ({m.hidden_size}) must be a multiple of model.num_heads ({m.num_heads})")

    def to_dict(self) -> dict:
        return to_dict(self)


def load_config(path: str | None = None, overrides: dict | None = None, base: dict | None = None) -> Config:
    """Defaults < `base` (a saved config, on resume) < the TOML file < `overrides` (dotted keys, None = unset)."""
    data = dict(base or {})
    if path:
        data = merge(data, _flatten(load_toml(path)))
    data = merge(data, overrides or {})
    cfg = build(Config, data)
    return cfg


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def help_text() -> str:
    rows = describe(Config)
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {default!r:<12}  {help}" for name, default, help in rows)


__all__ = ["Config", "ConfigError", "ModelConfig", "DataConfig", "TrainConfig", "ScheduleConfig",
           "CheckpointConfig", "LogConfig", "load_config", "help_text", "PRESETS"]
