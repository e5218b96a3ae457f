"""Which run a trainer starts: --new, --resume, the checkpoint menu on a terminal, the non-terminal default,
and run-name suggestions derived from the config and the cache."""
from __future__ import annotations

import io
import json

import click
import pytest
from click.testing import CliRunner

from trainerd.config import load_config
from trainerd.output import Console, status_line
from trainerd.rundir import TrainError
from trainerd.start import decide_start, interactive_menu, prepare, suggest_name


def fake_checkpoint(run_dir, run, step, loss, t):
    d = run_dir / "checkpoints" / f"{run}-step{step:08d}"
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"format": 1, "name": d.name, "run": run, "run_id": f"id-{run}",
                                             "step": step, "loss": loss, "time": t}))


@pytest.fixture
def run_dir(tmp_path):
    fake_checkpoint(tmp_path, "tiny_pydoc_64", 100, 5.5, 1000)
    fake_checkpoint(tmp_path, "tiny_pydoc_64", 200, 4.25, 2000)
    fake_checkpoint(tmp_path, "other", 50, 6.0, 1500)
    return tmp_path


def test_name_suggestions():
    assert suggest_name(load_config(None, {"model.preset": "415m"}), ["hf:HuggingFaceFW/fineweb-edu:sample-10BT"], 512) \
        == "415M_FineWeb_512"
    assert suggest_name(load_config(None, {}), ["builtin:pydoc"], 64) == "tiny_pydoc_64"
    assert suggest_name(load_config(None, {"model.preset": "124m"}), ["/data/wikitext-2/valid.jsonl"], 1024) \
        == "124M_WikiText_1024"


def test_flags_and_the_non_terminal_default(run_dir, tmp_path):
    s = decide_start(str(run_dir), None, "latest", "x", interactive=False)
    assert (s.mode, s.run, s.ckpt.endswith("tiny_pydoc_64-step00000200")) == ("resume", "tiny_pydoc_64", True)
    assert decide_start(str(run_dir), None, "other", "x", False).ckpt.endswith("other-step00000050")
    assert decide_start(str(run_dir), "fresh", None, "x", False).mode == "new"
    with pytest.raises(TrainError, match="already has checkpoints"):
        decide_start(str(run_dir), "other", None, "x", False)
    with pytest.raises(TrainError, match="not both"):
        decide_start(str(run_dir), "a", "latest", "x", False)
    with pytest.raises(TrainError, match="run name"):
        decide_start(str(run_dir), "../escape", None, "x", False)
    with pytest.raises(TrainError, match="no checkpoint or run named"):
        decide_start(str(run_dir), None, "nope", "x", False)
    # neither flag, no terminal: the suggested run goes on from its newest checkpoint, or starts new
    s = decide_start(str(run_dir), None, None, "tiny_pydoc_64", False)
    assert (s.mode, s.run, s.run_id) == ("resume", "tiny_pydoc_64", "id-tiny_pydoc_64")
    s = decide_start(str(tmp_path / "empty"), None, None, "tiny_pydoc_64", False)
    assert (s.mode, s.run) == ("new", "tiny_pydoc_64") and len(s.run_id) == 12


def menu_command(run_dir, suggested):
    @click.command()
    def cmd():
        s = interactive_menu(str(run_dir), suggested)
        click.echo(f"-> {s.mode} {s.run} {s.ckpt or ''}")
    return cmd


def test_checkpoint_menu_lists_checkpoints_and_starts_new(run_dir):
    r = CliRunner().invoke(menu_command(run_dir, "tiny_pydoc_64"), input="N\n\n")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert "1. tiny_pydoc_64-step00000200  step 200  loss 4.250" in lines[1]   # newest first
    assert "2. other-step00000050  step 50  loss 6.000" in lines[2]
    assert "N. Start New Training" in r.output and "X. Checkpoint Management" in r.output
    # the suggested name has checkpoints already: the next free variant is offered
    assert "Name suggestions: tiny_pydoc_64_2" in r.output
    assert lines[-1] == "-> new tiny_pydoc_64_2 "


def test_checkpoint_menu_resumes_a_pick(run_dir):
    r = CliRunner().invoke(menu_command(run_dir, "tiny_pydoc_64"), input="7\n2\n")
    assert r.exit_code == 0, r.output
    assert "'7' is not a choice" in r.output
    assert r.output.splitlines()[-1].startswith("-> resume other ") and r.output.rstrip().endswith("other-step00000050")


