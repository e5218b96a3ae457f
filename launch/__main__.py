"""`packtrain` (also `python -m launch`): run packerd and trainerd together on one machine.

    packtrain                                          # embedded offline default: stdlib, builtin BPE, tiny, CPU
    packtrain --source hf:HuggingFaceFW/fineweb-edu:sample-10BT --tokenizer gpt2 --model 124m
    packtrain --accelerate-config launch/cpu-2ranks.yaml -- --max-steps 200     # trainer flags after --

What it does, in order:
1. starts `python -m packerd run ...` in its own session (process group), its output prefixed `[packerd] `;
2. waits until the packer's ZeroMQ endpoint answers (its heartbeat comes every second), or the packer has
   exited 0 (a cache that was already finished);
3. starts `python -m accelerate.commands.launch [...] -m trainerd ...` in its own session, output `[trainer] `;
4. watches both. The packer exiting 0 (the cache is finished) is normal: the trainer goes on to the end
   of its plan. When the trainer is done, a packer still running (--follow) is stopped.
5. Ctrl-C or SIGTERM: SIGINT to every trainer rank (each saves a checkpoint at the next step boundary and
   exits 0), SIGTERM to packerd (it commits nothing half-written), a wait of --stop-timeout seconds, then
   SIGKILL for whatever is left. A second Ctrl-C kills at once.
6. At the end every process that was started (and every process they started: tracked through /proc,
   collected as orphans because packtrain is a child subreaper) is gone, and it prints where the
   checkpoints and logs are and the commands that resume, list, export and plot them.
   Both children also get PR_SET_PDEATHSIG=SIGTERM: if packtrain itself is killed with SIGKILL, packerd
   and a several-rank launcher still stop cleanly (the one rank of a one-process launch is not reached).

Exit status: 0 when the trainer finished, or when both stopped cleanly on Ctrl-C/SIGTERM; 1 with a one-line
`Error: ...` when either process failed (a packer failure stops the trainer, which saves first).

Decisions:
- The trainer's ranks are signalled directly, not the `accelerate launch` process: the launcher would die
  on SIGINT with a traceback (one process) or tear its workers down on its own timer (several), while
  ranks that get SIGINT save and exit 0, and the launcher then exits 0 by itself. A rank that has not yet
  installed trainerd's handler (still importing torch) gets SIGTERM instead: it has nothing to save.
- The embedded default is a bundle used when the only source is a builtin one (`builtin:stdlib`, the
  default, or `builtin:pydoc`): see EMBEDDED below. With `builtin:stdlib` the packer is paced, the trainer
  starts on its first chunks and grows its plan as they come, and 2% of the documents are held out.
- On the CPU without --accelerate-config it starts min(2, cores) ranks (`--multi_gpu --num_processes 2`:
  trainerd uses Accelerator(cpu=True) without CUDA, so they are gloo ranks) with OMP_NUM_THREADS =
  cores / ranks, and a free rendezvous port, so two runs on one machine do not collide.
"""
from __future__ import annotations

import ctypes
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import click

from shared.protocol import DEFAULT_ENDPOINT
from trainerd.config import PRESETS
from trainerd.rundir import RunDir

# The embedded defaults, used when the only source is a builtin one: sequences of 128 tokens, chunks of 64
# sequences, a global batch of 8 sequences split over the ranks, and per corpus the packer's and the
# trainer's flags (flags given on the command line, and trainer flags after `--`, win).
EMBEDDED_SEQ_LEN = 128
EMBEDDED_CHUNK_SEQUENCES = 64
EMBEDDED_GLOBAL_BATCH = 8
EMBEDDED = {
    # the default: the standard library's source, about 3.1 M tokens with the built-in BPE, packed at a paced
    # 40,000 tokens/s (a stream over a network is as slow) for about 80 s: the trainer starts on the first
    # chunks and its plan grows as they come. An epoch takes 0.3 of every chunk, about what 2 CPU ranks train
    # at that pace; 2% of the documents are held out and evaluated every 200 steps.
    "builtin:stdlib": (["--max-tokens-per-s", "40000", "--holdout", "0.02"],
                       ["--epoch-fraction", "0.3", "--lr", "3e-3", "--schedule", "cosine", "--checkpoint-every", "200",
                        "--log-every", "20", "--eval-every", "200", "--eval-sequences", "128"]),
    # CPython's documentation text (112 K tokens, packed in a fraction of a second): 8 epochs
    "builtin:pydoc": ([], ["--target-epochs", "8", "--lr", "3e-3", "--checkpoint-every", "100", "--log-every", "20"]),
}
DEFAULT_SOURCE = "builtin:stdlib"

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
# Linux: prctl for the subreaper and the death signal (elsewhere both are skipped, and /proc finds nothing)
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _say(msg: str) -> None:
    _OUT.line("[packtrain] ", msg)


