"""Faults injected into the real processes (packerd, `python -m trainerd`, `accelerate launch -m trainerd`, ZeroMQ),
and the promise checked after each: a crash costs at most the last checkpoint, no token is lost or seen twice.

    item 1  packerd SIGKILLed at 20 random instants (slow)              test_packerd_survives_20_random_kill_9s
    item 2  trainerd SIGKILLed at 10 random instants, some in a save    test_trainerd_survives_10_random_kill_9s
            (slow)
    item 3  packer restarted while trainers run; a late subscriber;    test_plan_follows_a_restarted_packer_late_and_deaf
            dropped notifications; a trainer after the packer finished  (slow); a cache rebuilt (--force-rebuild)
                                                                        under a trainer: test_a_cache_rebuilt_under_a_running_trainer_is_one_error
    item 4  foreign and forged messages on the endpoint                 test_foreign_messages_while_training
    item 5  a flipped byte in each of N chunks                          test_flipped_bytes_are_never_trained_on
    item 6  disk full while checkpointing (tmpfs)                       test_disk_full_* (+ resume, slow)
            disk full while packing, then room again (slow)             test_packer_disk_full_then_room_again_...
    item 7  two packers on one cache; two trainers on one run           test_second_packer_refuses, the foreign
                                                                        messages test (a second trainer), and
                                                                        test_second_trainer_refuses_a_two_rank_run (slow)
    item 8  packerd SIGKILLed mid-append to the manifest's commit log   test_packerd_killed_mid_append_leaves_a_torn_record_
                                                                        that_nobody_reads
    security  pickles with code refused, names never paths, loopback by default, the umask kept

Random instants come from FAULTS_SEED (printed in every assertion message and in the report); set it to
replay a run. With FAULTS_REPORT=FILE each test appends JSON records that bench/faults.py turns into the
README's Reliability table.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
from click.testing import CliRunner

from conftest import ROOT, free_port, run_packerd, write_jsonl
from shared.cache import open_cache
from shared.manifest import load_manifest
from shared.protocol import DEFAULT_ENDPOINT, PROTOCOL_VERSION, encode

SEED = int(os.environ.get("FAULTS_SEED", random.SystemRandom().randrange(1 << 30)))

# a tiny deterministic model: hidden 32, 2 layers; global batch 8 sequences of 64 tokens
TINY = ["--model", "tiny", "--hidden-size", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2",
        "--micro-batch-size", "4", "--grad-accum", "2", "--threads", "1", "--deterministic", "--log-every", "1000"]
TINY_2RANKS = ["--model", "tiny", "--hidden-size", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2",
               "--micro-batch-size", "2", "--grad-accum", "2", "--threads", "1", "--deterministic", "--log-every", "1000"]
G = 8


# ---- helpers -------------------------------------------------------------------------------------------------
def record(**fields) -> None:
    """Append one result record for bench/faults.py (only when FAULTS_REPORT names a file)."""
    path = os.environ.get("FAULTS_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"seed": SEED, **fields}) + "\n")


def partial_copy(small_cache: Path, tmp_path: Path, chunks: int) -> tuple:
    """(full manifest, folder): the cache's chunk files hard-linked into tmp_path/part under a manifest that lists
    only the first `chunks` and is not finished, as if the packer were still running; saving the full manifest
    there later "commits" the rest."""
    full = load_manifest(small_cache)
    part = tmp_path / "part"
    part.mkdir()
    for e in full.chunks:
        os.link(small_cache / e.file, part / e.file)
    head = load_manifest(small_cache)
    head.chunks, head.finished = head.chunks[:chunks], False
    head.save(part)
    return full, part


def endpoint(tmp_path: Path, name: str = "p") -> str:
    """An ipc:// endpoint in tmp_path, or in a short /tmp folder when that path is too long for a socket."""
    p = f"{tmp_path}/{name}.sock"
    if len(p) > 100:
        p = f"{tempfile.mkdtemp(prefix='ep', dir='/tmp')}/{name}.sock"
    return f"ipc://{p}"


def child_env(fault: str | None = None, hf_home: Path | None = None) -> dict:
    env = dict(os.environ)
    env.pop("TRAINERD_FAULT", None)
    if fault:
        env["TRAINERD_FAULT"] = fault
    if hf_home:
        env["HF_HOME"] = str(hf_home)  # no user accelerate config
    return env


def start(cmd: list, out: Path, env: dict | None = None, umask: int | None = None) -> subprocess.Popen:
    """A real process, its stdout and stderr to the file `out` (no pipe to fill up)."""
    f = open(out, "w")
    pre = (lambda: os.umask(umask)) if umask is not None else None
    p = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env or child_env(),
                         preexec_fn=pre)
    f.close()
    p.out_path = out
    return p


def output(p: subprocess.Popen) -> str:
    return Path(p.out_path).read_text(errors="replace")


def trainerd(cache, runs, ep, *args) -> list:
    return [sys.executable, "-m", "trainerd", "--cache-dir", cache, "--run-dir", runs, "--endpoint", ep, *TINY, *args]


def launch_2ranks(cache, runs, ep, *args) -> list:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), "-m", "trainerd", "--cache-dir", cache, "--run-dir", runs,
            "--endpoint", ep, *TINY_2RANKS, *args]


def packerd(cache, src, tok, ep, *args, chunk_sequences: int = 16) -> list:
    return [sys.executable, "-m", "packerd", "run", "--cache-dir", cache, "--source", src, "--tokenizer", tok,
            "--seq-len", "64", "--chunk-sequences", str(chunk_sequences), "--workers", "1", "--endpoint", ep, *args]


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def run_log(runs: Path, run: str, k: int = 1) -> list[dict]:
    return read_jsonl(runs / "training_logs" / f"{run}_run_{k}.jsonl")


def run_logs(runs: Path, run: str) -> dict[int, list[dict]]:
    out, k = {}, 1
    while (runs / "training_logs" / f"{run}_run_{k}.jsonl").exists():
        out[k] = run_log(runs, run, k)
        k += 1
    return out


def steps(recs) -> dict[int, dict]:
    return {r["step"]: r for r in recs if "event" not in r}


def events(recs, name) -> list[dict]:
    return [r for r in recs if r.get("event") == name]


def traces(runs: Path, run: str, k: int = 1, ranks: int = 1) -> list[dict[int, list]]:
    return [{r["step"]: [tuple(x) for x in r["seq_ids"]]
             for r in read_jsonl(runs / "training_logs" / f"{run}_run_{k}.rank{rank}.data.jsonl")} for rank in range(ranks)]


