"""launch/: the accelerate config files, and `packtrain` running the real packerd and the real
`accelerate launch -m trainerd` (two gloo ranks on the CPU) together.

The process checks read /proc: every process below packtrain is recorded while it runs (pid, start time,
process group, session), and after packtrain exits none of them may remain, nor any process in one of
their process groups or sessions.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, free_endpoint

LAUNCH = ROOT / "launch"
YAMLS = sorted(LAUNCH.glob("*.yaml"))


# ---------------------------------------------------------------------------------------------------------
# the config files
# ---------------------------------------------------------------------------------------------------------
def test_every_config_file_is_there():
    assert {p.name for p in YAMLS} >= {"cpu-2ranks.yaml", "gpu-1.yaml", "gpu-ddp.yaml", "fsdp2.yaml", "multi-node.yaml"}


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_config_loads_with_accelerate(path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    text = path.read_text()
    head = text.splitlines()[0]
    assert head.startswith("# "), f"{path.name} must start with a comment"
    # the exact command line that uses it comes first
    assert f"accelerate launch --config_file launch/{path.name}" in text.split("\ncompute_environment")[0]

    conf = load_config_from_file(str(path))
    # and the launcher resolves it the way the file says (accelerate's own validation of the launch args)
    try:
        from accelerate.commands.launch import _validate_launch_command
    except ImportError:  # a later accelerate renamed it: loading the file above is the check that remains
        return
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "trainerd"])
    args, _defaults, _mp = _validate_launch_command(args)
    expect = {
        "cpu-2ranks.yaml": dict(multi_gpu=True, use_fsdp=False, num_processes=2, mixed_precision="no"),
        "gpu-1.yaml": dict(multi_gpu=False, use_fsdp=False, num_processes=1, mixed_precision="bf16"),
        "gpu-ddp.yaml": dict(multi_gpu=True, use_fsdp=False, mixed_precision="bf16"),
        "fsdp2.yaml": dict(use_fsdp=True, fsdp_version=2, mixed_precision="bf16"),
        "multi-node.yaml": dict(multi_gpu=True, num_machines=2),
    }.get(path.name, {})
    for key, value in expect.items():
        assert str(getattr(args, key)) == str(value), (path.name, key, getattr(args, key))
    if path.name == "cpu-2ranks.yaml":
        assert not conf.use_cpu  # use_cpu would choose the one-process launcher
    if path.name == "multi-node.yaml":
        for key in ("main_process_ip", "main_process_port", "machine_rank", "num_machines"):
            assert getattr(conf, key) is not None and re.search(rf"^{key}:.*FILL IN", text, re.M), key


# ---------------------------------------------------------------------------------------------------------
# packtrain: helpers
# ---------------------------------------------------------------------------------------------------------
def _stat(pid: int):
    """(ppid, pgid, sid, start time, state) of a live process, or None."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    rest = data[data.rfind(b")") + 2:].split()
    return int(rest[1]), int(rest[2]), int(rest[3]), int(rest[19]), rest[0].decode()


def _all_pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


