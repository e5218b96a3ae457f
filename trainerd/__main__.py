"""The `trainerd` command (also `python -m trainerd` and `accelerate launch -m trainerd`).

Options map onto config fields (python -m trainerd --help-config lists every one); `--set section.key=value`
reaches any field that has no flag of its own. Precedence: flags > --config FILE > defaults (and, on
resume, the checkpoint's saved config below the file).
"""
from __future__ import annotations

import os
import sys

import click

from shared.config import ConfigError


def _help_config(ctx, param, value):
    if not value or ctx.resilient_parsing:
        return
    from .config import help_text
    click.echo(help_text())
    ctx.exit()


def _parse_set(values) -> dict:
    out = {}
    for item in values:
        key, eq, val = item.partition("=")
        if not eq or not key.strip():
            raise click.ClickException(f"--set {item!r}: expected section.key=value")
        out[key.strip()] = val.strip()
    return out


# flag name -> dotted config key
FLAGS = {
    "cache_dir": "data.cache_dir",
    "endpoint": "data.endpoint",
    "curve_dir": "data.curve_dir",
    "target_epochs": "data.target_epochs",
    "epoch_fraction": "data.epoch_fraction",
    "wait": "data.wait",
    "run_dir": "train.run_dir",
    "model": "model.preset",
    "hidden_size": "model.hidden_size",
    "layers": "model.num_layers",
    "heads": "model.num_heads",
    "kv_heads": "model.num_kv_heads",
    "flash_attention": "model.flash_attention",
    "micro_batch_size": "train.micro_batch_size",
    "grad_accum": "train.grad_accum",
    "lr": "train.lr",
    "max_steps": "train.max_steps",
    "mixed_precision": "train.mixed_precision",
    "compile": "train.compile",
    "seed": "train.seed",
    "deterministic": "train.deterministic",
    "threads": "train.threads",
    "schedule": "schedule.kind",
    "warmup_fraction": "schedule.warmup_fraction",
    "decay_fraction": "schedule.decay_fraction",
    "decay_tokens": "schedule.decay_tokens",
    "checkpoint_every": "checkpoint.every",
    "keep": "checkpoint.keep",
    "log_every": "log.every",
    "log_with": "log.log_with",
}


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML file with sections model, data, train, schedule, checkpoint, log.")
@click.option("--cache-dir", help="Chunk cache written by packerd.")
@click.option("--run-dir", help="Folder of checkpoints and logs (default runs).")
@click.option("--new", "new", metavar="NAME", help="Start a new run with this name.")
@click.option("--resume", metavar="latest|NAME", help="Resume the newest checkpoint, a checkpoint by name, or a run's newest.")
@click.option("--model", type=click.Choice(["tiny", "124m", "415m"]), help="Architecture preset (default tiny).")
@click.option("--hidden-size", type=int, help="Model width (overrides the preset).")
@click.option("--layers", type=int, help="Transformer blocks (overrides the preset).")
@click.option("--heads", type=int, help="Attention heads (overrides the preset).")
@click.option("--kv-heads", type=int, help="Key/value heads for grouped-query attention.")
@click.option("--micro-batch-size", "--batch-size", "micro_batch_size", type=int, help="Sequences per forward pass per rank.")
@click.option("--grad-accum", type=int, help="Micro-batches per optimizer step.")
@click.option("--lr", type=float, help="Peak learning rate.")
@click.option("--schedule", type=click.Choice(["wsd", "cosine"]), help="Learning-rate schedule (default wsd).")
@click.option("--warmup-fraction", type=float, help="Warmup as a fraction of the full dataset estimate (default 0.025).")
@click.option("--decay-fraction", type=float, help="wsd: fraction of the run that decays (default 0.2).")
@click.option("--decay-tokens", type=int, help="wsd: start the decay at this many tokens.")
@click.option("--target-epochs", type=float, help="Passes over the data (default 1).")
@click.option("--epoch-fraction", type=float, help="Fraction of the dataset per epoch (default 1).")
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps.")
@click.option("--checkpoint-every", type=int, help="Save every N optimizer steps (0: only at the end and on a signal).")
@click.option("--keep", type=int, help="Keep the newest N checkpoints of the run (0: all).")
@click.option("--endpoint", help="packerd's ZeroMQ endpoint (default tcp://127.0.0.1:5557).")
@click.option("--curve-dir", help="CURVE key folder (from `packerd keys`) for an endpoint of `packerd run --curve-dir`.")
@click.option("--mixed-precision", type=click.Choice(["auto", "no", "bf16", "fp16"]), help="auto: accelerate launch's --mixed_precision bf16/fp16 if given, else bf16 on CUDA, fp32 on the CPU.")
@click.option("--compile/--no-compile", default=None, help="torch.compile the model.")
@click.option("--flash-attention/--no-flash-attention", default=None, help="Flash-attention varlen (default: when installed).")
@click.option("--seed", type=int, help="Seed of weights and data order.")
@click.option("--deterministic/--no-deterministic", default=None, help="Deterministic algorithms (bitwise resume on the CPU).")
@click.option("--threads", type=int, help="CPU threads per process.")
@click.option("--wait/--no-wait", default=None, help="Wait for a missing or empty cache (default), or fail at once.")
@click.option("--log-every", type=int, help="Status line every N steps when not on a terminal.")
@click.option("--log-with", help="Accelerate tracker, e.g. tensorboard.")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE", help="Any other config field. Repeatable.")
@click.option("--help-config", is_flag=True, expose_value=False, is_eager=True, callback=_help_config,
              help="List every config field with its default and exit.")