def wait_for(cond, what: str, procs=(), timeout: float = 180.0, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{what}: {p.args[:4]} exited {p.returncode} first (seed {SEED}):\n{output(p)[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (seed {SEED})")
        time.sleep(poll)


def finish(p: subprocess.Popen, timeout: float = 300) -> str:
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise AssertionError(f"{p.args[:4]} did not finish in {timeout} s (seed {SEED}):\n{output(p)[-3000:]}")
    return output(p)


def kill_all(*procs) -> None:
    for p in procs:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()


def complete_checkpoints(runs: Path, run: str) -> list[int]:
    """Steps of the complete checkpoints of `run` (meta.json written last; every file of it present and sized)."""
    from trainerd import checkpoint as ck
    from trainerd.rundir import RunDir
    out = []
    for c in RunDir(runs).checkpoints(run, complete=True):
        ck.check_files(c.path, c.meta)
        out.append(c.step)
    return sorted(out)


def manifest_of(cache: Path):
    return load_manifest(cache) if (cache / "manifest.json").exists() else None


def reference_documents(texts, tokenizer_dir) -> list[np.ndarray]:
    """Each non-empty source document tokenized on its own with EOS appended: what the cache must hold once."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = tok([t for t in texts if t], add_special_tokens=False)["input_ids"]
    return [np.array(x + [tok.eos_token_id]) for x in ids]


def documents_lost_or_doubled(cache: Path, texts, tokenizer_dir) -> int:
    """0 when the cache holds every source document exactly once, in order; else how many differ."""
    docs = list(open_cache(cache).iter_documents())
    ref = reference_documents(texts, tokenizer_dir)
    differ = sum(1 for a, b in zip(docs, ref) if not np.array_equal(a, b))
    return differ + abs(len(docs) - len(ref))


def pack_small(tmp: Path, texts, tok, name: str = "cache") -> Path:
    src = write_jsonl(tmp / f"{name}.jsonl", texts)
    run_packerd("run", "--cache-dir", tmp / name, "--source", src, "--tokenizer", tok, "--seq-len", 64,
                "--chunk-sequences", 16, "--workers", 1, "--endpoint", endpoint(tmp, "pack"))
    return tmp / name


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory, corpus_texts, tokenizer_dir) -> Path:
    """12 documents: 18 chunks of 16 sequences of 64 tokens, 36 optimizer steps of 8 sequences."""
    return pack_small(tmp_path_factory.mktemp("small"), corpus_texts[:12], tokenizer_dir)


# ---- item 4 (+ item 7, trainers; + security: the umask): foreign messages while a trainer runs -----------------
def _foreign(rng: random.Random, seq: int) -> list[tuple[str, bytes]]:
    chunk = {"v": PROTOCOL_VERSION, "type": "chunk", "run": "forged", "seq": seq, "chunk_id": 7, "sequences": 16,
             "tokens": 1024, "total_sequences": 1, "total_tokens": 1, "est_total_sequences": 1, "committed_at": time.time()}
    msgs = [("random bytes", os.urandom(rng.randint(1, 300))),
            ("empty frame", b""),
            ("msgpack, not a map", msgpack.packb([1, 2, 3])),
            ("map with int keys", msgpack.packb({1: 2})),
            ("wrong version", msgpack.packb({**chunk, "v": 2})),
            ("unknown type", msgpack.packb({"v": 1, "type": "shutdown", "run": "forged", "seq": seq})),
            ("wrong field type", msgpack.packb({**chunk, "chunk_id": "7"})),
            ("bool for an int", msgpack.packb({**chunk, "sequences": True})),
            ("missing field", msgpack.packb({k: v for k, v in chunk.items() if k != "committed_at"}))]
    if seq % 10 == 0:
        msgs.append(("1 MB of random bytes", os.urandom(1 << 20)))
    return msgs


def _forged(seq: int) -> list[tuple[str, bytes]]:
    """Valid messages that lie: a chunk that does not exist, and 'finished' for a cache that is not."""
    return [("forged chunk", encode({"v": PROTOCOL_VERSION, "type": "chunk", "run": "forged", "seq": 2 * seq,
                                     "chunk_id": 1_000_000, "sequences": 16, "tokens": 1024, "total_sequences": 10**9,
                                     "total_tokens": 10**12, "est_total_sequences": 10**9, "committed_at": time.time()})),
            ("forged finished", encode({"v": PROTOCOL_VERSION, "type": "finished", "run": "forged", "seq": 2 * seq + 1,
                                        "total_sequences": 8, "total_tokens": 512}))]


def snapshot(root: Path, skip: tuple[str, ...] = ()) -> dict:
    """Paths under root with size and time; the files named in `skip` (a running trainer's own log) by name only."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in filenames:
            p = Path(dirpath) / n
            st = p.lstat()
            rel = str(p.relative_to(root))
            out[rel] = () if rel in skip else (st.st_size, st.st_mtime_ns)
        for n in dirnames:
            out[str((Path(dirpath) / n).relative_to(root)) + "/"] = ()
    return out


def test_foreign_messages_while_training(tmp_path, small_cache):
    """A trainer follows an unfinished cache while garbage (random bytes, wrong version, wrong field types, a
    1 MB blob) and forged valid messages (a chunk that does not exist, 'finished' for an unfinished cache) arrive
    on its endpoint: each foreign one is ignored with a warning, the forged ones only make it re-read the
    manifest, which stays the truth. A second trainer on the same run refuses and writes nothing. When the cache
    is finished the trainer ends normally with the plan of the whole cache, its files following the umask."""
    full, part = partial_copy(small_cache, tmp_path, len(load_manifest(small_cache).chunks) // 2)
    m = load_manifest(part)  # the half the trainer sees first

    ep = endpoint(tmp_path)
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(ep)
    stop = threading.Event()
    sent = {"foreign": 0, "forged": 0}
    kinds: set[str] = set()

    def spam():
        rng, seq = random.Random(SEED), 0
        while not stop.is_set():
            for kind, data in _foreign(rng, seq):
                pub.send(data)
                sent["foreign"] += 1
                kinds.add(kind)
            for kind, data in _forged(seq):
                pub.send(data)
                sent["forged"] += 1
                kinds.add(kind)
            seq += 1
            stop.wait(0.1)

    runs = tmp_path / "runs"
    trainer = start(trainerd(part, runs, ep, "--new", "fm", "--checkpoint-every", "0",
                             "--set", "data.reconcile_seconds=0.5", "--set", "log.data_trace=true"),
                    tmp_path / "trainer.out", umask=0o027)
    spammer = threading.Thread(target=spam, daemon=True)
    spammer.start()
    ok = False
    try:
        log = lambda: run_log(runs, "fm")  # noqa: E731
        # it trains on the half it knows, catches up and waits; the garbage and the forged messages reach it
        wait_for(lambda: events(log(), "waiting") and "ignored a message" in output(trainer)
                 and any(e.get("chunk_id") == 1_000_000 for e in events(log(), "notified")),
                 "the trainer to wait for data while hearing foreign messages", [trainer])
        time.sleep(0.5)  # forged 'finished' messages have had time to end it, if they could
        assert trainer.poll() is None, "a forged message ended the trainer:\n" + output(trainer)[-3000:]
        assert max(steps(log())) == sum(e.sequences for e in m.chunks) // G

        # item 7: a second trainer on the same run refuses at once (before torch loads) and writes nothing
        from trainerd.__main__ import main as trainerd_main
        mine = ("training_logs/fm_run_1.jsonl",)   # the running trainer's log: it grows with every forged message
        before = snapshot(runs, mine)
        r = CliRunner().invoke(trainerd_main, ["--cache-dir", str(part), "--run-dir", str(runs), "--new", "fm",
                                               "--endpoint", endpoint(tmp_path, "other")])
        assert r.exit_code == 1 and r.output.strip().splitlines() == [r.output.strip()], r.output
        assert r.output.startswith("Error: another trainer is running run fm"), r.output
        assert snapshot(runs, mine) == before

        # the packer 'finishes' the cache: the trainer goes on and ends normally
        full.save(part)
        out = finish(trainer, timeout=240)
        assert trainer.returncode == 0, out[-4000:]
        ok = True
    finally:
        stop.set()
        spammer.join(timeout=5)
        pub.close(0)
        kill_all(trainer)
        n = sent["foreign"] + sent["forged"]
        record(kind="fault", item="4", name=f"foreign and forged messages on the endpoint while training "
                                            f"({len(kinds)} kinds, {n} messages)",
               injected=len(kinds), survived=len(kinds) if ok else 0, data_lost=0 if ok else None, messages=n)
        record(kind="fault", item="7", name="a second trainer on a running run", injected=1, survived=int(ok),
               data_lost=0 if ok else None)

    assert "Traceback" not in out
    ignored = [l for l in out.splitlines() if "ignored a message" in l]
    assert ignored and all("WARNING" in l for l in ignored)
    recs = log()
    total = full.total_sequences // G
    assert sorted(steps(recs)) == list(range(1, total + 1))
    final_plan = [e for e in recs if e.get("event") in ("plan", "plan_expanded")][-1]
    assert final_plan["finished"] and final_plan["chunks"] == len(full.chunks) and final_plan["total_steps"] == total
    assert events(recs, "finished")
    seen = [x for s in traces(runs, "fm")[0].values() for x in s]
    assert len(seen) == len(set(seen)) == total * G            # every sequence at most once, none invented
    assert max(c for c, _ in seen) < len(full.chunks)
    # security: everything the trainer created follows the umask (027): nothing group- or world-writable
    for p in runs.rglob("*"):
        mode = p.stat().st_mode & 0o777
        assert mode & 0o027 == 0, f"{p} has mode {oct(mode)} under umask 027"


def test_a_forged_non_finite_time_keeps_the_log_json(tmp_path, small_cache):
    """A schema-valid chunk message whose committed_at is NaN or infinite: the follower's events (which the
    trainer logs as they are) must still serialize as strict JSON."""
    from trainerd.follow import CacheFollower
    ep = endpoint(tmp_path)
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(ep)
    follower = CacheFollower(small_cache, ep, reconcile_seconds=1e6)
    got = []
    try:
        deadline = time.monotonic() + 20
        heard = lambda: len([e for e in got if e["event"] == "notified"]) + follower.sub.ignored  # noqa: E731
        while time.monotonic() < deadline and heard() < 2:
            for seq, when in enumerate((float("nan"), float("inf"))):
                pub.send(msgpack.packb({"v": PROTOCOL_VERSION, "type": "chunk", "run": "forged", "seq": seq, "chunk_id": 10**6,
                                 "sequences": 1, "tokens": 1, "total_sequences": 1, "total_tokens": 1,
                                 "est_total_sequences": 1, "committed_at": when}))
            got += follower.poll(50).events
        assert heard() >= 2, "the messages never arrived"
    finally:
        follower.close()
        pub.close(0)
    for e in got:   # notified (with a finite latency) or ignored with a warning: both keep the log JSON
        json.dumps(e, allow_nan=False)   # raises ValueError on NaN or infinity


# ---- item 5: a flipped byte in each of N chunks -----------------------------------------------------------------
def _flip_bytes(cache: Path, n: int, rng: np.random.Generator) -> dict[int, int]:
    m = load_manifest(cache)
    bad = sorted(int(c) for c in rng.choice(len(m.chunks), size=n, replace=False))
    where = {}
    for c in bad:
        p = cache / m.chunks[c].file
        data = bytearray(p.read_bytes())
        i = int(rng.integers(0, len(data)))
        data[i] ^= int(rng.integers(1, 256))
        p.write_bytes(bytes(data))
        where[c] = i
    return where


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.slow)], ids=["1rank", "2ranks"])
def test_flipped_bytes_are_never_trained_on(tmp_path, small_cache, ranks):
    """One byte flipped at a random offset (header, lengths, document starts or payload) in each of 5 random
    chunks: the trainer detects every one before training on it (a corrupt_chunk event, the file quarantined),
    no sequence of those chunks is in any step's data, and the run ends with its planned steps."""
    cache = tmp_path / "cache"
    shutil.copytree(small_cache, cache)
    rng = np.random.default_rng(SEED)
    flipped = _flip_bytes(cache, 5, rng)
    runs, ep = tmp_path / "runs", endpoint(tmp_path)
    if ranks == 1:
        cmd = trainerd(cache, runs, ep, "--new", "fb", "--checkpoint-every", "0", "--set", "log.data_trace=true")
    else:
        cmd = launch_2ranks(cache, runs, ep, "--new", "fb", "--checkpoint-every", "0", "--set", "log.data_trace=true")
    p = start(cmd, tmp_path / "trainer.out", env=child_env(hf_home=tmp_path / "hf"))
    out = finish(p)
    recs = run_log(runs, "fb")
    found = {e["chunk_id"] for e in events(recs, "corrupt_chunk")}
    assert len(events(recs, "corrupt_chunk")) == len(found)  # once each, whichever rank met it first
    # each logged event is the one of the rank that quarantined the file (a later rank finds it gone)
    assert all(e["quarantined"] and e["rank"] in range(ranks) for e in events(recs, "corrupt_chunk")), \
        events(recs, "corrupt_chunk")
    trained = {c for tr in traces(runs, "fb", ranks=ranks) for seqs in tr.values() for c, _ in seqs}
    ok = p.returncode == 0 and found == set(flipped) and not (trained & set(flipped))
    record(kind="fault", item="5", name=f"a flipped byte in each of 5 chunks ({ranks} rank(s))", injected=len(flipped),
           survived=len(found & set(flipped) - trained), data_lost=0 if ok else None)
    assert p.returncode == 0, out[-4000:]
    assert found == set(flipped), f"flipped {flipped} (chunk: byte offset), detected {sorted(found)} (seed {SEED})"
    assert not trained & set(flipped), f"trained on corrupt chunks {sorted(trained & set(flipped))} (seed {SEED})"
    quarantined = sorted(int(q.name.split(".")[0].split("-")[1]) for q in (cache / "quarantine").iterdir())
    assert sorted(set(quarantined)) == sorted(flipped)
    total = load_manifest(cache).total_sequences // G
    assert sorted(steps(recs)) == list(range(1, total + 1))
    assert "Traceback" not in out and "is corrupt" in out


# ---- item 6: disk full while checkpointing ----------------------------------------------------------------------
def _mount_tmpfs(path: Path, size: str) -> str | None:
    path.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    return None if p.returncode == 0 else (p.stderr.strip() or f"mount exited {p.returncode}")


@pytest.fixture(scope="module")
def disk_full(tmp_path_factory, small_cache):
    """A trainer whose run folder is a 900 KB tmpfs: the checkpoint of step 4 (about 600 KB) fits, the one of
    step 8 does not."""
    tmp = tmp_path_factory.mktemp("diskfull")
    mnt = tmp / "small"
    why = _mount_tmpfs(mnt, "900k")
    if why:
        pytest.skip(f"cannot mount a small tmpfs here ({why}); needs root")
    try:
        runs = mnt / "runs"
        p = start(trainerd(small_cache, runs, endpoint(tmp), "--new", "df", "--max-steps", "12", "--checkpoint-every", "4"),
                  tmp / "trainer.out")
        out = finish(p)
        yield {"runs": runs, "rc": p.returncode, "out": out, "tmp": tmp, "log": run_log(runs, "df")}
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_keeps_the_previous_checkpoint(disk_full):
    """The save of step 8 hits a full disk: the process stops with a non-zero exit; the checkpoint of step 4 is
    intact (`ckpt verify` passes), no half-written folder is left, and the log holds every step trained."""
    from trainerd.admin import cli as ckpt
    runs = disk_full["runs"]
    ok = False
    try:
        assert disk_full["rc"] not in (0, None) and disk_full["rc"] > 0, disk_full["out"][-3000:]
        assert complete_checkpoints(runs, "df") == [4]
        assert not [d for d in os.listdir(runs / "checkpoints") if d.startswith(".tmp-")]
        r = CliRunner().invoke(ckpt, ["verify", "--run-dir", str(runs), "df-step00000004"])
        assert r.exit_code == 0 and r.output.strip().endswith("df-step00000004: ok"), r.output
        assert sorted(steps(disk_full["log"])) == list(range(1, 9))
        ok = True
    finally:
        record(kind="fault", item="6", name="disk full while checkpointing", injected=1, survived=int(ok),
               data_lost=0 if ok else None)


def test_disk_full_is_a_one_line_error(disk_full):
    out = disk_full["out"]
    assert "Traceback" not in out, out[-2000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("Error:") and ("disk full" in last or "No space" in last), last


@pytest.mark.slow
def test_disk_full_then_resume_from_the_intact_checkpoint(disk_full, small_cache):
    """After the full disk, the intact checkpoint of step 4 resumes (on a disk with room) and the run ends."""
    runs = disk_full["tmp"] / "runs_copy"
    shutil.copytree(disk_full["runs"], runs)
    p = start(trainerd(small_cache, runs, endpoint(disk_full["tmp"], "r"), "--resume", "df"), disk_full["tmp"] / "resume.out")
    out = finish(p)
    assert p.returncode == 0, out[-3000:]
    recs = run_log(runs, "df", 2)
    assert events(recs, "resumed")[0]["step"] == 4 and sorted(steps(recs)) == list(range(5, 13))


@pytest.mark.slow
def test_packer_disk_full_then_room_again_continues_exactly_once(tmp_path, corpus_texts, tokenizer_dir):
    """packerd fills a 200 KB tmpfs: one Error line and exit 1, what was committed verifies; the folder is given
    room (remounted at 4 MB) and the same command continues: every document exactly once, nothing twice."""
    mnt = tmp_path / "small"
    why = _mount_tmpfs(mnt, "200k")
    if why:
        pytest.skip(f"cannot mount a small tmpfs here ({why}); needs root")
    ok, lost = False, None
    try:
        src = tmp_path / "src"
        src.mkdir()
        texts = [f"copy {k}: {t}" for k in range(2) for t in corpus_texts]
        write_jsonl(src / "a.jsonl", texts)
        cache, ep = mnt / "cache", endpoint(tmp_path)
        cmd = packerd(cache, src, tokenizer_dir, ep)[3:]
        p = run_packerd(*cmd, check=False)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and "Traceback" not in p.stderr and lines[-1].startswith("Error:"), p.stderr[-2000:]
        assert "disk full" in lines[-1]
        committed = len(load_manifest(cache).chunks)
        assert committed and run_packerd("verify", "--cache-dir", cache).returncode == 0
        r = subprocess.run(["mount", "-o", "remount,size=4m", str(mnt)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        run_packerd(*cmd)
        m = load_manifest(cache)
        assert m.finished and len(m.chunks) > committed
        assert run_packerd("verify", "--cache-dir", cache).returncode == 0
        lost = documents_lost_or_doubled(cache, texts, tokenizer_dir)
        assert lost == 0
        ok = True
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        record(kind="fault", item="6", name="disk full while packing, then room again", injected=1, survived=int(ok),
               data_lost=lost)


@pytest.mark.slow
def test_disk_full_while_logging_is_a_one_line_error(tmp_path, small_cache):
    """The run folder fills up while the trainer appends its training log (no checkpoint in between): one Error
    line naming the full disk, exit 1."""
    mnt = tmp_path / "small"
    why = _mount_tmpfs(mnt, "256k")
    if why:
        pytest.skip(f"cannot mount a small tmpfs here ({why}); needs root")
    try:
        (mnt / "filler").write_bytes(b"\0" * (256 - 48) * 1024)   # about 48 KB left: some 250 log lines
        p = start(trainerd(small_cache, mnt / "runs", endpoint(tmp_path), "--new", "lg", "--checkpoint-every", "0",
                           "--target-epochs", "30"), tmp_path / "t.out")
        out = finish(p)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    last = out.strip().splitlines()[-1] if out.strip() else ""
    ok = p.returncode == 1 and "Traceback" not in out and last.startswith("Error:") and "disk full" in last
    record(kind="fault", item="6", name="disk full while the trainer appends its log", injected=1, survived=int(ok),
           data_lost=0 if ok else None)
    assert p.returncode == 1 and "Traceback" not in out, out[-2500:]
    assert last.startswith("Error:") and ("disk full" in last or "No space" in last), last


# ---- item 7: two packers on one cache (real processes) ----------------------------------------------------------
def test_second_packer_refuses(tmp_path, corpus_texts, tokenizer_dir):
    """A packer in --follow mode owns the cache; a second real packerd on it exits 1 with one Error line and
    changes nothing; the first still stops cleanly."""
    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "a.jsonl", corpus_texts[:5])
    cache, ep = tmp_path / "cache", endpoint(tmp_path)
    first = start(packerd(cache, src, tokenizer_dir, ep, "--follow"), tmp_path / "first.out")
    ok = False
    try:
        wait_for(lambda: (m := manifest_of(cache)) is not None and m.documents >= 4, "the first packer's chunks", [first])
        before = snapshot(cache)
        second = run_packerd(*packerd(cache, src, tokenizer_dir, endpoint(tmp_path, "second"))[3:], check=False)
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert len([l for l in lines if l.startswith("Error")]) == 1 and lines[-1].startswith(
            "Error: another packer is running on this cache"), second.stderr
        assert snapshot(cache) == before
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0, output(first)
        assert run_packerd("verify", "--cache-dir", cache).returncode == 0
        ok = True
    finally:
        kill_all(first)
        record(kind="fault", item="7", name="a second packer on a cache in use", injected=1, survived=int(ok),
               data_lost=0 if ok else None)


# ---- security ---------------------------------------------------------------------------------------------------
class _RunsCode:
    """Unpickling this runs `touch MARKER`: what a checkpoint from an untrusted machine could hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _checkpoint_with_code(tmp: Path, small_cache: Path) -> tuple[Path, Path]:
    import torch
    import xxhash

    from trainerd import checkpoint as ck
    from trainerd.config import load_config
    from trainerd.model import build_model
    m = load_manifest(small_cache)
    cfg = load_config(None, {"data.cache_dir": str(small_cache), "model.hidden_size": 32, "model.num_layers": 2,
                             "model.num_heads": 4, "model.num_kv_heads": 2})
    model = build_model(cfg.model, m.tokenizer["vocab_size"], m.seq_len, m.tokenizer["eos_id"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    d = ck.save_checkpoint(tmp / "runs", "evil-step00000004", model=model, optimizer_state=opt.state_dict(),
                           state={"step": 4}, meta={"run": "evil", "run_id": "x", "step": 4, "time": 1.0},
                           config=cfg.to_dict(), model_config=model.config.to_dict(), tokenizer=m.tokenizer)
    marker = tmp / "code-ran"
    torch.save({"step": 4, "payload": _RunsCode(marker)}, d / "state.pt")
    meta = json.loads((d / "meta.json").read_text())  # an attacker edits meta.json too: sizes and hashes match
    data = (d / "state.pt").read_bytes()
    meta["files"]["state.pt"] = {"bytes": len(data), "xxh64": xxhash.xxh64(data).hexdigest()}
    (d / "meta.json").write_text(json.dumps(meta))
    return d, marker


def test_a_checkpoint_pickle_with_code_is_refused(tmp_path, small_cache):
    """state.pt carrying a pickled os.system call: loading it raises CheckpointError, and no code runs."""
    from trainerd import checkpoint as ck
    d, marker = _checkpoint_with_code(tmp_path, small_cache)
    with pytest.raises(ck.CheckpointError, match="cannot load state.pt"):
        ck.load_torch(d, "state.pt")
    assert not marker.exists()


def test_a_checkpoint_pickle_with_code_is_a_one_line_error(tmp_path, small_cache):
    from trainerd import checkpoint as ck
    d, _ = _checkpoint_with_code(tmp_path, small_cache)
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_torch(d, "state.pt")
    assert "\n" not in str(e.value) and "weights_only` set to `False`" not in str(e.value), str(e.value)


@pytest.mark.slow
def test_resume_from_a_pickle_with_code_runs_no_code(tmp_path, small_cache):
    """The real `trainerd --resume` on that checkpoint: exit 1 with an Error, the code never runs."""
    d, marker = _checkpoint_with_code(tmp_path, small_cache)
    p = start(trainerd(small_cache, tmp_path / "runs", endpoint(tmp_path), "--resume", "evil"), tmp_path / "t.out")
    out = finish(p)
    assert p.returncode == 1 and out.startswith("Error: cannot resume from evil-step00000004"), out[-3000:]
    assert "Traceback" not in out and not marker.exists()


def test_ckpt_clean_never_follows_a_link_out_of_the_run_folder(tmp_path):
    """`ckpt clean --yes` removes leftovers that are symbolic links to folders and files outside the run folder:
    the links go, what they point to stays."""
    from trainerd.admin import cli as ckpt
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "weights.bin").write_bytes(b"keep me")
    (tmp_path / "precious.jsonl").write_text('{"step": 1}\n')
    runs = tmp_path / "runs"
    (runs / "checkpoints").mkdir(parents=True)
    (runs / "training_logs").mkdir()
    os.symlink(outside, runs / "checkpoints" / ".tmp-x-step00000001-123")
    os.symlink(tmp_path / "precious.jsonl", runs / "training_logs" / "gone_run_1.jsonl")
    r = CliRunner().invoke(ckpt, ["clean", "--run-dir", str(runs), "--yes"])
    assert r.exit_code == 0, r.output
    assert (outside / "weights.bin").read_bytes() == b"keep me"
    assert (tmp_path / "precious.jsonl").exists()
    assert not os.path.lexists(runs / "checkpoints" / ".tmp-x-step00000001-123")


def test_endpoints_are_loopback_by_default_and_an_open_one_warns(caplog):
    from packerd.cli import PackerConfig
    from shared.protocol import Publisher, endpoint_is_local
    from trainerd.config import DataConfig
    assert DEFAULT_ENDPOINT.startswith("tcp://127.0.0.1:") and endpoint_is_local(DEFAULT_ENDPOINT)
    assert PackerConfig().endpoint == DEFAULT_ENDPOINT
    # the trainer connects where a cache's manifest says its packer announces, else to the same default
    from types import SimpleNamespace

    from trainerd.mix import resolve_endpoints
    unrecorded = SimpleNamespace(dir=Path("c"), manifest=SimpleNamespace(endpoint=None))
    assert DataConfig().endpoint == [] and resolve_endpoints(DataConfig(), [unrecorded]) == [("c", DEFAULT_ENDPOINT)]
    pub = Publisher(f"tcp://0.0.0.0:{free_port()}", "r")
    pub.close()
    assert any("without encryption" in r.getMessage() and "--curve-dir" in r.getMessage() for r in caplog.records)


# ---- item 1 (slow): packerd SIGKILLed at 20 random instants -----------------------------------------------------
def _cache_state(cache: Path) -> str:
    """Where a kill landed, judged from what it left: a temporary, a chunk file the manifest does not list, or neither."""
    m = manifest_of(cache)
    n = len(m.chunks) if m else 0
    names = os.listdir(cache) if cache.exists() else []
    if any(x.startswith(".tmp-") for x in names):
        return "writing (temporary file left)"
    if any(x.startswith("chunk-") and int(x[6:13]) >= n for x in names):
        return "between chunk and manifest"
    return "tokenizing or idle" if m else "starting (no manifest yet)"


@pytest.mark.slow
def test_packerd_survives_20_random_kill_9s(tmp_path, corpus_texts, tokenizer_dir):
    """20 SIGKILLs of a real packerd, at random instants: some at a random time after start, some just after a
    random commit, some the moment a temporary or uncommitted chunk file appears (between chunk and manifest).
    After each: every chunk the manifest lists is intact and `packerd verify` passes. At the end the cache holds
    every source document exactly once and nothing else."""
    src = tmp_path / "src"
    src.mkdir()
    texts = []
    for k in range(6):
        part = [f"copy {k}: {t}" for t in corpus_texts]
        write_jsonl(src / f"part{k}.jsonl", part)
        texts += part
    cache, ep = tmp_path / "cache", endpoint(tmp_path)
    # paced, so that 20 kills land before it finishes however fast the packer has become (unpaced it packed
    # this cache in under 8 s on this box and sometimes finished after 16)
    cmd = packerd(cache, src, tokenizer_dir, ep, "--max-tokens-per-s", "100000")
    rng = random.Random(SEED)
    modes = ["time"] * 6 + ["commit"] * 7 + ["window"] * 7
    rng.shuffle(modes)
    landed, kills, verified = [], 0, 0
    try:
        for i, mode in enumerate(modes):
            proc = start(cmd, tmp_path / f"packer{i}.out")
            have = len(manifest_of(cache).chunks) if manifest_of(cache) else 0
            t0 = time.monotonic()
            if mode == "time":
                # a random instant, but before 40 more chunks: the whole cache is 1,273 chunks, about 13 s of
                # paced packing, so six delays of up to 4 s could let it finish before 20 kills
                delay, cap = rng.uniform(0.2, 4.0), have + 40
                while time.monotonic() - t0 < delay and proc.poll() is None:
                    m = manifest_of(cache)
                    if m and len(m.chunks) >= cap:
                        break
                    time.sleep(0.01)
            elif mode == "commit":
                target = have + rng.randint(1, 40)
                while proc.poll() is None and time.monotonic() - t0 < 120:
                    m = manifest_of(cache)
                    if m and len(m.chunks) >= target:
                        time.sleep(rng.uniform(0, 0.02))
                        break
                    time.sleep(0.002)
            else:  # the narrow windows: a temporary being written, or a chunk renamed in but not yet in the manifest
                skip = rng.randint(0, 30)
                while proc.poll() is None and time.monotonic() - t0 < 120:
                    try:
                        names = os.listdir(cache)
                    except FileNotFoundError:
                        time.sleep(0.005)
                        continue
                    n = len(manifest_of(cache).chunks) if "manifest.json" in names else 0
                    if any(x.startswith(".tmp-") for x in names) or any(
                            x.startswith("chunk-") and x.endswith(".lz4") and int(x[6:13]) >= n for x in names):
                        if skip == 0:
                            break
                        skip -= 1
            if proc.poll() is not None:
                assert proc.returncode == 0, output(proc)[-3000:]
                break  # it finished before this kill
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            landed.append(_cache_state(cache))
            # no partial chunk visible: the manifest lists only intact chunks, and verify agrees
            m = manifest_of(cache)
            if m is not None:
                c = open_cache(cache)
                for e in m.chunks:
                    c.read_chunk(e.id)  # raises CorruptChunk on anything partial
                for a, b in zip(m.chunks, m.chunks[1:]):
                    assert a.end == b.start, f"chunk {b.id} does not start where {a.id} ended (seed {SEED})"
                assert not m.finished
                v = run_packerd("verify", "--cache-dir", cache, check=False)
                assert v.returncode == 0, f"verify after kill {kills} ({landed[-1]}), seed {SEED}:\n{v.stdout}{v.stderr}"
            verified += 1   # killed before its first commit: nothing is visible to a reader, and the restart starts over
        final = run_packerd(*cmd[3:])
        assert "finished" in final.stderr
        assert run_packerd("verify", "--cache-dir", cache).returncode == 0
        lost = documents_lost_or_doubled(cache, texts, tokenizer_dir)
        m = load_manifest(cache)
        listed = {e.file for e in m.chunks}
        stray = [x for x in os.listdir(cache) if (x.startswith("chunk-") and x not in listed) or x.startswith(".tmp-")]
    finally:
        record(kind="fault", item="1", name="packerd SIGKILL at random instants", injected=kills,
               survived=verified, data_lost=locals().get("lost"), where=landed)
    assert kills == 20, f"only {kills} kills landed before the packer finished (seed {SEED})"
    assert lost == 0 and not stray, (lost, stray, SEED)
    assert m.finished and m.documents == len(texts)


# ---- item 8: packerd SIGKILLed mid-append to the manifest's commit log (a torn record) ----------------------------
def _valid_log_end(cache: Path) -> tuple[int, int]:
    """(offset after the log's last valid record, the log file's size)."""
    from shared.commitlog import LOG_HEADER_SIZE, parse_records
    from shared.manifest import LOG_NAME, read_manifest
    data = (cache / LOG_NAME).read_bytes()
    _, end = parse_records(read_manifest(cache)[1].id, data[LOG_HEADER_SIZE:], LOG_HEADER_SIZE)
    return end, len(data)


def test_packerd_killed_mid_append_leaves_a_torn_record_that_nobody_reads(tmp_path, corpus_texts, tokenizer_dir):
    """4 real packerd runs each SIGKILL themselves in the middle of writing a commit-log record (half of it on
    disk: STREAMPACK_FAULT=torn-append:N, N random). After each: readers (load_manifest, a follower's
    Cache.refresh, `packerd verify`) see exactly the chunks before the torn record; the restart cuts it off
    and goes on. At the end the cache holds every document exactly once and its log no invalid byte."""
    texts = corpus_texts[:12]
    src = write_jsonl(tmp_path / "src.jsonl", texts)
    cache, ep = tmp_path / "cache", endpoint(tmp_path)
    cmd = packerd(cache, src, tokenizer_dir, ep)
    rng = random.Random(SEED)
    kills, survived, follower = 0, 0, None
    try:
        for i in range(4):
            have = len(manifest_of(cache).chunks) if manifest_of(cache) else 0
            n = rng.randint(1, 3)
            proc = start(cmd, tmp_path / f"packer{i}.out", env={**child_env(), "STREAMPACK_FAULT": f"torn-append:{n}"})
            assert proc.wait(timeout=300) == -signal.SIGKILL, output(proc)[-3000:]
            kills += 1
            valid, size = _valid_log_end(cache)
            assert size > valid, f"no torn bytes after kill {kills} (seed {SEED})"
            m = load_manifest(cache)
            # a new cache's first commit is a snapshot, a record each after it; a restart appends from its first
            assert len(m.chunks) == have + (n if i == 0 else n - 1), (i, have, n, SEED)
            if follower is None:
                follower = open_cache(cache)
            else:
                follower.refresh()
            assert [e.checksum for e in follower.chunks] == [e.checksum for e in m.chunks]
            for e in m.chunks:
                follower.read_chunk(e.id)
            assert run_packerd("verify", "--cache-dir", cache).returncode == 0
            survived += 1
        final = run_packerd(*cmd[3:])
        assert "finished" in final.stderr
        assert run_packerd("verify", "--cache-dir", cache).returncode == 0
        lost = documents_lost_or_doubled(cache, texts, tokenizer_dir)
        valid, size = _valid_log_end(cache)
        follower.refresh()
        assert follower.manifest.finished and len(follower.chunks) == len(load_manifest(cache).chunks)
    finally:
        record(kind="fault", item="8", name="packerd SIGKILL mid-append to the manifest log (torn record)",
               injected=kills, survived=survived, data_lost=locals().get("lost"))
    assert lost == 0 and valid == size, (lost, valid, size, SEED)


# ---- item 2 (slow): trainerd SIGKILLed at 10 random instants ----------------------------------------------------
MAX_STEPS, EVERY = 60, 4   # the small cache holds 36 steps: a second epoch (--target-epochs 2) starts at step 37


@pytest.mark.slow
def test_trainerd_survives_10_random_kill_9s(tmp_path, small_cache):
    """10 SIGKILLs of a real `python -m trainerd`: in the middle of a random checkpoint save (the fault hook
    kill-in-save:N), right after a random step (kill-at-step:N), and from outside at a random moment of a
    running trainer. Every restart resumes from the newest complete checkpoint, and every step any of the
    processes logged has the loss, learning rate, token count and sequences of an uninterrupted run, bitwise;
    the final weights are the same."""
    ep = endpoint(tmp_path)
    ref_runs, runs = tmp_path / "ref", tmp_path / "runs"
    flags = ["--max-steps", str(MAX_STEPS), "--checkpoint-every", str(EVERY), "--target-epochs", "2",
             "--set", "log.data_trace=true"]
    p = start(trainerd(small_cache, ref_runs, ep, "--new", "ref", *flags), tmp_path / "ref.out")
    assert finish(p) is not None and p.returncode == 0, output(p)[-3000:]
    rng = random.Random(SEED)
    kinds = ["save"] * 4 + ["step"] * 3 + ["outside"] * 3
    rng.shuffle(kinds)
    injected, resumed_right, plan = 0, 0, []
    expect_resume: list[tuple[int, int]] = []   # (log index k of the next process, newest complete step when it starts)
    k = 0
    try:
        for kind in kinds:
            done = complete_checkpoints(runs, "k") if (runs / "checkpoints").exists() else []
            newest = done[-1] if done else 0
            if newest >= MAX_STEPS:
                break
            args = ["--resume", "k"] if done else ["--new", "k"]
            fault = None
            if kind == "save":
                fault = f"kill-in-save:{rng.choice(range(newest + EVERY, min(newest + 3 * EVERY, MAX_STEPS) + 1, EVERY))}"
            elif kind == "step":
                fault = f"kill-at-step:{rng.randint(newest + 1, min(newest + 12, MAX_STEPS - 1))}"
            k += 1
            expect_resume.append((k, newest))
            proc = start(trainerd(small_cache, runs, ep, *args, *flags), tmp_path / f"t{k}.out", env=child_env(fault))
            if kind == "outside":
                # wait until it logs a random step ahead, then kill it a random moment later (in the next step, a
                # save, a log line)
                target = rng.randint(newest + 1, min(newest + 10, MAX_STEPS - 1))
                try:
                    wait_for(lambda: max(steps(run_log(runs, "k", k)), default=0) >= target, f"step {target}", [proc],
                             poll=0.005)
                except AssertionError:
                    if proc.poll() == 0:
                        break
                    raise
                time.sleep(rng.uniform(0, 0.08))
                if proc.poll() is not None:
                    assert proc.returncode == 0, output(proc)[-3000:]
                    plan.append(("outside", "finished first"))
                    break
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=300)
            assert proc.returncode == -signal.SIGKILL, f"{kind} {fault}: exit {proc.returncode} (seed {SEED}):\n{output(proc)[-3000:]}"
            injected += 1
            last = max(steps(run_log(runs, "k", k)), default=None)
            plan.append((kind, fault or f"after step {last}"))
            if kind == "save":
                n = int(fault.split(":")[1])
                assert n not in complete_checkpoints(runs, "k"), f"the interrupted save of {n} is listed (seed {SEED})"
        # the last process: no fault, runs to the end
        done = complete_checkpoints(runs, "k")
        k += 1
        expect_resume.append((k, done[-1] if done else 0))
        proc = start(trainerd(small_cache, runs, ep, *(["--resume", "k"] if done else ["--new", "k"]), *flags),
                     tmp_path / f"t{k}.out")
        out = finish(proc)
        assert proc.returncode == 0, out[-3000:]
        assert not [d for d in os.listdir(runs / "checkpoints") if d.startswith(".tmp-")]

        ref = steps(run_log(ref_runs, "ref"))
        ref_data = traces(ref_runs, "ref")[0]
        mismatches = []
        for kk, newest in expect_resume:
            recs = run_log(runs, "k", kk)
            r = events(recs, "resumed")
            got_from = r[0]["step"] if r else 0
            if got_from == newest:
                resumed_right += 1
            else:
                mismatches.append(f"process {kk} resumed from step {got_from}, newest complete was {newest}")
            for s, rec in steps(recs).items():
                want = ref[s]
                if (rec["loss"], rec["lr"], rec["tokens"]) != (want["loss"], want["lr"], want["tokens"]):
                    mismatches.append(f"process {kk} step {s}: loss {rec['loss']!r} lr {rec['lr']!r} != {want['loss']!r} {want['lr']!r}")
            for s, seqs in traces(runs, "k", kk)[0].items():
                if seqs != ref_data[s]:
                    mismatches.append(f"process {kk} step {s} trained on other sequences")
        weights = events(run_log(runs, "k", k), "finished")[0]["weights_xxh64"]
        same_weights = weights == events(run_log(ref_runs, "ref"), "finished")[0]["weights_xxh64"]
    finally:
        record(kind="fault", item="2", name="trainerd SIGKILL at random instants (in saves, after steps, from outside)",
               injected=injected, survived=resumed_right - 1 if resumed_right else 0,
               data_lost=None if "mismatches" not in locals() else len(mismatches) + (0 if same_weights else 1), where=plan)
    assert injected == 10, f"{injected} kills landed: {plan} (seed {SEED})"
    assert not mismatches, "\n".join(mismatches[:20]) + f"\nfaults: {plan} (seed {SEED})"
    assert same_weights


# ---- item 3 (slow): packer restarted, a late subscriber, a deaf trainer, a trainer after the end -----------------
RECONCILE = 1.0


def _plan_checks(runs: Path, run: str, manifest, ranks: int) -> dict:
    """The trainer ended with the plan of the whole finished cache, and trained each sequence at most once."""
    recs = run_log(runs, run)
    total = manifest.total_sequences // G
    assert sorted(steps(recs)) == list(range(1, total + 1)), f"{run}: steps {min(steps(recs))}..{max(steps(recs))}, want 1..{total}"
    plans = [e for e in recs if e.get("event") in ("plan", "plan_expanded")]
    assert plans[-1]["finished"] and plans[-1]["chunks"] == len(manifest.chunks) and plans[-1]["total_steps"] == total
    seen = [x for tr in traces(runs, run, ranks=ranks) for seqs in tr.values() for x in seqs]
    assert len(seen) == len(set(seen)) == total * G, f"{run}: a sequence trained twice or missing"
    lags = [e["latency_ms"] for e in plans[1:] if e.get("latency_ms") is not None]
    return {"events": recs, "plans": plans, "max_lag_ms": max(lags, default=0.0)}


@pytest.mark.slow
def test_plan_follows_a_restarted_packer_late_and_deaf(tmp_path, corpus_texts, tokenizer_dir):
    """A packer in --follow mode; trainer A (`accelerate launch`, 2 ranks) subscribes late, after chunks exist;
    trainer B listens on an endpoint nobody publishes on (every notification dropped). The packer is killed -9
    and restarted while both train, more files arrive, the cache is finished. Both end with the plan of the
    whole manifest, each sequence once, and each growth of the plan reached them within about one reconcile
    interval of the commit. Trainer C starts after the packer has finished and plans the whole cache at once."""
    src = tmp_path / "src"
    src.mkdir()
    parts = [(0, 8), (8, 16), (16, 24)]
    write_jsonl(src / "part-0.jsonl", corpus_texts[slice(*parts[0])])
    (tmp_path / "pack.toml").write_text("poll_seconds = 0.2\n")
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    ep, deaf_ep = endpoint(tmp_path, "p"), endpoint(tmp_path, "nobody")
    pack_cmd = packerd(cache, src, tokenizer_dir, ep, "--follow", "--config", tmp_path / "pack.toml")
    env = child_env(hf_home=tmp_path / "hf")
    packer = start(pack_cmd, tmp_path / "packer0.out", env=env)
    a = b = c = None
    ok = False
    try:
        wait_for(lambda: (m := manifest_of(cache)) and m.documents >= parts[0][1] - 1, "the first file packed", [packer])
        common = ["--checkpoint-every", "0", "--set", f"data.reconcile_seconds={RECONCILE}", "--set", "log.data_trace=true"]
        a = start(launch_2ranks(cache, runs, ep, "--new", "late", *common), tmp_path / "a.out", env=env)
        b = start(trainerd(cache, runs, deaf_ep, "--new", "deaf", *common), tmp_path / "b.out", env=env)
        for run, p in (("late", a), ("deaf", b)):
            wait_for(lambda: events(run_log(runs, run), "waiting"), f"{run} to catch up and wait", [packer, a, b])
        # more data, then the packer dies with SIGKILL while both trainers run, and is restarted
        write_jsonl(tmp_path / ".p1", corpus_texts[slice(*parts[1])])
        os.replace(tmp_path / ".p1", src / "part-1.jsonl")
        wait_for(lambda: manifest_of(cache).documents >= parts[1][1] - 1, "part 1 packed", [packer, a, b])
        packer.send_signal(signal.SIGKILL)
        packer.wait()
        packer = start(pack_cmd, tmp_path / "packer1.out", env=env)
        write_jsonl(tmp_path / ".p2", corpus_texts[slice(*parts[2])])
        os.replace(tmp_path / ".p2", src / "part-2.jsonl")
        wait_for(lambda: manifest_of(cache).documents >= parts[2][1] - 1, "part 2 packed", [packer, a, b])
        packer.send_signal(signal.SIGTERM)
        assert packer.wait(timeout=60) == 0, output(packer)[-3000:]
        run_packerd("run", "--cache-dir", cache, "--workers", 1, "--endpoint", ep)   # finishes the last window
        for p in (a, b):
            out = finish(p)
            assert p.returncode == 0, out[-4000:]
        m = load_manifest(cache)
        assert m.finished
        late = _plan_checks(runs, "late", m, ranks=2)
        deaf = _plan_checks(runs, "deaf", m, ranks=1)
        # the late subscriber saw its first message and the packer's restart as gaps, and re-read the manifest
        assert len([e for e in late["events"] if e.get("event") == "reconciled" and e.get("reason") == "gap"]) >= 2
        # the deaf one heard nothing and still grew, by its timer
        assert not events(deaf["events"], "notified")
        assert [e for e in deaf["events"] if e.get("event") == "reconciled" and e.get("reason") == "timer"]
        # item 3's bound: one reconcile interval, plus one step and the loop's 0.2 s poll (2 s of slack for a loaded CI)
        for name, r in (("late", late), ("deaf", deaf)):
            assert r["max_lag_ms"] <= (RECONCILE + 2.0) * 1000, f"{name}: plan lagged the manifest by {r['max_lag_ms']} ms"
        # trainer C: started after the packer finished (nobody publishes any more)
        c = start(trainerd(cache, runs, ep, "--new", "after", *common), tmp_path / "c.out", env=env)
        out = finish(c)
        assert c.returncode == 0, out[-3000:]
        after = _plan_checks(runs, "after", m, ranks=1)
        assert len(after["plans"]) == 1 and after["plans"][0]["finished"]
        ok = True
    finally:
        kill_all(packer, a, b, c)
        lags = {n: r["max_lag_ms"] for n, r in (("late", locals().get("late")), ("deaf", locals().get("deaf"))) if r}
        record(kind="fault", item="3", name="packer kill -9 and restart under 2 trainers (late subscriber, deaf); "
                                            "a trainer after the end", injected=3, survived=3 if ok else 0,
               data_lost=0 if ok else None, max_plan_lag_ms=lags)


@pytest.mark.slow
def test_a_cache_rebuilt_under_a_running_trainer_is_one_error(tmp_path, small_cache):
    """The packer is restarted with --force-rebuild and another seq_len while a trainer follows the cache: the
    trainer must notice the cache is another one and stop with one Error line, not train on it or crash."""
    m, part = partial_copy(small_cache, tmp_path, 6)
    runs, ep = tmp_path / "runs", endpoint(tmp_path)
    t = start(trainerd(part, runs, ep, "--new", "rb", "--checkpoint-every", "0", "--set", "data.reconcile_seconds=0.5"),
              tmp_path / "t.out")
    try:
        wait_for(lambda: events(run_log(runs, "rb"), "waiting"), "the trainer to wait for data", [t])
        run_packerd("run", "--cache-dir", part, "--source", m.sources[0], "--tokenizer", m.tokenizer["name"],
                    "--seq-len", 32, "--chunk-sequences", 16, "--workers", 1, "--endpoint", ep, "--force-rebuild", "--yes")
        try:
            t.wait(timeout=60)
        except subprocess.TimeoutExpired:
            t.send_signal(signal.SIGTERM)
            t.wait(timeout=60)
        out = output(t)
    finally:
        kill_all(t)
    ok = "Traceback" not in out and t.returncode == 1 and out.strip().splitlines()[-1].startswith("Error:")
    record(kind="fault", item="3", name="cache rebuilt with --force-rebuild under a running trainer", injected=1,
           survived=int(ok), data_lost=0 if ok else None)
    assert "Traceback" not in out, out[-2500:]
    assert t.returncode == 1 and out.strip().splitlines()[-1].startswith("Error:"), out[-2500:]


# ---- item 7 (slow): a second trainer on a run that a 2-rank accelerate launch trains ----------------------------
@pytest.mark.slow
def test_second_trainer_refuses_a_two_rank_run(tmp_path, small_cache):
    """Rank 0 of a 2-rank `accelerate launch` holds the run's lock; a second real `python -m trainerd` on that run
    exits 1 with one Error line and adds nothing to the run folder; the first run ends normally."""
    m, part = partial_copy(small_cache, tmp_path, 6)
    runs, ep = tmp_path / "runs", endpoint(tmp_path)
    env = child_env(hf_home=tmp_path / "hf")
    first = start(launch_2ranks(part, runs, ep, "--new", "two", "--checkpoint-every", "0",
                                "--set", "data.reconcile_seconds=0.5"), tmp_path / "first.out", env=env)
    ok = False
    try:
        wait_for(lambda: events(run_log(runs, "two"), "waiting"), "the 2-rank run to wait for data", [first])
        mine = ("training_logs/two_run_1.jsonl",)
        before = snapshot(runs, mine)
        second = start(trainerd(part, runs, endpoint(tmp_path, "b"), "--new", "two"), tmp_path / "second.out")
        out = finish(second)
        assert second.returncode == 1 and out.strip().startswith("Error: another trainer is running run two"), out
        assert len(out.strip().splitlines()) == 1 and snapshot(runs, mine) == before
        m.save(part)
        assert finish(first) is not None and first.returncode == 0, output(first)[-3000:]
        ok = True
    finally:
        kill_all(first)
        record(kind="fault", item="7", name="a second trainer on a 2-rank run", injected=1, survived=int(ok),
               data_lost=0 if ok else None)