class _Output:
    """Lines of several processes on one stdout, each whole and prefixed, never interleaved mid-line."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.lock = threading.Lock()

    def line(self, prefix: str, text: str) -> None:
        with self.lock:
            try:
                self.stream.write(prefix + text + "\n")
                self.stream.flush()
            except (OSError, ValueError):  # a closed terminal (SIGHUP) or pipe: keep supervising
                pass


_OUT = _Output()


# ---------------------------------------------------------------------------------------------------------
# processes: /proc tracking (Linux)
# ---------------------------------------------------------------------------------------------------------
def proc_table() -> dict[int, tuple[int, int, int, str]]:
    """pid -> (ppid, pgid, start time in clock ticks, state) of every process, from /proc/PID/stat."""
    out = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rfind(b")") + 2:].split()  # the command name may hold spaces and parentheses
        try:
            out[int(name)] = (int(rest[1]), int(rest[2]), int(rest[19]), rest[0].decode())
        except (IndexError, ValueError):
            continue
    return out


def descendants(table: dict, root: int) -> set[int]:
    kids: dict[int, list[int]] = {}
    for pid, (ppid, *_rest) in table.items():
        kids.setdefault(ppid, []).append(pid)
    out, todo = set(), [root]
    while todo:
        for k in kids.get(todo.pop(), ()):
            if k not in out:
                out.add(k)
                todo.append(k)
    return out


def handles_sigterm(pid: int) -> bool:
    """True when the process has its own SIGTERM handler (trainerd installs it together with SIGINT's)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    except (OSError, ValueError):
        pass
    return False


def _child_setup() -> None:
    # runs in the child between fork and exec: die with packtrain (SIGTERM: both daemons stop cleanly on it)
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class Child:
    """One started process (packerd, or accelerate launch and its ranks) with its prefixed output."""

    def __init__(self, name: str, prefix: str, argv: list[str], env: dict):
        self.name = name
        self.prefix = prefix
        self.argv = argv
        self.tail: deque[str] = deque(maxlen=200)
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                     preexec_fn=_child_setup if _libc is not None else None)
        self.pid = self.proc.pid
        self.tracked: dict[int, int] = {}  # pid -> start time of every process seen below this one
        self.reader = threading.Thread(target=self._pump, name=f"{name}-output", daemon=True)
        self.reader.start()

    def _pump(self) -> None:
        for raw in iter(self.proc.stdout.readline, b""):
            text = raw.decode("utf-8", "replace").rstrip("\n")
            for part in text.split("\r"):  # progress bars redraw with \r: show each state as a line
                part = part.rstrip()
                if part:
                    self.tail.append(part)
                    _OUT.line(self.prefix, part)
        self.proc.stdout.close()

    def poll(self) -> int | None:
        return self.proc.poll()

    def track(self, table: dict) -> None:
        for pid in descendants(table, self.pid):
            self.tracked.setdefault(pid, table[pid][2])

    def alive(self, table: dict) -> list[int]:
        """This process and its tracked descendants that still exist (same pid and start time), zombies aside."""
        out = []
        if self.proc.poll() is None:
            out.append(self.pid)
        for pid, start in self.tracked.items():
            row = table.get(pid)
            if row is not None and row[2] == start and row[3] != "Z":
                out.append(pid)
        return out

    def last_error(self) -> str:
        """The line that explains a failure: the last `Error: ...` line, else the last exception line (not the
        launcher's own ChildFailedError report), else the last line that is not a rule of = or -."""
        lines = [ln.strip() for ln in self.tail]
        lines = [ln.split("]: ", 1)[1] if ln.startswith("[rank") and "]: " in ln else ln for ln in lines]
        for line in reversed(lines):
            if line.startswith("Error:"):
                return line[len("Error:"):].strip()
        for line in reversed(lines):
            if _EXC_LINE.match(line) and "ChildFailedError" not in line:
                return line
        for line in reversed(lines):
            if line.strip("=-_ "):
                return line
        return "(no output)"


_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b.*")


