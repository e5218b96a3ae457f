"""End to end: packerd --follow writes a cache while `accelerate launch --multi_gpu --num_processes 2 -m
trainerd` trains on it (two gloo ranks on the CPU). The plan grows while training, the trainer waits when
it has caught up, and ends once the packer has finished the cache and the plan is done; the two ranks
saw disjoint sequences and ended with identical weights; the learning rate never jumped at a growth.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, free_endpoint, free_port, run_packerd, write_jsonl

DOCS = [(0, 10), (10, 20), (20, 30)]   # three source files, added one at a time
GLOBAL_BATCH = 2 * 2 * 2              # micro batch 2, grad accum 2, 2 ranks


def wait_for(cond, what: str, procs, timeout: float = 150.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        for p in procs:
            if p.poll() is not None:
                out = p.stdout.read() if p.stdout else ""
                raise AssertionError(f"{what}: {p.args[:4]} exited {p.returncode} first:\n{out[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def manifest(cache: Path) -> dict:
    """The manifest as its JSON form: snapshot and commit log (manifest.json alone lags between snapshots)."""
    from shared.manifest import load_manifest
    m = load_manifest(cache)
    return m.to_json() if m is not None else {}


def test_two_ranks_follow_a_growing_cache(tmp_path, corpus_texts, tokenizer_dir):
    src, cache, runs = tmp_path / "src", tmp_path / "cache", tmp_path / "runs"
    src.mkdir()
    endpoint = free_endpoint(tmp_path)
    (tmp_path / "packer.toml").write_text("poll_seconds = 0.2\n")
    write_jsonl(src / "part-0.jsonl", corpus_texts[slice(*DOCS[0])])
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}  # no user accelerate config
    packer = subprocess.Popen([sys.executable, "-m", "packerd", "run", "--config", str(tmp_path / "packer.toml"),
                               "--cache-dir", str(cache), "--source", str(src), "--tokenizer", str(tokenizer_dir),
                               "--seq-len", "64", "--chunk-sequences", "16", "--workers", "1", "--endpoint", endpoint,
                               "--follow"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    trainer = None
    try:
        wait_for(lambda: manifest(cache).get("totals", {}).get("chunks"), "the first chunks", [packer])
        trainer = subprocess.Popen(
            [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
             "--main_process_port", str(free_port()),
             "-m", "trainerd", "--cache-dir", str(cache), "--run-dir", str(runs), "--new", "follow", "--endpoint", endpoint,
             "--model", "tiny", "--hidden-size", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2",
             "--micro-batch-size", "2", "--grad-accum", "2", "--threads", "1", "--checkpoint-every", "0",
             "--log-every", "5", "--set", "log.data_trace=true", "--set", "data.reconcile_seconds=0.5"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
        log = runs / "training_logs" / "follow_run_1.jsonl"
        events = lambda name: [r for r in read_jsonl(log) if r.get("event") == name]
        # it trains on what exists, catches up with the packer and waits
        wait_for(lambda: events("waiting"), "the trainer to catch up and wait", [packer, trainer])
        for i, (a, b) in enumerate(DOCS[1:], 1):
            write_jsonl(src / f".part-{i}.tmp", corpus_texts[a:b])
            os.replace(src / f".part-{i}.tmp", src / f"part-{i}.jsonl")
            wait_for(lambda: manifest(cache).get("documents", 0) >= b - 1, f"the packer to pack part {i}", [packer, trainer])
            wait_for(lambda: len(events("plan_expanded")) >= i, f"the plan to grow with part {i}", [packer, trainer])
        # the packer is restarted without --follow: it finishes the cache, and the trainer then ends
        packer.send_signal(signal.SIGTERM)
        packer.communicate(timeout=60)
        run_packerd("run", "--cache-dir", cache, "--workers", 1, "--endpoint", endpoint)
        out, _ = trainer.communicate(timeout=150)
        assert trainer.returncode == 0, out[-4000:]
    finally:
        if packer.poll() is None:
            packer.kill()
            packer.communicate()
        if trainer is not None:
            stop_group(trainer)  # the ranks too, whatever happened

    recs = read_jsonl(log)
    steps = [r for r in recs if "event" not in r]
    m = manifest(cache)
    assert m["finished"]
    total = m["totals"]["sequences"] // GLOBAL_BATCH
    assert [r["step"] for r in steps] == list(range(1, total + 1))
    # the plan grew while training, at step boundaries after the start, with the notification latency
    grown = [e for e in recs if e.get("event") == "plan_expanded"]
    assert len(grown) >= 3 and all(e["step"] > 0 for e in grown)
    assert any(e["notify_latency_ms"] is not None for e in grown)
    assert grown[-1]["finished"] and grown[-1]["total_steps"] == total
    # the learning rate did not jump when the plan grew
    lr = {r["step"]: r["lr"] for r in steps}
    diffs = {s: abs(lr[s] - lr[s - 1]) for s in lr if s - 1 in lr}
    grow_steps = {e["step"] + 1 for e in grown}  # plan grown before optimizer step e["step"] (0-based) = logged step + 1
    normal = max(d for s, d in diffs.items() if s not in grow_steps)
    assert all(diffs[s] <= normal * (1 + 1e-9) for s in grow_steps if s in diffs)
    # two ranks, disjoint sequences at every step and over the epoch, identical weights at the end
    traces = [{r["step"]: [tuple(x) for x in r["seq_ids"]] for r in read_jsonl(runs / "training_logs" / f"follow_run_1.rank{k}.data.jsonl")}
              for k in (0, 1)]
    assert sorted(traces[0]) == sorted(traces[1]) == list(range(total))
    seen0 = [x for s in traces[0].values() for x in s]
    seen1 = [x for s in traces[1].values() for x in s]
    assert len(seen0) == len(seen1) == total * GLOBAL_BATCH // 2
    assert not set(seen0) & set(seen1)
    assert len(set(seen0) | set(seen1)) == len(seen0) + len(seen1)  # nothing twice in the epoch
    finished = [e for e in recs if e.get("event") == "finished"][0]
    assert len(finished["weights_xxh64"]) == 2 and finished["weights_xxh64"][0] == finished["weights_xxh64"][1]
    assert "waiting for data" in out


def launch(cache: Path, runs: Path, endpoint: str, *args, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(runs.parent / "hf")}
    env.pop("TRAINERD_FAULT", None)
    if fault:
        env["TRAINERD_FAULT"] = fault
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "trainerd", "--cache-dir", str(cache), "--run-dir", str(runs),
           "--endpoint", endpoint, "--model", "tiny", "--hidden-size", "32", "--layers", "2", "--heads", "4",
           "--kv-heads", "2", "--micro-batch-size", "2", "--grad-accum", "2", "--threads", "1", "--deterministic",
           "--set", "log.data_trace=true", *args]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=300)
    finally:
        stop_group(p)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def stop_group(p: subprocess.Popen) -> None:
    """Kill the launcher and the ranks it started (they share its new process group)."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