def main(config_file, new, resume, sets, **flags) -> None:
    """Train a Llama-style model on a packerd cache while it grows; resume exactly after a crash.

    \b
      trainerd --cache-dir cache --run-dir runs --model tiny --new tiny_pydoc_64
      accelerate launch --multi_gpu --num_processes 2 -m trainerd --config run.toml
      trainerd --run-dir runs --resume latest
    """
    overrides = {FLAGS[k]: v for k, v in flags.items() if v is not None}
    overrides.update(_parse_set(sets))
    from .config import load_config
    try:
        cfg = load_config(config_file, overrides)  # config errors before torch loads (seconds)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    preflight(cfg, new, resume)
    from .train import run
    try:
        code = run(config_file, overrides, new=new, resume=resume)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    sys.exit(code)


def preflight(cfg, new: str | None, resume: str | None) -> None:
    """User errors that need no torch, found in a fraction of a second; the trainer checks them again.

    Only the main process checks (the others follow its decision in the trainer): a probe of the run lock
    holds it for a moment, and a checkpoint being put back by rank 0 would be missing for another rank."""
    if os.environ.get("RANK", "0") != "0":
        return
    from pathlib import Path

    from shared.cache import CacheError, open_cache
    from shared.manifest import ManifestError, load_manifest

    from . import checkpoint as ck
    if not cfg.data.wait and cfg.data.cache_dir:
        try:
            if not open_cache(cfg.data.cache_dir).chunks:
                raise click.ClickException(f"cache {cfg.data.cache_dir} has no chunks yet (without --no-wait the trainer waits)")
        except CacheError as e:
            raise click.ClickException(f"{e} (without --no-wait the trainer waits for it)") from None
    if resume:
        # a checkpoint that an interrupted re-save left aside is put back first, or it would not be found
        for line in ck.restore_interrupted_resaves(cfg.train.run_dir):
            click.echo(line, err=True)
        try:
            meta = ck.find_checkpoint(cfg.train.run_dir, resume)
            cache_dir = cfg.data.cache_dir or ck.read_json(meta["path"], "config.json")["data"]["cache_dir"]
            manifest = load_manifest(cache_dir)
            problem = ck.compatibility_error(meta["path"], manifest) if manifest is not None else None
        except (ck.CheckpointError, ManifestError, KeyError, TypeError) as e:
            raise click.ClickException(str(e)) from None
        if problem:
            raise click.ClickException(problem)
    run = meta["run"] if resume else new
    lock = Path(cfg.train.run_dir) / ck.LOCKS_DIR / f"{run}.lock"
    if run and lock.exists():
        with ck.run_lock_free(cfg.train.run_dir, run) as free:
            if not free:
                raise click.ClickException(f"another trainer is running run {run} ({lock} is held)")


if __name__ == "__main__":
    main(prog_name="trainerd")