def _status(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with status {rc}"


def _failure(child: "Child", rc: int, when: str = "") -> str:
    """`packerd exited with status 1: <its error line>`, or `packerd was killed by SIGKILL` (one line)."""
    name = "the trainer" if child.name == "trainer" else child.name
    child.reader.join(timeout=5)  # its last lines are in
    return f"{name} {_status(rc)}{when}" + (f": {child.last_error()}" if rc > 0 else "")


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------------------------------------------------
# the supervisor
# ---------------------------------------------------------------------------------------------------------
class Supervisor:
    def __init__(self, stop_timeout: float):
        self.stop_timeout = stop_timeout
        self.packer: Child | None = None
        self.trainer: Child | None = None
        self.signals: list[int] = []
        self.wake = threading.Event()
        self.packer_stop_sent = False
        self.trainer_stop_sent = False
        self.trainer_stop_clean = True   # every rank had trainerd's handler when it was asked to stop
        self._last_track = 0.0

    # signals only record; the main loop acts
    def on_signal(self, signum, frame) -> None:
        self.signals.append(signum)
        self.wake.set()

    def children(self) -> list[Child]:
        return [c for c in (self.packer, self.trainer) if c is not None]

    def track(self, force: bool = False) -> dict:
        if not force and time.monotonic() - self._last_track < 0.5:
            return {}
        self._last_track = time.monotonic()
        table = proc_table()
        for c in self.children():
            c.track(table)
        self._reap_orphans(table)
        return table

    def _reap_orphans(self, table: dict) -> None:
        """Collect processes that were re-parented to packtrain (the subreaper) after their parent died."""
        mine = {c.pid for c in self.children()}
        me = os.getpid()
        for pid, (ppid, _pgid, _start, state) in table.items():
            if ppid == me and pid not in mine and state == "Z":
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass

    def sleep(self, seconds: float) -> None:
        self.wake.wait(seconds)
        self.wake.clear()

    # -- stopping ------------------------------------------------------------------------------------------
    def stop_packer(self) -> None:
        if self.packer is not None and self.packer.poll() is None and not self.packer_stop_sent:
            _kill(self.packer.pid, signal.SIGTERM)  # packerd stops its workers itself
            self.packer_stop_sent = True

    def stop_trainer(self) -> None:
        t = self.trainer
        if t is None or t.poll() is not None or self.trainer_stop_sent:
            return
        self.trainer_stop_sent = True
        table = proc_table()
        ranks = [pid for pid, row in table.items() if row[0] == t.pid and row[3] != "Z"]
        if not ranks:  # accelerate launch is still starting: nothing to save yet
            self.trainer_stop_clean = False
            _killpg(t.pid, signal.SIGTERM)
            return
        for pid in ranks:
            if handles_sigterm(pid):
                _kill(pid, signal.SIGINT)   # what Ctrl-C does in a terminal: save at the next step, exit 0
            else:
                self.trainer_stop_clean = False
                _kill(pid, signal.SIGTERM)  # still importing: nothing to save

    def wait_all(self, timeout: float) -> bool:
        """Wait for both to exit; False on timeout or a second signal."""
        deadline = time.monotonic() + timeout
        n_signals = len(self.signals)
        while time.monotonic() < deadline:
            self.track()
            if all(c.poll() is not None for c in self.children()):
                return True
            if len(self.signals) > n_signals:
                _say("second signal: killing packerd and the trainer now")
                return False
            self.sleep(0.2)
        _say(f"still running after {timeout:g} s: killing what is left")
        return False

    def kill_everything(self) -> None:
        """SIGKILL every tracked process that is still there, and its process group (never packtrain's own)."""
        mine = os.getpgrp()
        for _ in range(2):  # twice: a process may have started a child between the scan and the kill
            table = self.track(force=True)
            for c in self.children():
                for pid in c.alive(table):
                    row = table.get(pid)
                    if row is not None and row[1] != mine:
                        _killpg(row[1], signal.SIGKILL)  # torch's ranks run in sessions of their own
                    _kill(pid, signal.SIGKILL)
            for c in self.children():
                try:
                    c.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            time.sleep(0.1)

    def sweep(self) -> list[int]:
        """Kill and collect what any started process left behind; returns what is still alive (normally nothing)."""
        table = self.track(force=True)
        left = [pid for c in self.children() for pid in c.alive(table)]
        if left:
            self.kill_everything()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                table = self.track(force=True)
                left = [pid for c in self.children() for pid in c.alive(table)]
                if not left:
                    break
                time.sleep(0.1)
        for c in self.children():
            c.reader.join(timeout=5)
        return left

    def shutdown(self) -> None:
        self.stop_trainer()
        self.stop_packer()
        if not self.wait_all(self.stop_timeout):
            self.kill_everything()


# ---------------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------------
def _script(name: str, module: str) -> str:
    """How to call a console script from here: its name when it is on PATH, else its path, else python -m."""
    bindir = Path(sys.executable).parent
    found = shutil.which(name)
    if found and (not (bindir / name).exists() or Path(found).resolve() == (bindir / name).resolve()):
        return name
    if (bindir / name).exists():
        p = bindir / name
        try:
            return str(p.relative_to(Path.cwd()))
        except ValueError:
            return str(p)
    return f"{shlex.quote(sys.executable)} -m {module}"


def print_summary(run_dir: str, argv: list[str], launch_flags: list[str]) -> None:
    """Where the checkpoints and logs are, and the commands that go on from here.

    The trainer alone resumes with the same launch layout (ranks x micro-batch make the data order), so the
    resume command repeats the accelerate flags when there were several ranks or a config file."""
    q = shlex.quote
    rd = RunDir(run_dir)
    newest = rd.newest()
    ckpt = _script("ckpt", "trainerd.admin")
    if launch_flags:
        acc = _script("accelerate", "accelerate.commands.launch")
        acc = acc if " -m " in acc else acc + " launch"
        trainerd = f"{acc} {' '.join(q(a) for a in launch_flags)} -m trainerd"
    else:
        trainerd = _script("trainerd", "trainerd")
    if newest is None:
        _say(f"no checkpoint in {rd.checkpoints_dir}; logs in {rd.logs_dir}")
        return
    name, run = newest.name, newest.run
    _say(f"newest checkpoint: {newest.path} (step {newest.step}"
         + (f", loss {newest.loss:.3f})" if newest.loss is not None else ")"))
    _say(f"checkpoints: {rd.checkpoints_dir}")
    _say(f"logs:        {rd.logs_dir}")
    _say(f"resume both: {' '.join([_script('packtrain', 'launch')] + [q(a) for a in argv[1:]])}")
    _say(f"resume:      {trainerd} --run-dir {q(run_dir)} --resume latest")
    _say(f"list:        {ckpt} list --run-dir {q(run_dir)}")
    _say(f"export:      {ckpt} export {q(name)} {q(str(Path('export', name)))} --run-dir {q(run_dir)}")
    _say(f"plot:        {ckpt} plot {q(run)} --out loss.png --run-dir {q(run_dir)}")


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_accelerate_config(path: str) -> dict:
    """The few fields packtrain looks at; accelerate itself validates the whole file."""
    import yaml
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise click.ClickException(f"--accelerate-config {path}: {e}".splitlines()[0])
    if not isinstance(data, dict):
        raise click.ClickException(f"--accelerate-config {path}: not a YAML mapping")
    return data


def _conf_int(conf: dict, key: str, path: str) -> int:
    value = conf.get(key) or 1
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit():
        raise click.ClickException(f"--accelerate-config {path}: {key} must be a whole number (got {value!r})")
    return int(value)


def _check_endpoint(endpoint: str) -> None:
    """An endpoint ZeroMQ cannot connect to (a port that is not a number, say) is refused before anything starts."""
    import zmq

    from shared.protocol import Subscriber
    try:
        Subscriber(endpoint).close()
    except zmq.ZMQError as e:
        raise click.ClickException(f"--endpoint {endpoint!r}: {e}") from None


def _cuda_devices() -> int:
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken torch install: the trainer will say what is wrong
        return 0


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--cache-dir", default="cache", show_default=True, help="Chunk cache folder (packerd writes, trainerd reads).")
@click.option("--run-dir", default="runs", show_default=True, help="Checkpoints and logs of the trainer.")
@click.option("--source", "sources", multiple=True, metavar="SRC",
              help=f"packerd source: hf:NAME[:CONFIG[:SPLIT]], a local file/folder/glob, or {' or '.join(EMBEDDED)} "
                   f"(default {DEFAULT_SOURCE}). Repeatable.")
@click.option("--tokenizer", default="builtin:bpe", show_default=True, help="Hub name, local folder, or builtin:bpe.")
@click.option("--seq-len", type=int, help=f"Tokens per sequence (default {EMBEDDED_SEQ_LEN} for a builtin source, else packerd's 512).")
@click.option("--chunk-sequences", type=int,
              help=f"Sequences per chunk (default {EMBEDDED_CHUNK_SEQUENCES} for a builtin source, else packerd's 1024).")
@click.option("--workers", type=int, help="packerd tokenizer threads (default: one per core).")
@click.option("--model", default="tiny", show_default=True, help="Model preset (trainerd's model.preset).",
              type=click.Choice(tuple(PRESETS)))
@click.option("--processes", type=int,
              help="Trainer processes (ranks): default the GPU count, or 2 on the CPU (one thread each).")
@click.option("--accelerate-config", type=click.Path(exists=True, dir_okay=False),
              help="accelerate config file, e.g. launch/gpu-ddp.yaml (default: flags from --processes).")
@click.option("--endpoint", default=DEFAULT_ENDPOINT, show_default=True, help="ZeroMQ endpoint (tcp:// or ipc://).")
@click.option("--stop-timeout", default=120.0, show_default=True, type=float,
              help="Seconds to wait for both to stop on Ctrl-C before SIGKILL.")
@click.argument("trainer_args", nargs=-1, type=click.UNPROCESSED)
def main(cache_dir, run_dir, sources, tokenizer, seq_len, chunk_sequences, workers, model, processes,
         accelerate_config, endpoint, stop_timeout, trainer_args) -> None:
    """Run packerd and trainerd together: pack a corpus into CACHE_DIR while training on it.

    Trainer flags go after `--` (python -m trainerd --help lists them), e.g.
    `packtrain -- --max-steps 200 --micro-batch-size 16`. Ctrl-C stops both; the trainer saves first.

    \b
      packtrain                                       # offline: stdlib, builtin BPE, tiny model, CPU
      packtrain --source hf:HuggingFaceFW/fineweb-edu:sample-10BT --tokenizer gpt2 --model 124m
      packtrain --accelerate-config launch/cpu-2ranks.yaml
    """
    sources = list(sources) or [DEFAULT_SOURCE]
    embedded = EMBEDDED.get(sources[0]) if len(sources) == 1 else None
    if processes is not None and processes < 1:
        raise click.ClickException(f"--processes must be at least 1 (got {processes})")
    if not endpoint.startswith(("tcp://", "ipc://")):
        raise click.ClickException(f"--endpoint must start with tcp:// or ipc:// (got {endpoint!r})")
    _check_endpoint(endpoint)
    if seq_len is None and embedded:
        seq_len = EMBEDDED_SEQ_LEN
    if chunk_sequences is None and embedded:
        chunk_sequences = EMBEDDED_CHUNK_SEQUENCES

    py = sys.executable  # so that a virtual environment's python runs both
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    packer_argv = [py, "-m", "packerd", "run", "--cache-dir", cache_dir, "--tokenizer", tokenizer, "--endpoint", endpoint]
    for s in sources:
        packer_argv += ["--source", s]
    for flag, value in (("--seq-len", seq_len), ("--chunk-sequences", chunk_sequences), ("--workers", workers)):
        if value is not None:
            packer_argv += [flag, str(value)]
    packer_argv += embedded[0] if embedded else []

    launch_argv = [py, "-m", "accelerate.commands.launch"]
    gpus = _cuda_devices()
    if accelerate_config:
        launch_argv += ["--config_file", accelerate_config]
        conf = _read_accelerate_config(accelerate_config)
        n = processes or _conf_int(conf, "num_processes", accelerate_config)
        if processes is not None:
            launch_argv += ["--num_processes", str(processes)]
        if _conf_int(conf, "num_machines", accelerate_config) == 1 and not conf.get("main_process_port"):
            launch_argv += ["--main_process_port", str(_free_port())]  # two runs on one machine do not collide
    else:
        # the CPU default: 2 ranks of one thread each beat one process of 2 threads on 2 cores (see above)
        n = processes or (gpus if gpus else min(2, os.cpu_count() or 1))
        launch_argv += ["--num_processes", str(n), "--num_machines", "1", "--mixed_precision", "no",
                        "--dynamo_backend", "no"]
        if n > 1:
            # on the CPU too: trainerd passes Accelerator(cpu=True) without CUDA, and the ranks use gloo
            launch_argv += ["--multi_gpu", "--main_process_port", str(_free_port())]
    # the accelerate flags a resume of the trainer alone needs (none for one process), less the one-off port
    resume_flags = [] if n == 1 and not accelerate_config else \
        [a for i, a in enumerate(launch_argv[3:], 3) if "--main_process_port" not in (a, launch_argv[i - 1])]
    if not gpus and n > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    trainer_argv = launch_argv + ["-m", "trainerd", "--cache-dir", cache_dir, "--run-dir", run_dir,
                                  "--endpoint", endpoint, "--model", model]
    if embedded:
        trainer_argv += embedded[1] + ["--micro-batch-size", str(max(1, EMBEDDED_GLOBAL_BATCH // n))]
    trainer_argv += list(trainer_args)  # after the defaults: the last value of a flag wins

    sup = Supervisor(stop_timeout)
    if _libc is not None:
        _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans of our children come to us, to be collected
    old = {s: signal.signal(s, sup.on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    error = None
    try:
        error = _run(sup, packer_argv, trainer_argv, env, endpoint)
    finally:
        left = sup.sweep()
        for s, h in old.items():
            signal.signal(s, h)
    if left:
        error = error or f"processes {left} could not be stopped"
    if sup.trainer is not None:
        print_summary(run_dir, ["packtrain", *sys.argv[1:]], resume_flags)
    if error:
        raise click.ClickException(error)


def _wait_for_packer(sup: Supervisor, packer: Child, endpoint: str) -> tuple[bool, str | None]:
    """Wait until the packer publishes (any message: a heartbeat comes every second) or has exited 0 (its
    cache was finished). Returns (stopped, error): stopped when the packer failed or a signal came first."""
    from shared.protocol import Subscriber
    sub = Subscriber(endpoint)
    try:
        t0 = time.monotonic()
        said = False
        while True:
            sup.track()
            if sup.signals:
                sup.shutdown()
                return True, (None if packer.poll() in (0, -signal.SIGTERM) else
                              _failure(packer, packer.poll(), " while stopping"))
            if sub.poll(200):
                _say(f"packerd is publishing on {endpoint}")
                return False, None
            rc = packer.poll()
            if rc == 0:
                _say("packerd exited 0 before its endpoint answered (the cache was already finished)")
                return False, None
            if rc is not None:
                packer.reader.join(timeout=5)
                return True, _failure(packer, rc)
            if not said and time.monotonic() - t0 > 10:
                _say(f"waiting for packerd to publish on {endpoint}")
                said = True
    finally:
        sub.close()


def _run(sup: Supervisor, packer_argv, trainer_argv, env, endpoint) -> str | None:
    """Start and watch both; returns None on success, else the one-line error."""
    # 1. the packer
    _say("starting: " + " ".join(shlex.quote(a) for a in packer_argv[1:]))
    sup.packer = packer = Child("packerd", "[packerd] ", packer_argv, env)
    _say(f"packerd pid {packer.pid}")

    # 2. wait for its endpoint
    stopped, error = _wait_for_packer(sup, packer, endpoint)
    if stopped:
        return error

    # 3. the trainer
    _say("starting: " + " ".join(shlex.quote(a) for a in trainer_argv[1:]))
    sup.trainer = trainer = Child("trainer", "[trainer] ", trainer_argv, env)
    _say(f"trainer (accelerate launch) pid {trainer.pid}")

    # 4. watch both
    packer_done = packer.poll() == 0  # already said above
    while True:
        sup.track()
        if sup.signals:
            _say(f"signal {signal.Signals(sup.signals[0]).name}: stopping the trainer (it saves a checkpoint) "
                 f"and packerd; Ctrl-C again kills both")
            sup.shutdown()
            trc, prc = trainer.poll(), packer.poll()
            if trc is None or prc is None:
                return "killed after --stop-timeout: packerd or the trainer did not stop in time"
            if trc != 0 and sup.trainer_stop_clean:
                return _failure(trainer, trc, " while stopping")
            if prc not in (0, -signal.SIGTERM):
                return _failure(packer, prc)
            _say("stopped")
            return None
        prc = packer.poll()
        if prc is not None and not packer_done:
            packer_done = True
            if prc != 0:
                packer.reader.join(timeout=5)
                _say(f"packerd {_status(prc)}: stopping the trainer (it saves a checkpoint)")
                sup.shutdown()
                return _failure(packer, prc)
            _say("packerd finished the cache (exit 0); the trainer goes on")
        trc = trainer.poll()
        if trc is not None:
            trainer.reader.join(timeout=5)
            if packer.poll() is None:
                _say("the trainer ended: stopping packerd")
                sup.stop_packer()
                if not sup.wait_all(sup.stop_timeout):
                    sup.kill_everything()
            if trc != 0:
                return _failure(trainer, trc)
            prc = packer.poll()
            if prc not in (0, -signal.SIGTERM):
                return _failure(packer, prc)
            _say("done")
            return None
        sup.sleep(0.2)


if __name__ == "__main__":
    main(prog_name="packtrain")
