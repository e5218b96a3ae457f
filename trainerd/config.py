"""The trainer's typed configuration: one dataclass per TOML section, every field documented.

    [model]      architecture: a preset and the knobs that override it
    [data]       the cache, the packer's endpoint, epochs
    [train]      batch, optimizer, precision, run folder
    [schedule]   learning-rate schedule
    [checkpoint] how often and how many
    [log]        status line, JSON lines, trackers
    [eval]       held-out loss: how often, on how many sequences, of which cache

Precedence, stated once: command-line flags > the TOML file (`--config`) > these defaults.
A field's `flag=` is its trainerd command-line flag: `cli_options` puts those on the click command and
`cli_overrides` maps their values back to the fields.
`python -m trainerd --help-config` prints every field with its default and help.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from shared.config import (ConfigError, build, click_options, describe, flag_overrides, flags, load_toml, merge, opt,
                           to_dict)
from shared.protocol import DEFAULT_ENDPOINT

from .follow import curve_problem
from .schedule import KINDS as SCHEDULE_KINDS


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int


# The architecture presets: model.preset's choices, --model (trainerd and packtrain), --help-config and
# trainerd.model read this table. head_dim 64 in 124m and 415m, named by their parameter counts with the GPT-2
# vocabulary (50,304 after padding).
PRESETS: dict[str, Preset] = {
    "tiny": Preset(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=192),
    "124m": Preset(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4, intermediate_size=2304),
    "415m": Preset(hidden_size=1024, num_layers=30, num_heads=16, num_kv_heads=4, intermediate_size=3072),
    # sized for consumer cards: weights, gradients and AdamW's two moments in fp32 take 16 bytes per parameter,
    # 10.2 GiB for 680m (a 16 GB card) and 16.0 GiB for 1b (a 24 GB card), activations on top (see
    # train.activation_checkpointing)
    "680m": Preset(hidden_size=1536, num_layers=24, num_heads=24, num_kv_heads=8, intermediate_size=4096),
    "1b": Preset(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_size=8192),
}

# model.attention's choices: how attention keeps to each document of a packed row (trainerd.model uses them)
ATTENTIONS = {
    "auto": "flash when flash_attn is installed and CUDA is used, else flex on CUDA with Triton, else sdpa",
    "sdpa": "torch SDPA with the block-diagonal mask transformers builds from position_ids (dense: off the "
            "flash kernel)",
    "flex": "FlexAttention (compiled) with a block mask of the documents; CUDA only (it has no CPU backward)",
    "flash": "flash-attn's varlen kernel with the document boundaries (needs flash_attn and CUDA)",
}

# train.loss's choices: how the next-token loss is computed from the last hidden states
LOSSES = {
    "full": "the logits of the whole micro-batch, then cross-entropy",
    "chunked": "the logits of train.loss_chunk positions at a time, with their gradient computed in the forward "
               "pass: the full logits never exist",
    "liger": "Liger-Kernel's fused linear cross-entropy (needs liger-kernel and CUDA)",
}


def _preset_help() -> str:
    sizes = ", ".join(f"{name} ({p.hidden_size} wide, {p.num_layers} layers, {p.num_heads}/{p.num_kv_heads} heads)"
                      for name, p in PRESETS.items())
    return f"Architecture preset: {sizes}; each size field of [model] that is set overrides its value."


@dataclass
class ModelConfig:
    preset: str = opt("tiny", _preset_help(), flag="--model", choices=tuple(PRESETS))
    hidden_size: int | None = opt(None, "Width of the residual stream; default from the preset.",
                                  flag="--hidden-size", check="at least 1")
    num_layers: int | None = opt(None, "Transformer blocks; default from the preset.", flag="--layers",
                                 check="at least 1")
    num_heads: int | None = opt(None, "Attention (query) heads; default from the preset.", flag="--heads",
                                check="at least 1")
    num_kv_heads: int | None = opt(None, "Key/value heads (grouped-query attention), must divide num_heads; "
                                         "default from the preset.", flag="--kv-heads", check="at least 1")
    intermediate_size: int | None = opt(None, "SwiGLU hidden width; default from the preset.", check="at least 1")
    rope_theta: float = opt(10000.0, "RoPE base frequency.")
    init_std: float = opt(0.02, "Standard deviation of the initial weights.", check="positive")
    attention: str = opt("auto", "Attention kernel, each keeping to the documents of a packed row: " + "; ".join(
        f"{k}: {v}" for k, v in ATTENTIONS.items()) + ".", flag="--attention", choices=tuple(ATTENTIONS))
    flash_attention: bool | None = opt(None, "The older switch: true is attention = flash, false is attention = sdpa "
                                             "(when attention is auto).", flag="--flash-attention")
    liger_kernels: bool = opt(False, "Liger-Kernel's RMSNorm, SwiGLU and RoPE kernels (needs liger-kernel and "
                                     "CUDA); the weights and checkpoints are the same.", flag="--liger-kernels")


# The default shuffle window, in sequences: each batch draws from at least this many sequences' worth of chunks.
# The old 4-chunk window (128 sequences on 32-sequence chunks) measured 4.1% higher loss than a global shuffle:
# a batch held rows of 4 to 8 chunks, i.e. of a few neighbouring documents. 2^16 sequences is 64 chunks of
# packerd's default 1024 sequences and 2,048 chunks of 32, so a batch draws from 64 chunks or more. The cost
# is memory, per rank: its 1/W share of a window (2^16 x seq_len x 2 bytes / W: 128 MiB at seq_len 1024 on
# one rank, as uint16) times the windows kept (3), and one window's decompression at a time in the prefetch
# thread (every chunk is still decoded once per epoch). In a growing cache the trainer begins each block of
# new chunks once it holds a whole window (the first blocks 1, 2, 4, ... chunks, and never more than the
# estimate says are coming: trainerd/data.py, Growth), so a trainer that keeps up with its packer still draws
# each batch from a whole window.
SHUFFLE_WINDOW = 1 << 16
LEGACY_WINDOW_CHUNKS = 4   # the window, in chunks, of the checkpoints saved before data.shuffle_window existed


@dataclass
class DataConfig:
    cache_dir: list[str] = opt([], "Folder of the chunk cache written by packerd (required); repeat it for several "
                                   "caches in one run, mixed by data.weights (TOML: [[data.sources]] tables with "
                                   "cache_dir, weight, endpoint). The first cache's holdout is the default held-out "
                                   "cache.", flag="--cache-dir")
    weights: list[float] = opt([], "Share of each cache in every batch, in --cache-dir order (e.g. 0.75,0.25; "
                                   "normalized). Empty: each cache weighs its sequences, so the caches act as one "
                                   "dataset.", flag="--weights")
    endpoint: list[str] = opt([], "ZeroMQ endpoint where each cache's packer announces chunks, in --cache-dir order. "
                                  f"Empty (or an empty entry): the one its manifest records, else {DEFAULT_ENDPOINT}.",
                              flag="--endpoint")
    curve_dir: str = opt("", "Folder with server.key, client.key and client.key_secret from `packerd keys DIR`, "
                             "for an endpoint packerd runs with --curve-dir (encrypted, only key holders hear it; "
                             "without keys the trainer follows by re-reading the manifest alone). Empty: no CURVE.",
                         flag="--curve-dir")
    target_epochs: float = opt(1.0, "Passes over the data (fractions allowed, e.g. 1.5).", flag="--target-epochs",
                               check="positive")
    epoch_fraction: float = opt(1.0, "Fraction of the dataset that makes one epoch (0 < f <= 1): each epoch takes "
                                     "that share of every chunk, a new random sample each epoch.",
                                flag="--epoch-fraction", check="in (0, 1]")
    shuffle_window: int = opt(SHUFFLE_WINDOW, "Local shuffle window in sequences: an epoch's chunk order is cut "
                                              "into windows of whole chunks holding at least this many sequences, "
                                              "shuffled together (each chunk decoded once per epoch; memory per rank "
                                              "about window x seq_len x 2 bytes / processes, 3 windows kept). Fixed "
                                              "for a run: a resume keeps it.", flag="--shuffle-window",
                              check="at least 1")
    wait: bool = opt(True, "Wait for a missing or empty cache to appear; false (--no-wait): fail at once.",
                     flag="--wait")
    wait_seconds: float = opt(0.0, "With wait: give up after this many seconds (0 = wait forever).", check="0 or more")
    reconcile_seconds: float = opt(2.0, "Re-read the manifest this often, so a lost notification loses nothing.",
                                   check="positive")
    prefetch: int = opt(4, "Optimizer steps of batches prepared ahead in the background.", check="at least 1")

    def validate(self) -> None:
        for e in self.endpoint:
            if e and not e.startswith(("tcp://", "ipc://")):
                raise ConfigError(f"data.endpoint must start with tcp:// or ipc:// (got {e!r})")
        n = len(self.cache_dir)
        if len(set(self.cache_dir)) < n:
            raise ConfigError(f"data.cache_dir names a cache twice: {', '.join(self.cache_dir)}")
        for key, values in (("weights", self.weights), ("endpoint", self.endpoint)):
            if values and n and len(values) != n:  # no cache yet: a resume takes the checkpoint's (checked then)
                raise ConfigError(f"data.{key}: {len(values)} given for {n} cache(s); give one per --cache-dir, "
                                  f"in the same order" + (", or none" if key == "endpoint" else ""))
        if any(w < 0 for w in self.weights):
            raise ConfigError(f"data.weights must be 0 or more (got {', '.join(f'{w:g}' for w in self.weights)})")
        if self.weights and not sum(self.weights) > 0:
            raise ConfigError("data.weights are all zero: no cache would be drawn")
        if self.curve_dir and (problem := curve_problem(self.curve_dir)):
            raise ConfigError(f"data.curve_dir: {problem}")


@dataclass
class TrainConfig:
    run_dir: str = opt("runs", "Folder of checkpoints, logs and run records (RUN_DIR).", flag="--run-dir")
    micro_batch_size: int = opt(8, "Sequences per forward pass on each rank.",
                                flag=("--micro-batch-size", "--batch-size"), check="at least 1")
    grad_accum: int = opt(1, "Micro-batches per optimizer step.", flag="--grad-accum", check="at least 1")
    lr: float = opt(6e-4, "Peak learning rate.", flag="--lr", check="positive")
    weight_decay: float = opt(0.1, "AdamW weight decay (not applied to norms).", check="0 or more")
    beta1: float = opt(0.9, "AdamW beta1.", check="in [0, 1)")
    beta2: float = opt(0.95, "AdamW beta2.", check="in [0, 1)")
    eps: float = opt(1e-8, "AdamW epsilon.", check="0 or more")
    grad_clip: float = opt(1.0, "Clip the gradient norm to this value (0 = off).", check="0 or more")
    max_steps: int | None = opt(None, "Stop after this many optimizer steps (unset: when the data is done).",
                                flag="--max-steps", check="at least 1")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = opt(
        "auto", "auto: accelerate launch's --mixed_precision bf16/fp16 if given, else bf16 autocast on CUDA, fp32 on "
        "the CPU; or no, bf16, fp16 (fp16: CUDA only).", flag="--mixed-precision")
    compile: bool = opt(False, "torch.compile the model (checkpoints stay uncompiled).", flag="--compile")
    activation_checkpointing: bool = opt(False, "Recompute each block's activations in the backward pass instead of "
                                                "keeping them: less memory for about a third more compute; the same "
                                                "losses.", flag="--activation-checkpointing")
    loss: str = opt("full", "Loss computation: " + "; ".join(f"{k}: {v}" for k, v in LOSSES.items()) + ".",
                    flag="--loss", choices=tuple(LOSSES))
    loss_chunk: int = opt(8192, "train.loss chunked: positions per chunk (memory: this many rows of logits in "
                                "fp32).", check="at least 1")
    seed: int = opt(1337, "Seed of the weights and of the data order.", flag="--seed")
    deterministic: bool = opt(False, "torch.use_deterministic_algorithms(True): bitwise-repeatable runs and resumes "
                                     "on the CPU.", flag="--deterministic")
    threads: int = opt(0, "CPU threads per process (0: torch's default).", flag="--threads", check="0 or more")

    def validate(self) -> None:
        if not self.run_dir:
            raise ConfigError("train.run_dir must not be empty")


def _schedule_help() -> str:
    return "Learning-rate schedule: " + "; ".join(f"{name}: {k.help}" for name, k in SCHEDULE_KINDS.items()) + "."


@dataclass
class ScheduleConfig:
    kind: str = opt("wsd", _schedule_help(), flag="--schedule", choices=tuple(SCHEDULE_KINDS))
    warmup_fraction: float = opt(0.025, "Warmup as a fraction of the steps of the FULL dataset estimate.",
                                 flag="--warmup-fraction", check="in [0, 1)")
    warmup_steps: int | None = opt(None, "Fixed warmup steps instead of warmup_fraction.", check="0 or more")
    decay_fraction: float = opt(0.2, "wsd: the last fraction of the planned steps that decays.",
                                flag="--decay-fraction", check="in (0, 1]")
    decay_tokens: int | None = opt(None, "wsd: token budget at which the decay starts even if the size is unknown.",
                                   flag="--decay-tokens", check="positive")
    min_lr_fraction: float = opt(0.1, "The final learning rate as a fraction of train.lr.", check="in [0, 1]")


@dataclass
class CheckpointConfig:
    every: int = opt(1000, "Save a checkpoint every this many optimizer steps (0 = only at the end and on a signal).",
                     flag="--checkpoint-every", check="0 or more")
    keep: int = opt(3, "Keep the newest N checkpoints of this run, the most recently saved (0 = keep all).",
                    flag="--keep", check="0 or more")


@dataclass
class LogConfig:
    every: int = opt(10, "When the output is not a terminal: print a status line every this many steps.",
                     flag="--log-every", check="at least 1")
    log_with: str | None = opt(None, "Accelerate tracker(s), e.g. tensorboard (needs it installed).", flag="--log-with")
    level: Literal["debug", "info", "warning"] = opt("info", "Logging level of the trainer's own messages.")
    data_trace: bool = opt(False, "Each rank also logs the (chunk, index) of every sequence it trains on, per step, "
                                  "to training_logs/<run>_run_<k>.rank<r>.data.jsonl (audits order and disjointness).")

    def validate(self) -> None:
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
class EvalConfig:
    every: int = opt(0, "Evaluate the held-out loss every this many optimizer steps and at the end (0 = never).",
                     flag="--eval-every", check="0 or more")
    sequences: int = opt(256, "Evaluate on the first this many sequences of the validation cache, in cache order "
                              "(on what it holds while it holds fewer).", flag="--eval-sequences", check="at least 1")
    cache_dir: str = opt("", "Validation cache: any packerd cache of the training cache's seq_len and tokenizer. "
                             "Empty: CACHE/holdout (`packerd run --holdout`) when it exists.", flag="--val-cache")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        m = self.model
        if m.num_heads and m.num_kv_heads and m.num_heads % m.num_kv_heads:
            raise ConfigError(f"model.num_kv_heads ({m.num_kv_heads}) must divide model.num_heads ({m.num_heads})")
        if m.hidden_size and m.num_heads and m.hidden_size % m.num_heads:
            raise ConfigError(f"model.hidden_size ({m.hidden_size}) must be a multiple of model.num_heads ({m.num_heads})")
        if m.flash_attention is not None and m.attention != "auto" and m.flash_attention != (m.attention == "flash"):
            raise ConfigError(f"model.flash_attention = {str(m.flash_attention).lower()} contradicts "
                              f"model.attention = {m.attention}: set one of them")

    def to_dict(self) -> dict:
        return to_dict(self)

    def hyperparameters(self) -> dict:
        """Dotted keys with scalar values: what trackers accept as hyperparameters."""
        return {k: v for k, v in _flatten(self.to_dict()).items() if isinstance(v, (int, float, str, bool))}


def load_config(path: str | None = None, overrides: dict | None = None, base: dict | None = None) -> Config:
    """Defaults < `base` (a saved config, on resume) < the TOML file < `overrides` (dotted keys, None = unset)."""
    data = dict(base or {})
    if path:
        data = merge(data, _sources(_flatten(load_toml(path))))
    data = merge(data, overrides or {})
    cfg = build(Config, data)
    return cfg


SOURCE_KEYS = ("cache_dir", "weight", "endpoint")


def _sources(flat: dict) -> dict:
    """A TOML file's [[data.sources]] tables (cache_dir, weight, endpoint) as data.cache_dir, data.weights and
    data.endpoint, the lists the flags give."""
    sources = flat.pop("data.sources", None)
    if sources is None:
        return flat
    if not isinstance(sources, list) or not all(isinstance(t, dict) for t in sources) or not sources:
        raise ConfigError("data.sources must be [[data.sources]] tables with cache_dir, weight, endpoint")
    for key in ("data.cache_dir", "data.weights", "data.endpoint"):
        if key in flat:
            raise ConfigError(f"give the caches either as [[data.sources]] or as {key}, not both")
    for i, t in enumerate(sources):
        unknown = sorted(set(t) - set(SOURCE_KEYS))
        if unknown:
            raise ConfigError(f"unknown config key data.sources[{i}].{unknown[0]} (known: {', '.join(SOURCE_KEYS)})")
        if "cache_dir" not in t:
            raise ConfigError(f"data.sources[{i}] has no cache_dir")
    weighed = [("weight" in t) for t in sources]
    if any(weighed) and not all(weighed):
        raise ConfigError("data.sources: give every source a weight, or none (then each weighs its sequences)")
    flat["data.cache_dir"] = [t["cache_dir"] for t in sources]
    if all(weighed):
        flat["data.weights"] = [t["weight"] for t in sources]
    if any("endpoint" in t for t in sources):
        flat["data.endpoint"] = [t.get("endpoint", "") for t in sources]
    return flat


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
    """Every field with its default, its help and its flag: `trainerd --help-config`."""
    rows = describe(Config)
    flag_of = {f.key: ", ".join(f.decls) for f in flags(Config)}
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {default!r:<12}  {help}" + (f" ({flag_of[name]})" if name in flag_of else "")
                     for name, default, help in rows)


def cli_options(command):
    """Decorator of trainerd's click command: the flag of every field that declares one (`opt(flag=...)`),
    typed and documented from the field, default None so that a flag not given overrides nothing."""
    return click_options(Config)(command)


def cli_overrides(values: dict) -> dict:
    """The dotted overrides for `load_config` ({"model.preset": "124m", ...}) of the values click passed for
    the options of `cli_options`; flags not given are left out."""
    return flag_overrides(Config, values)


__all__ = ["Config", "ConfigError", "ModelConfig", "DataConfig", "TrainConfig", "ScheduleConfig",
           "CheckpointConfig", "LogConfig", "EvalConfig", "load_config", "help_text", "cli_options", "cli_overrides",
           "Preset", "PRESETS", "ATTENTIONS", "LOSSES"]