MENU_UNDER_STOP_HANDLERS = """
import sys, click
from trainerd.start import catch_stop_signals, interactive_menu
catch_stop_signals()  # as trainerd's main does before the menu

@click.command()
def cmd():
    s = interactive_menu(sys.argv[1], "tiny_pydoc_64")
    click.echo(f"-> {s.mode} {s.run}")

cmd([])
"""


def test_ctrl_c_at_the_checkpoint_menu_on_a_terminal_aborts(run_dir):
    # the trainer's stop handlers only note a signal (so that a run saves first); at the menu that left the
    # prompt waiting and made the run picked next stop at once
    import os
    import pty
    import select
    import signal
    import subprocess
    import sys
    import time
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", MENU_UNDER_STOP_HANDLERS, str(run_dir)], stdin=slave,
                            stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    out = b""

    def read(seconds: float) -> bool:
        nonlocal out
        if not select.select([master], [], [], seconds)[0]:
            return False
        try:
            out += os.read(master, 4096)
            return True
        except OSError:  # EIO: the process closed the terminal
            return False

    try:
        deadline = time.monotonic() + 60  # ends a hung read only
        while b"Choice" not in out and time.monotonic() < deadline:
            read(0.5)
        assert b"Choice" in out, out
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
        while read(0.2):
            pass
    finally:
        proc.kill()
        proc.wait()
        os.close(master)
    assert code == 1 and b"Aborted!" in out and b"->" not in out, out


def test_status_line_format():
    assert status_line(770, 26_235, 5.58312, 106_212.4, None, 4 * 3600 + 23 * 60 + 59) == \
        "Step 770/26,235 ( 2.9%) | Loss 5.583 | 106,212 tok/s | ETA 04:23h"
    assert status_line(1, 10, 9.0, None, None, None) == "Step 1/10 (10.0%) | Loss 9.000 | - tok/s | ETA --:--h"
    assert status_line(5, 10, 2.0, 1000.0, 0.4125, 60.0) == \
        "Step 5/10 (50.0%) | Loss 2.000 | 1,000 tok/s | MFU 41.2% | ETA 00:01h"
    assert status_line(6, 10, None, 1000.0, None, 60.0) == "Step 6/10 (60.0%) | Loss - | 1,000 tok/s | ETA 00:01h"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_console_refreshes_in_place_on_a_terminal_and_prints_lines_otherwise():
    tty = _Terminal()
    c = Console(True, every=10, stream=tty)
    c.status("Step 1/3", 1)
    c.status("Step 2/3", 2)
    c.message("saved checkpoint")      # a message ends the refreshed line first
    c.status("Step 3/3", 3)
    c.close()
    assert tty.getvalue() == "\rStep 1/3\x1b[K\rStep 2/3\x1b[K\nsaved checkpoint\n\rStep 3/3\x1b[K\n"
    plain = io.StringIO()
    c = Console(True, every=2, stream=plain)
    for s in (1, 2, 3, 4):
        c.status(f"Step {s}/4", s)
    c.status("Step 5/4", 5, force=True)
    assert plain.getvalue() == "Step 2/4\nStep 4/4\nStep 5/4\n"
    quiet = _Terminal()
    Console(False, every=1, stream=quiet).status("Step 1/1", 1)   # ranks other than 0 print nothing
    assert quiet.getvalue() == ""


def test_only_the_main_process_decides_the_run(tmp_path, monkeypatch, make_cache):
    # every rank of a launch starts at once; only rank 0 decides and takes the run's lock (a probing rank 1
    # could make rank 0's own acquisition fail); the others get rank 0's decision in the trainer
    from shared.fsutil import FolderLock
    cache = make_cache()
    (tmp_path / ".locks").mkdir()
    overrides = {"train.run_dir": str(tmp_path), "data.cache_dir": str(cache)}
    quiet = Console(False, every=1)
    with FolderLock(tmp_path / ".locks", "r.lock"):    # a trainer of run r is running
        monkeypatch.setenv("RANK", "1")
        assert prepare(None, overrides, "r", None, quiet) is None   # no decision, and the lock untouched
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(click.ClickException, match="another trainer is running run r"):
            prepare(None, overrides, "r", None, quiet)
    start, lock = prepare(None, overrides, "r", None, quiet)
    try:
        assert (start.mode, start.run, start.line, start.ckpt) == ("new", "r", 1, None)
        assert start.config["data"]["cache_dir"] == [str(cache)] and start.config["train"]["run_dir"] == str(tmp_path)
    finally:
        lock.release()
