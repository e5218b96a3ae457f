"""The trainer as a real process: exact resume after kill -9, a kill in the middle of a save, signals,
the run lock, and the checks on resume. A tiny model (hidden 32, 2 layers) on the 79-document corpus.

Kills come from the trainer's fault hook TRAINERD_FAULT (a real SIGKILL of the real process, at a known
step), so the tests do not race the trainer.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, free_endpoint, records, run_packerd, run_trainerd
from shared.manifest import load_manifest

TINY = ["--model", "tiny", "--hidden-size", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2",
        "--micro-batch-size", "4", "--grad-accum", "2", "--threads", "1", "--deterministic", "--log-every", "1000",
        "--set", "log.data_trace=true"]
MAX_STEPS = 24


def trainer_args(cache, run_dir, tmp, *args) -> list[str]:
    return ["--cache-dir", str(cache), "--run-dir", str(run_dir), "--endpoint", free_endpoint(tmp), *TINY,
            *map(str, args)]


def trainer_cmd(cache, run_dir, tmp, *args) -> list[str]:
    """The command line, for the trainers a test starts itself (Popen)."""
    return [sys.executable, "-m", "trainerd", *trainer_args(cache, run_dir, tmp, *args)]


def run_trainer(cache, run_dir, tmp, *args, fault: str | None = None, timeout=180) -> subprocess.CompletedProcess:
    return run_trainerd(*trainer_args(cache, run_dir, tmp, *args), fault=fault, timeout=timeout)


def steps(recs) -> dict[int, dict]:
    return {r["step"]: r for r in recs if "event" not in r}


def events(recs, name) -> list[dict]:
    return [r for r in recs if r.get("event") == name]


def data_trace(run_dir: Path, run: str, k: int, rank: int = 0) -> dict[int, list]:
    with open(run_dir / "training_logs" / f"{run}_run_{k}.rank{rank}.data.jsonl") as f:
        return {r["step"]: r["seq_ids"] for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def cache(tmp_path_factory, corpus_jsonl, tokenizer_dir):
    tmp = tmp_path_factory.mktemp("cache")
    run_packerd("run", "--cache-dir", tmp / "c", "--source", corpus_jsonl, "--tokenizer", tokenizer_dir,
                "--seq-len", 64, "--chunk-sequences", 16, "--workers", 1, "--endpoint", free_endpoint(tmp))
    return tmp / "c"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
    """A run of MAX_STEPS steps without interruption: the reference for every resume."""
    tmp = tmp_path_factory.mktemp("ref")
    p = run_trainer(cache, tmp / "runs", tmp, "--new", "ref", "--max-steps", MAX_STEPS, "--checkpoint-every", 5)
    assert p.returncode == 0, p.stderr
    return tmp / "runs"


def test_uninterrupted_run_logs_and_checkpoints(uninterrupted):
    recs = records(uninterrupted, "ref", 1)
    per_step = steps(recs)
    assert sorted(per_step) == list(range(1, MAX_STEPS + 1))
    for r in per_step.values():
        assert {"step", "loss", "lr", "tokens", "tokens_per_s", "total_steps"} <= set(r)
    assert per_step[MAX_STEPS]["loss"] < per_step[1]["loss"]
    # saved every 5 steps and at the end, once each (grad accumulation does not repeat saves), newest 3 kept
    saved = [e["step"] for e in events(recs, "checkpoint_saved")]
    assert saved == [5, 10, 15, 20, 24]
    names = sorted(os.listdir(uninterrupted / "checkpoints"))
    assert names == ["ref-step00000015", "ref-step00000020", "ref-step00000024"]
    meta = json.loads((uninterrupted / "checkpoints" / "ref-step00000024" / "meta.json").read_text())
    assert meta["step"] == MAX_STEPS and meta["run"] == "ref" and meta["tokens"] == per_step[MAX_STEPS]["tokens"]
    config = json.loads((uninterrupted / "checkpoints" / "ref-step00000024" / "config.json").read_text())
    assert config["model"]["hidden_size"] == 32 and config["train"]["max_steps"] == MAX_STEPS
    assert json.loads((uninterrupted / "runs" / "ref.json").read_text())["run"] == "ref"


def test_exact_resume_after_kill_9_and_a_kill_during_a_save(tmp_path, cache, uninterrupted):
    """Killed with SIGKILL at step 13, resumed; killed again while saving step 20, resumed again: the same
    per-step losses (bitwise), the same sequences at every step, the same final weights."""
    runs = tmp_path / "runs"
    p = run_trainer(cache, runs, tmp_path, "--new", "b", "--max-steps", MAX_STEPS, "--checkpoint-every", 5,
                    fault="kill-at-step:13")
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert max(steps(records(runs, "b", 1))) == 13

    p = run_trainer(cache, runs, tmp_path, "--resume", "latest", fault="kill-in-save:20")
    assert p.returncode == -signal.SIGKILL, p.stderr
    tmp_dirs = [d for d in os.listdir(runs / "checkpoints") if d.startswith(".tmp-b-step00000020-")]
    assert tmp_dirs, "the save of step 20 was interrupted"
    assert "b-step00000020" not in os.listdir(runs / "checkpoints")

    p = run_trainer(cache, runs, tmp_path, "--resume", "b")
    assert p.returncode == 0, p.stderr
    assert "b-step00000015" in p.stderr  # resumed from the newest complete checkpoint
    assert not [d for d in os.listdir(runs / "checkpoints") if d.startswith(".tmp-")]

    ref = steps(records(uninterrupted, "ref", 1))
    ref_data = data_trace(uninterrupted, "ref", 1)
    for k, first in ((1, 1), (2, 11), (3, 16)):
        recs = records(runs, "b", k)
        got = steps(recs)
        assert min(got) == first
        for s, r in got.items():
            assert r["loss"] == ref[s]["loss"], f"run {k} step {s}: {r['loss']!r} != {ref[s]['loss']!r}"
            assert r["lr"] == ref[s]["lr"] and r["tokens"] == ref[s]["tokens"]
        for s, seqs in data_trace(runs, "b", k).items():
            assert seqs == ref_data[s], f"run {k} step {s} trained on other sequences"
        if k > 1:
            assert events(recs, "resumed")[0]["step"] == first - 1
    final = events(records(runs, "b", 3), "finished")[0]
    assert final["weights_xxh64"] == events(records(uninterrupted, "ref", 1), "finished")[0]["weights_xxh64"]


def test_resumed_from_an_older_checkpoint_the_new_line_is_kept(tmp_path, cache, uninterrupted):
    """ref kept steps 15, 20, 24. Resumed from step 15 and saving every 3 steps, the new line's saves are the
    ones kept (by step, the prune after step 21 would delete the new step 18), and the resume warns."""
    runs = tmp_path / "runs"
    shutil.copytree(uninterrupted, runs)
    p = run_trainer(cache, runs, tmp_path, "--resume", "ref-step00000015", "--max-steps", MAX_STEPS,
                    "--checkpoint-every", 3)
    assert p.returncode == 0, p.stderr
    assert "warning: ref has 2 checkpoint(s) past step 15 (ref-step00000024 the last saved)" in p.stderr
    recs = records(runs, "ref", 2)
    assert events(recs, "resumed")[0]["later_checkpoints"] == ["ref-step00000020", "ref-step00000024"]
    assert [(e["step"], e["pruned"]) for e in events(recs, "checkpoint_saved")] == [
        (18, ["ref-step00000015"]), (21, ["ref-step00000020"]), (24, ["ref-step00000024"])]
    # step 24 of the old line is not written over: the new line's copy has its own name, and the old one
    # goes as the oldest save
    assert sorted(os.listdir(runs / "checkpoints")) == ["ref-step00000018", "ref-step00000021",
                                                        "ref-step00000024_run_2"]
    ref = steps(records(uninterrupted, "ref", 1))
    assert all(r["loss"] == ref[s]["loss"] for s, r in steps(recs).items())  # saving more often changes nothing


def test_a_resumed_line_saves_beside_the_steps_it_repeats(tmp_path, cache, uninterrupted):
    """Resumed from step 20, line 2 of ref reaches step 24 again: it saves ref-step00000024_run_2 beside the
    first line's step 24 and never touches that folder; --resume ref then takes line 2's (the newest)."""
    runs = tmp_path / "runs"
    shutil.copytree(uninterrupted, runs)
    cks = runs / "checkpoints"
    first = {p.name: p.read_bytes() for p in (cks / "ref-step00000024").iterdir()}
    p = run_trainer(cache, runs, tmp_path, "--resume", "ref-step00000020", "--max-steps", MAX_STEPS)
    assert p.returncode == 0, p.stderr
    recs = records(runs, "ref", 2)
    assert [(e["step"], e["name"]) for e in events(recs, "checkpoint_saved")] == [(24, "ref-step00000024_run_2")]
    assert {p.name: p.read_bytes() for p in (cks / "ref-step00000024").iterdir()} == first
    assert not [d for d in os.listdir(cks) if d.startswith(".tmp-")]
    ref = steps(records(uninterrupted, "ref", 1))
    assert all(r["loss"] == ref[s]["loss"] for s, r in steps(recs).items())
    assert events(recs, "finished")[0]["weights_xxh64"] == events(records(uninterrupted, "ref", 1), "finished")[0]["weights_xxh64"]
    p = run_trainer(cache, runs, tmp_path, "--resume", "ref", "--max-steps", MAX_STEPS)
    assert p.returncode == 0, p.stderr
    assert "resumed ref from ref-step00000024_run_2 (step 24)" in p.stderr
    assert events(records(runs, "ref", 3), "checkpoint_saved") == []   # nothing new to save


def test_steps_made_only_of_corrupt_chunks_do_not_move_the_weights(tmp_path, cache):
    """The four chunks of the first shuffle window are corrupt: the first 8 global batches (64 rows) are
    padding rows only. Those steps log a null loss and an empty_step event and take no optimizer step (the
    checkpoint at step 8 has no optimizer state yet); training goes on after them."""
    import torch
    from shared.cache import open_cache
    from trainerd.config import load_config
    from trainerd.data import DataPlan
    bad_cache = tmp_path / "cache"
    shutil.copytree(cache, bad_cache)
    c = open_cache(bad_cache)
    seed = load_config(None, {}).train.seed
    window = DataPlan(c, seed=seed, global_batch=8, rank=0, world_size=1, shuffle_window=64)._layout(0, 0).chunks_of(0)
    assert sum(c.chunks[i].sequences for i in window) == 64
    for i in window:
        p = bad_cache / c.chunks[i].file
        data = bytearray(p.read_bytes())
        data[-1] ^= 0x01
        p.write_bytes(bytes(data))
    runs = tmp_path / "runs"
    p = run_trainer(bad_cache, runs, tmp_path, "--new", "e", "--max-steps", 10, "--checkpoint-every", 8,
                    "--shuffle-window", 64)
    assert p.returncode == 0, p.stderr
    recs = records(runs, "e", 1)
    per_step = steps(recs)
    assert [per_step[s]["loss"] for s in range(1, 9)] == [None] * 8
    assert all(per_step[s]["step_tokens"] == 0 for s in range(1, 9))
    assert all(isinstance(per_step[s]["loss"], float) for s in (9, 10))
    assert [e["step"] for e in events(recs, "empty_step")] == list(range(1, 9))
    assert sorted(e["chunk_id"] for e in events(recs, "corrupt_chunk")) == sorted(window)
    optim = torch.load(runs / "checkpoints" / "e-step00000008" / "optimizer.pt", weights_only=True)
    assert optim["state"] == {}, "an optimizer step was taken on padding alone"
    optim = torch.load(runs / "checkpoints" / "e-step00000010" / "optimizer.pt", weights_only=True)
    assert optim["state"]


def _drop_shuffle_window(folder: Path) -> None:
    """Make a checkpoint look saved before data.shuffle_window existed (config and data state without it)."""
    import torch
    for name, load, dump in (("config.json", lambda p: json.loads(p.read_text()), lambda d, p: p.write_text(json.dumps(d))),
                             ("state.pt", lambda p: torch.load(p, weights_only=True), lambda d, p: torch.save(d, p))):
        d = load(folder / name)
        (d["data"]).pop("shuffle_window")
        dump(d, folder / name)
    meta = json.loads((folder / "meta.json").read_text())
    for name in ("config.json", "state.pt"):
        meta["files"][name]["bytes"] = (folder / name).stat().st_size
    (folder / "meta.json").write_text(json.dumps(meta))


def test_a_resume_keeps_the_shuffle_window_and_reads_checkpoints_older_than_it(tmp_path, cache):
    """--shuffle-window is part of the run: a resume with another window is one Error line naming the value
    to give, nothing written; a checkpoint saved before the setting existed resumes with its 4-chunk window
    (4 x 16 sequences here), the same losses as a run that never stopped."""
    runs = tmp_path / "runs"
    p = run_trainer(cache, runs, tmp_path, "--new", "w", "--max-steps", 8, "--checkpoint-every", 4,
                    "--shuffle-window", 64)
    assert p.returncode == 0, p.stderr
    ref = steps(records(runs, "w", 1))
    p = run_trainer(cache, runs, tmp_path, "--resume", "w", "--max-steps", 10, "--shuffle-window", 1000)
    assert p.returncode == 1
    err = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("Error: ") and "--shuffle-window 64" in err[0], p.stderr
    assert not (runs / "training_logs" / "w_run_2.jsonl").exists()
    shutil.rmtree(runs / "checkpoints" / "w-step00000008")
    _drop_shuffle_window(runs / "checkpoints" / "w-step00000004")
    p = run_trainer(cache, runs, tmp_path, "--resume", "w", "--max-steps", 8)
    assert p.returncode == 0, p.stderr
    got = steps(records(runs, "w", 2))
    assert sorted(got) == [5, 6, 7, 8] and all(got[s]["loss"] == ref[s]["loss"] for s in got)
    config = json.loads((runs / "checkpoints" / "w-step00000008" / "config.json").read_text())
    assert config["data"]["shuffle_window"] == 64


def test_signal_saves_and_exits_0_and_a_second_trainer_refuses(tmp_path, cache):
    """A trainer that caught up with a (still unfinished) cache waits; a second trainer on the same run
    refuses; SIGTERM makes the first save a checkpoint and exit 0."""
    part = tmp_path / "partial"
    part.mkdir()
    m = load_manifest(cache)
    m.chunks, m.finished = m.chunks[:6], False  # as if the packer were still at chunk 6
    for c in m.chunks:
        os.link(cache / c.file, part / c.file)
    m.save(part)
    runs = tmp_path / "runs"
    first = subprocess.Popen(trainer_cmd(part, runs, tmp_path, "--new", "w", "--checkpoint-every", 0),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        log = runs / "training_logs" / "w_run_1.jsonl"
        deadline = time.monotonic() + 120
        while not (log.exists() and '"event":"waiting"' in log.read_text()):
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.poll() is not None else "timeout"
            time.sleep(0.1)
        second = run_trainer(part, runs, tmp_path, "--new", "w")
        assert second.returncode == 1
        assert "another trainer is running run w" in second.stderr.strip().splitlines()[-1]
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    recs = records(runs, "w", 1)
    last = max(steps(recs))
    assert last == 96 // 8  # 6 chunks x 16 sequences, 8 per step: then it waited for data
    saved = events(recs, "checkpoint_saved")
    assert [(e["step"], e["reason"]) for e in saved] == [(last, "signal")]
    assert events(recs, "stopped")[0]["signal"] == signal.SIGTERM
    assert "waiting for data" in err


def test_resume_on_a_cache_with_another_seq_len_is_one_error(tmp_path, cache, uninterrupted, corpus_jsonl, tokenizer_dir):
    other = tmp_path / "c32"
    run_packerd("run", "--cache-dir", other, "--source", corpus_jsonl, "--tokenizer", tokenizer_dir,
                "--seq-len", 32, "--chunk-sequences", 16, "--workers", 1, "--endpoint", free_endpoint(tmp_path))
    p = run_trainer(other, uninterrupted, tmp_path, "--resume", "ref")
    assert p.returncode == 1
    line = p.stderr.strip().splitlines()
    assert len(line) == 1 and "seq_len 32" in line[0] and "64" in line[0], p.stderr


@pytest.mark.slow
def test_resume_on_a_cache_with_another_tokenizer_is_one_error(tmp_path, cache, uninterrupted, corpus_jsonl):
    other = tmp_path / "cbpe"
    run_packerd("run", "--cache-dir", other, "--source", corpus_jsonl, "--tokenizer", "builtin:bpe",
                "--seq-len", 64, "--chunk-sequences", 16, "--workers", 1, "--endpoint", free_endpoint(tmp_path))
    p = run_trainer(other, uninterrupted, tmp_path, "--resume", "ref")
    assert p.returncode == 1
    line = p.stderr.strip().splitlines()
    assert len(line) == 1 and "tokenizer" in line[0], p.stderr


def test_no_wait_fails_at_once_and_writes_nothing(tmp_path):
    runs = tmp_path / "runs"
    p = run_trainer(tmp_path / "missing", runs, tmp_path, "--new", "x", "--no-wait")
    assert p.returncode == 1
    line = p.stderr.strip().splitlines()
    assert len(line) == 1 and "does not exist" in line[0], p.stderr
    assert not runs.exists()


def test_resume_picks_up_a_cache_that_grew_while_the_trainer_was_stopped(tmp_path, corpus_texts, tokenizer_dir):
    """A trainer follows a packer (--follow) on half the corpus, catches up, and is stopped (SIGTERM: it
    saves). The packer then packs the other half and finishes. The resumed run plans over the grown cache and
    trains to its end: over both runs every sequence of the epoch once (but the last partial batch), nothing
    twice, and the sequences of the new chunks among them."""
    from test_trainer_follow import manifest, read_jsonl, wait_for
    from conftest import write_jsonl
    src, cache, runs = tmp_path / "src", tmp_path / "cache", tmp_path / "runs"
    src.mkdir()
    endpoint = free_endpoint(tmp_path)
    (tmp_path / "packer.toml").write_text("poll_seconds = 0.2\n")
    half = len(corpus_texts) // 2
    write_jsonl(src / "part-0.jsonl", corpus_texts[:half])
    packer = subprocess.Popen([sys.executable, "-m", "packerd", "run", "--config", str(tmp_path / "packer.toml"),
                               "--cache-dir", str(cache), "--source", str(src), "--tokenizer", str(tokenizer_dir),
                               "--seq-len", "64", "--chunk-sequences", "16", "--workers", "1", "--endpoint", endpoint,
                               "--follow"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    trainer = None
    try:
        wait_for(lambda: manifest(cache).get("documents", 0) >= half - 1, "the packer to pack the first half", [packer])
        cmd = [sys.executable, "-m", "trainerd", "--cache-dir", str(cache), "--run-dir", str(runs), "--endpoint",
               endpoint, *TINY, "--new", "g", "--checkpoint-every", "0"]
        trainer = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log1 = runs / "training_logs" / "g_run_1.jsonl"
        wait_for(lambda: any(r.get("event") == "waiting" for r in read_jsonl(log1)), "the trainer to catch up", [packer, trainer])
        trainer.send_signal(signal.SIGTERM)
        out, _ = trainer.communicate(timeout=120)
        assert trainer.returncode == 0, out[-3000:]
        chunks_at_stop = manifest(cache)["totals"]["chunks"]
        write_jsonl(src / ".part-1.tmp", corpus_texts[half:])
        os.replace(src / ".part-1.tmp", src / "part-1.jsonl")
        wait_for(lambda: manifest(cache).get("documents", 0) >= len(corpus_texts) - 1, "the packer to pack the rest", [packer])
    finally:
        for p in (packer, trainer):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.communicate(timeout=60)
    run_packerd("run", "--cache-dir", cache, "--workers", 1, "--endpoint", endpoint)   # finishes the cache
    m = load_manifest(cache)
    assert m.finished and len(m.chunks) > chunks_at_stop

    p = run_trainer(cache, runs, tmp_path, "--resume", "g")
    assert p.returncode == 0, p.stderr[-3000:]
    G = 8  # micro batch 4 x grad accum 2, one rank
    run1, run2 = records(runs, "g", 1), records(runs, "g", 2)
    stopped = max(steps(run1))
    assert events(run2, "resumed")[0]["step"] == stopped
    total = m.total_sequences // G
    assert steps(run2)[total]["total_steps"] == total > steps(run1)[stopped]["total_steps"]
    assert sorted(steps(run2)) == list(range(stopped + 1, total + 1))
    seen = [tuple(x) for k in (1, 2) for seqs in data_trace(runs, "g", k).values() for x in seqs]
    assert len(seen) == total * G and len(set(seen)) == len(seen)                # nothing twice
    everything = {(c.id, i) for c in m.chunks for i in range(c.sequences)}
    assert set(seen) <= everything and len(everything - set(seen)) < G           # all but the last partial batch
    assert any(c >= chunks_at_stop for c, _ in seen)                              # the new chunks were trained on


def test_a_trainer_started_before_the_cache_exists_waits_for_it(tmp_path, corpus_jsonl, tokenizer_dir):
    """Started on a cache folder that does not exist yet: it says it waits, and trains once packerd has
    written the cache. With data.wait_seconds it gives up with one line instead."""
    from test_trainer_follow import wait_for
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    err = tmp_path / "trainer.err"
    with open(err, "w") as f:
        trainer = subprocess.Popen(trainer_cmd(cache, runs, tmp_path, "--new", "w", "--max-steps", 3,
                                               "--checkpoint-every", 0), cwd=ROOT, stderr=f, stdout=f, text=True)
        try:
            wait_for(lambda: "waiting for the cache" in err.read_text(), "the trainer to say it waits", [trainer])
            assert not runs.exists() or not list(runs.glob("checkpoints/*"))
            run_packerd("run", "--cache-dir", cache, "--source", corpus_jsonl, "--tokenizer", tokenizer_dir,
                        "--seq-len", 64, "--chunk-sequences", 16, "--workers", 1, "--endpoint", free_endpoint(tmp_path))
            trainer.wait(timeout=120)
        finally:
            if trainer.poll() is None:
                trainer.kill()
                trainer.wait()
    assert trainer.returncode == 0, err.read_text()[-3000:]
    assert sorted(steps(records(runs, "w", 1))) == [1, 2, 3]
    p = run_trainer(tmp_path / "never", runs, tmp_path, "--new", "z", "--set", "data.wait_seconds=1")
    assert p.returncode == 1 and "gave up after 1 s" in p.stderr and "Traceback" not in p.stderr


def test_tensorboard_tracker_gets_every_step(tmp_path, cache):
    """--log-with tensorboard: accelerate's tracker writes loss, lr and tokens/s of every step under the run
    folder (skipped where tensorboard is not installed; it is not one of the project's dependencies)."""
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    runs = tmp_path / "runs"
    p = run_trainer(cache, runs, tmp_path, "--new", "tb", "--max-steps", 4, "--checkpoint-every", 0,
                    "--log-with", "tensorboard")
    assert p.returncode == 0, p.stderr[-3000:]
    files = list(runs.rglob("events.out.tfevents.*"))
    assert files, sorted(str(x.relative_to(runs)) for x in runs.rglob("*"))
    acc = EventAccumulator(str(files[0].parent))
    acc.Reload()
    assert {"loss", "lr", "tokens_per_s"} <= set(acc.Tags()["scalars"])
    logged = {r["step"]: r["loss"] for r in records(runs, "tb", 1) if "event" not in r}
    got = {e.step: e.value for e in acc.Scalars("loss")}
    assert sorted(got) == [1, 2, 3, 4] and all(abs(got[s] - logged[s]) < 1e-6 for s in got)
