"""The `trainerd` command (also `python -m trainerd` and `accelerate launch -m trainerd`).

The flags of config fields (--model, --lr, ...) are declared on the fields themselves in trainerd/config.py
(python -m trainerd --help-config lists every field); `--set section.key=value` reaches any field that has
no flag of its own. Precedence: flags > --config FILE > defaults (and, on resume, the checkpoint's saved
config below the file).
"""
from __future__ import annotations

import os
import signal
import sys

import click

from .config import cli_options, cli_overrides


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


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML file with sections model, data, train, schedule, checkpoint, log, eval.")
@click.option("--new", "new", metavar="NAME", help="Start a new run with this name.")
@click.option("--resume", metavar="latest|NAME", help="Resume the newest checkpoint, a checkpoint by name, or a run's newest.")
@cli_options
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
    from .output import Console
    from .start import catch_stop_signals, prepare
    overrides = {**cli_overrides(flags), **_parse_set(sets)}
    old_handlers = catch_stop_signals()   # a signal while waiting for the cache stops at once, saving nothing
    decided = prepare(config_file, overrides, new, resume, Console(True, every=1))
    start, lock = decided if decided is not None else (None, None)
    from .train import run  # torch loads here, after every check that needs no torch
    try:
        code = run(start, lock)
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
    if os.environ.get("WORLD_SIZE", "1") != "1":
        _leave(code)
    sys.exit(code)


def _leave(code: int) -> None:
    """A rank of several leaves without the interpreter's teardown: with torch 2.13 on gloo a rank aborted
    there now and then (SIGABRT, "terminate called without an active exception") after the run had ended
    and every file was closed, which turned a finished run into a failed launch."""
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main(prog_name="trainerd")