class Launched:
    """packtrain in a subprocess: its output collected line by line, its process tree recorded."""

    def __init__(self, args, cwd, env=None):
        self.proc = subprocess.Popen([sys.executable, "-m", "launch", *map(str, args)], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.err = ""
        self.seen: dict[int, tuple] = {}  # pid -> (start time, pgid, sid) of every descendant ever seen
        self._out = threading.Thread(target=self._read, daemon=True)
        self._out.start()
        self._errt = threading.Thread(target=lambda: setattr(self, "err", self.proc.stderr.read()), daemon=True)
        self._errt.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def record_tree(self):
        table = {pid: st for pid in _all_pids() if (st := _stat(pid)) is not None}
        todo, found = [self.proc.pid], set()
        while todo:
            p = todo.pop()
            for pid, st in table.items():
                if st[0] == p and pid not in found:
                    found.add(pid)
                    todo.append(pid)
        for pid in found:
            st = table[pid]
            self.seen.setdefault(pid, (st[3], st[1], st[2]))

    def wait_for(self, pattern: str, timeout: float) -> str:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.record_tree()
            for line in list(self.lines):
                if rx.search(line):
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.kill()
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s; output:\n" + "\n".join(self.lines)
                             + "\nstderr:\n" + self.err)

    def finish(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while (rc := self.proc.poll()) is None:  # keep recording: processes started late are checked too
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"packtrain still running after {timeout} s:\n" + "\n".join(self.lines))
            self.record_tree()
            time.sleep(0.1)
        self._out.join(timeout=5)
        self._errt.join(timeout=5)
        return rc

    def kill(self):
        """Test clean-up after a failure: kill packtrain and everything recorded below it."""
        for pid, (start, pgid, _sid) in self.seen.items():
            st = _stat(pid)
            if st is not None and st[3] == start:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        self.proc.kill()

    def leftovers(self) -> list[str]:
        """Processes that are still there: a recorded pid (same start time), or anyone in a recorded group/session."""
        groups = {pgid for (_s, pgid, _sid) in self.seen.values()} - {os.getpgrp()}
        sessions = {sid for (_s, _pg, sid) in self.seen.values()} - {os.getsid(0)}
        out = []
        for pid in _all_pids():
            st = _stat(pid)
            if st is None:
                continue
            ppid, pgid, sid, start, state = st
            if self.seen.get(pid, (None,))[0] == start or pgid in groups or sid in sessions:
                out.append(f"pid {pid} state {state} pgid {pgid} sid {sid}: "
                           + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200])
        return out


def _pid_from(line: str) -> int:
    return int(re.search(r"pid (\d+)", line).group(1))


@pytest.fixture
def launch_env():
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)  # packtrain sets it for CPU ranks
    return env


# ---------------------------------------------------------------------------------------------------------
# packtrain: end to end
# ---------------------------------------------------------------------------------------------------------
def test_packtrain_runs_both_and_stops_cleanly_on_sigint(tmp_path, corpus_jsonl, tokenizer_dir, launch_env):
    run_dir, cache = tmp_path / "runs", tmp_path / "cache"
    lt = Launched(["--cache-dir", cache, "--run-dir", run_dir, "--source", corpus_jsonl, "--tokenizer", tokenizer_dir,
                   "--seq-len", 64, "--chunk-sequences", 16, "--workers", 1, "--endpoint", free_endpoint(tmp_path),
                   "--accelerate-config", LAUNCH / "cpu-2ranks.yaml", "--stop-timeout", 60,
                   # enough epochs that it is still training when interrupted
                   "--", "--target-epochs", 50, "--micro-batch-size", 4, "--log-every", 2, "--checkpoint-every", 0],
                  cwd=ROOT, env=launch_env)
    packer_pid = _pid_from(lt.wait_for(r"^\[packtrain\] packerd pid \d+", 30))
    launcher_pid = _pid_from(lt.wait_for(r"^\[packtrain\] trainer \(accelerate launch\) pid \d+", 60))
    lt.wait_for(r"^\[trainer\] new run .* 2 process\(es\)", 120)  # the config file started two ranks
    lt.wait_for(r"^\[trainer\] Step [4-9]\d*/", 120)
    lt.record_tree()
    ranks = [pid for pid in lt.seen if (st := _stat(pid)) and st[0] == launcher_pid]
    assert len(ranks) == 2, lt.seen

    lt.proc.send_signal(signal.SIGINT)  # Ctrl-C
    rc = lt.finish(timeout=90)
    out = "\n".join(lt.lines)
    assert rc == 0, out + "\nstderr:\n" + lt.err
    assert lt.leftovers() == []
    for pid in (packer_pid, launcher_pid, *ranks):
        st = _stat(pid)
        assert st is None or pid in lt.seen and st[3] != lt.seen[pid][0], f"pid {pid} is still running"

    # both outputs, each line prefixed; the trainer saved on the signal and the summary names it
    assert re.search(r"^\[packerd\] ", out, re.M) and re.search(r"^\[trainer\] ", out, re.M)
    assert re.search(r"^\[trainer\] saved checkpoint .*\(signal", out, re.M), out
    metas = sorted(run_dir.glob("checkpoints/*/meta.json"))
    assert metas, out
    meta = json.loads(metas[-1].read_text())
    assert meta["step"] >= 4 and meta["world_size"] == 2
    ckpt = r"(ckpt|trainerd\.admin)"  # the script, or python -m where it is not installed
    assert re.search(rf"{ckpt} export {metas[-1].parent.name} \S+ --run-dir ", out), out
    assert re.search(r"-m trainerd --run-dir \S*runs --resume latest", out), out  # 2 ranks: with accelerate's flags
    assert re.search(rf"{ckpt} list --run-dir ", out) and re.search(rf"{ckpt} plot \S+ --out loss.png", out), out


