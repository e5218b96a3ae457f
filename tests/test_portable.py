"""The portable paths, forced on Linux: the children get a sitecustomize.py that hides what Windows lacks
(the fcntl module, os.O_DIRECTORY, os.fchmod, os.pread, os.pwrite, os.fdatasync), and the real packerd, trainer and ckpt
run through them. The lock is then shared.fsutil's region lock (os.lockf standing in for Windows'
msvcrt.locking on the same byte): it must still refuse a second holder, name the holder's pid, and go away
when the holder is killed with kill -9.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, free_port, run_packerd
from shared.fsutil import REGION_BYTE
from shared.manifest import load_manifest

HIDE = '''
import importlib.abc
import os
import sys


class _Hidden(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "fcntl":
            raise ModuleNotFoundError("fcntl is hidden by tests/test_portable.py", name=name)
        return None


sys.meta_path.insert(0, _Hidden())
sys.modules.pop("fcntl", None)
for attr in ("O_DIRECTORY", "fchmod", "pread", "pwrite", "fdatasync"):
    if hasattr(os, attr):
        delattr(os, attr)
'''

# holds the FolderLocks of the paths given until its stdin closes (or it is killed)
HOLD = '''
import sys
from pathlib import Path
from shared.fsutil import FolderLock
locks = [FolderLock(Path(p).parent, Path(p).name).acquire() for p in sys.argv[1:]]
print("held", flush=True)
sys.stdin.read()
'''

TINY = ["--model", "tiny", "--hidden-size", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2",
        "--micro-batch-size", "4", "--threads", "1", "--log-every", "1"]
CKPT = "from trainerd.admin import cli; cli(prog_name='ckpt')"


@pytest.fixture
def portable_env(tmp_path) -> dict:
    """The environment of a child that takes the portable paths; checked to be one."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(HIDE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(hide), str(ROOT), os.environ.get("PYTHONPATH")) if p)
    probe = child("-c", "import os, shared.fsutil as f; "
                        "print(f.fcntl, f.CAN_FSYNC_DIRS, hasattr(os, 'fchmod'), hasattr(os, 'pread'))", env=env)
    assert probe.stdout.split() == ["None", "False", "False", "False"], probe.stderr
    return env


def child(*argv, env, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout, check=False)


def pack(cache: Path, corpus: Path, tokenizer: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    return run_packerd("run", "--cache-dir", cache, "--source", corpus, "--tokenizer", tokenizer, "--seq-len", 64,
                       "--chunk-sequences", 16, "--workers", 1, "--endpoint", f"tcp://127.0.0.1:{free_port()}",
                       check=check, env=env)


def posix_lock_holders(path: Path) -> set[int]:
    """Pids holding a POSIX (lockf/fcntl) lock on PATH's inode from REGION_BYTE, from /proc/locks."""
    inode = f":{path.stat().st_ino} "
    out = set()
    for line in Path("/proc/locks").read_text().splitlines():
        f = line.split()
        if "POSIX" in f and inode in line and f[-2] == str(REGION_BYTE):
            out.add(int(f[f.index("WRITE") + 1]))
    return out


def test_pack_train_and_list_without_fcntl(tmp_path, portable_env, corpus_jsonl, tokenizer_dir):
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    pack(cache, corpus_jsonl, tokenizer_dir, portable_env)
    m = load_manifest(cache)
    assert m.finished and m.total_sequences > 0
    p = child("-m", "trainerd", "--cache-dir", cache, "--run-dir", runs, "--endpoint",
              f"tcp://127.0.0.1:{free_port()}", *TINY, "--new", "p", "--max-steps", 2, "--checkpoint-every", 2,
              env=portable_env)
    assert p.returncode == 0, p.stderr
    with open(runs / "training_logs" / "p_run_1.jsonl") as f:
        steps = [r["step"] for r in map(json.loads, f) if "event" not in r]
    assert steps == [1, 2]
    p = child("-c", CKPT, "list", "--run-dir", runs, env=portable_env)
    assert p.returncode == 0, p.stderr
    assert "p-step00000002" in p.stdout


def test_lock_without_fcntl_refuses_a_second_holder_and_goes_with_kill_9(tmp_path, portable_env, corpus_jsonl,
                                                                         tokenizer_dir):
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    leftover = runs / "checkpoints" / ".tmp-p-step00000009-4242"  # an unfinished save of run p
    for d in (cache, runs / ".locks", leftover):
        d.mkdir(parents=True)
    with subprocess.Popen([sys.executable, "-c", HOLD, cache / ".lock", runs / ".locks" / "p.lock"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=portable_env, cwd=ROOT) as holder:
        try:
            assert holder.stdout.readline().strip() == "held"
            assert posix_lock_holders(cache / ".lock") == {holder.pid}   # a region lock, not a flock
            p = pack(cache, corpus_jsonl, tokenizer_dir, portable_env, check=False)
            assert p.returncode == 1
            assert "another packer is running on this cache" in p.stderr and f"(pid {holder.pid})" in p.stderr
            p = child("-m", "trainerd", "--cache-dir", cache, "--run-dir", runs, *TINY, "--new", "p", env=portable_env)
            assert p.returncode == 1
            assert "another trainer is running run p" in p.stderr
            p = child("-c", CKPT, "clean", "--yes", "--run-dir", runs, env=portable_env)   # probe_locks
            assert p.returncode == 0, p.stderr
            assert "Skipping run p: it is training" in p.stdout and leftover.is_dir()
        finally:
            holder.kill()   # kill -9
    assert holder.returncode == -signal.SIGKILL
    assert (cache / ".lock").read_text() == str(holder.pid)  # the dead holder's pid is all that is left
    pack(cache, corpus_jsonl, tokenizer_dir, portable_env)
    assert load_manifest(cache).finished
    p = child("-c", CKPT, "clean", "--yes", "--run-dir", runs, env=portable_env)
    assert p.returncode == 0, p.stderr
    assert not leftover.exists()


def test_compile_is_turned_off_only_on_cuda_without_triton(tmp_path, monkeypatch, caplog):
    import importlib.util

    import torch

    from trainerd.config import TrainConfig
    from trainerd.model import set_up_torch
    if importlib.util.find_spec("triton") is not None:
        pytest.skip("Triton is installed here")
    monkeypatch.setenv("TRITON_CACHE_DIR", "")
    monkeypatch.delenv("TRITON_CACHE_DIR")
    cpu = TrainConfig(run_dir=str(tmp_path / "runs"), compile=True)
    set_up_torch(cpu, cuda=False)
    assert cpu.compile and not caplog.records   # the CPU compiles to C++: no Triton needed
    assert os.environ["TRITON_CACHE_DIR"] == str((tmp_path / "runs").resolve() / ".triton-cache")
    gpu = TrainConfig(run_dir=str(tmp_path / "other"), compile=True)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        set_up_torch(gpu, cuda=True)
    finally:  # what cuda=True switches on, put back for the tests after this one
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert not gpu.compile
    assert [r.getMessage() for r in caplog.records] == [
        "torch.compile off: Triton is not installed (on Windows: pip install triton-windows)"]
    assert os.environ["TRITON_CACHE_DIR"] == str((tmp_path / "runs").resolve() / ".triton-cache")  # kept once set