@pytest.mark.slow
def test_two_ranks_resume_exactly_after_kill_9(tmp_path, make_cache):
    cache = make_cache()
    endpoint = free_endpoint(tmp_path)
    runs = tmp_path / "runs"
    p = launch(cache, runs, endpoint, "--new", "a", "--max-steps", "12", "--checkpoint-every", "4")
    assert p.returncode == 0, p.stderr[-3000:]
    p = launch(cache, runs, endpoint, "--new", "b", "--max-steps", "12", "--checkpoint-every", "4", fault="kill-at-step:7")
    assert p.returncode != 0
    p = launch(cache, runs, endpoint, "--resume", "b")
    assert p.returncode == 0, p.stderr[-3000:]
    ref = {r["step"]: r["loss"] for r in read_jsonl(runs / "training_logs" / "a_run_1.jsonl") if "event" not in r}
    got = {r["step"]: r["loss"] for r in read_jsonl(runs / "training_logs" / "b_run_2.jsonl") if "event" not in r}
    assert sorted(got) == list(range(5, 13))
    assert all(got[s] == ref[s] for s in got)
    fin = lambda run, k: [r for r in read_jsonl(runs / "training_logs" / f"{run}_run_{k}.jsonl") if r.get("event") == "finished"][0]
    assert fin("b", 2)["weights_xxh64"] == fin("a", 1)["weights_xxh64"]


def test_a_one_process_run_resumes_on_two_ranks_with_the_same_global_batch(tmp_path, make_cache):
    """Moving to more processes: a run trained 6 steps by one process (micro-batch 2 x accumulation 4) goes on
    under `accelerate launch` with 2 ranks and accumulation 2. Global batch 8 either way: every step trains the
    sequences a one-process run trains at that step, the two ranks' shares disjoint."""
    cache = make_cache()
    runs = tmp_path / "runs"
    one = [sys.executable, "-m", "trainerd", "--cache-dir", str(cache), "--run-dir", str(runs),
           "--endpoint", free_endpoint(tmp_path), "--model", "tiny", "--hidden-size", "32", "--layers", "2",
           "--heads", "4", "--kv-heads", "2", "--micro-batch-size", "2", "--grad-accum", "4", "--threads", "1",
           "--deterministic", "--set", "log.data_trace=true", "--checkpoint-every", "0"]
    for args in (["--new", "ref", "--max-steps", "12"], ["--new", "moved", "--max-steps", "6"]):
        p = subprocess.run(one + args, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
    p = launch(cache, runs, free_endpoint(tmp_path), "--resume", "moved", "--max-steps", "12")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed moved from moved-step00000006" in p.stderr

    def trace(run, k, rank):
        with open(runs / "training_logs" / f"{run}_run_{k}.rank{rank}.data.jsonl") as f:
            return {r["step"]: [tuple(x) for x in r["seq_ids"]] for r in map(json.loads, f)}
    ref = trace("ref", 1, 0)
    first, r0, r1 = trace("moved", 1, 0), trace("moved", 2, 0), trace("moved", 2, 1)
    # the trace numbers steps from 0: the first process trained 0..5, the two ranks 6..11
    assert sorted(first) == list(range(6)) and sorted(r0) == sorted(r1) == list(range(6, 12))
    for s in range(6):
        assert sorted(first[s]) == sorted(ref[s])
    for s in range(6, 12):
        assert not set(r0[s]) & set(r1[s]) and sorted(r0[s] + r1[s]) == sorted(ref[s]), f"step {s}"


def test_an_error_one_rank_meets_alone_is_said_by_that_rank(tmp_path, make_cache):
    """Rank 1 alone cannot read its batch of step 3 (as a chunk read can fail on one rank): its error is one
    line on stderr naming the rank, not only the other rank's broken collective, and the launch fails."""
    cache = make_cache()
    p = launch(cache, tmp_path / "runs", free_endpoint(tmp_path), "--new", "r", "--max-steps", "6",
               fault="read-error-at-step:3")
    assert p.returncode != 0
    assert "Error (rank 1): cannot follow the cache: fault hook: rank 1 cannot read its batch of step 3" in p.stderr, \
        p.stderr[-3000:]