@pytest.mark.parametrize("args,says", [
    (["--endpoint", "tcp://127.0.0.1:abc"], "--endpoint 'tcp://127.0.0.1:abc': Invalid argument"),
    (["--accelerate-config", "{two}"], "num_processes must be a whole number (got 'two')"),
    (["--accelerate-config", "{list}"], "num_machines must be a whole number (got [1])"),
])
def test_bad_endpoint_or_accelerate_config_is_one_line_before_anything_starts(tmp_path, launch_env, args, says):
    (tmp_path / "two.yaml").write_text("num_processes: two\n")
    (tmp_path / "list.yaml").write_text("num_machines: [1]\n")
    args = [a.format(two=tmp_path / "two.yaml", list=tmp_path / "list.yaml") for a in args]
    p = subprocess.run([sys.executable, "-m", "launch", "--cache-dir", str(tmp_path / "cache"), "--run-dir",
                        str(tmp_path / "runs"), *args], cwd=ROOT, env=launch_env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1 and p.stderr.startswith("Error: ") and says in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()


def test_packer_failure_before_training_exits_nonzero_with_one_line(tmp_path, tokenizer_dir, launch_env):
    lt = Launched(["--cache-dir", tmp_path / "cache", "--run-dir", tmp_path / "runs", "--source", tmp_path / "missing.jsonl",
                   "--tokenizer", tokenizer_dir, "--seq-len", 64, "--workers", 1, "--endpoint", free_endpoint(tmp_path)],
                  cwd=ROOT, env=launch_env)
    lt.wait_for(r"^\[packtrain\] packerd pid \d+", 30)
    rc = lt.finish(timeout=60)
    out = "\n".join(lt.lines)
    assert rc == 1, out
    err = lt.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: packerd exited with status 1: ") and "missing.jsonl" in err[0], lt.err
    assert not any(line.startswith("[trainer]") for line in lt.lines)  # the trainer was never started
    assert "trainer (accelerate launch) pid" not in out
    assert lt.leftovers() == []


def test_packer_crash_while_training_stops_the_trainer(tmp_path, launch_env):
    # the embedded default corpus, which packtrain paces at 40,000 tokens/s (about 80 s): packerd is still
    # packing when the trainer has logged steps, however fast this machine packs
    lt = Launched(["--cache-dir", tmp_path / "cache", "--run-dir", tmp_path / "runs", "--source", "builtin:stdlib",
                   "--seq-len", 64, "--chunk-sequences", 16, "--workers", 1,
                   "--endpoint", free_endpoint(tmp_path), "--processes", 1,  # one rank: the gloo case is above
                   "--", "--micro-batch-size", 4, "--log-every", 2, "--checkpoint-every", 0],
                  cwd=ROOT, env=launch_env)
    packer_pid = _pid_from(lt.wait_for(r"^\[packtrain\] packerd pid \d+", 30))
    lt.wait_for(r"^\[trainer\] Step [2-9]\d*/", 120)
    assert _stat(packer_pid) is not None, "packerd finished before the crash could be simulated"
    os.kill(packer_pid, signal.SIGKILL)  # a packer crash
    rc = lt.finish(timeout=90)
    out = "\n".join(lt.lines)
    assert rc == 1, out
    err = lt.err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith("Error: packerd was killed by SIGKILL"), lt.err
    assert re.search(r"^\[trainer\] saved checkpoint .*\(signal", out, re.M), out  # the trainer saved first
    assert sorted((tmp_path / "runs").glob("checkpoints/*/meta.json"))
    assert lt.leftovers() == [], out
