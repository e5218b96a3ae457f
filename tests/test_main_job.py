"""The embedded default: the standard library as a corpus, a paced packer, and `packtrain` with no
arguments, whose trainer starts on the first chunks and grows its plan while the packer runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest



def test_the_stdlib_corpus_is_the_same_every_time_and_leaves_tests_out():
    import sysconfig

    from packerd.source import Source
    from shared.builtin import stdlib_documents
    docs = stdlib_documents()
    assert len(docs) > 300 and docs == stdlib_documents()
    src = Source(["builtin:stdlib"])
    assert [text for _, text, _ in src.documents()] == docs
    assert [i for i, _, _ in src.documents(start=100)][:2] == [100, 101]   # a restart point
    total, method = src.total_units()
    assert total == sum(len(t.encode()) for t in docs) and method == "file-sizes"
    root = sysconfig.get_paths()["stdlib"]
    with open(os.path.join(root, "json", "decoder.py"), encoding="utf-8") as f:
        assert f.read() in docs
    with open(os.path.join(root, "encodings", "cp1252.py"), encoding="utf-8") as f:
        assert f.read() not in docs          # generated codec tables: left out


class _Waits(threading.Event):
    """An Event whose wait only records how long it was asked to wait."""

    def __init__(self):
        super().__init__()
        self.asked: list[float] = []

    def wait(self, timeout=None):
        self.asked.append(timeout)
        return False


def test_pacing_holds_the_rate_it_is_given(monkeypatch):
    import packerd.pack
    from packerd.pack import Packer
    now = [100.0]                        # a clock the test moves: no real time in the assertions
    monkeypatch.setattr(packerd.pack.time, "monotonic", lambda: now[0])
    p = Packer.__new__(Packer)           # only the pacing state: no cache, source or tokenizer
    p.max_rate, p._paced, p.stop = 100_000, None, _Waits()
    p._pace(50_000)                      # half a second's worth handed over at once
    now[0] += 0.2                        # the next batch took 0.2 s to tokenize
    p._pace(50_000)
    now[0] += 2.0                        # a slow source: already behind the rate
    p._pace(10_000)
    assert p.stop.asked == [0.5, pytest.approx(0.8), 0.0]
    p.max_rate, p.stop = 0, _Waits()     # no limit: never waits
    p._pace(10**9)
    assert p.stop.asked == []


@pytest.mark.slow
def test_packtrain_without_arguments_grows_the_plan_and_evaluates(tmp_path):
    """The README's main job: about 90 s on 2 cores."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}
    env.pop("OMP_NUM_THREADS", None)
    p = subprocess.run([sys.executable, "-m", "launch"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (log,) = (tmp_path / "runs" / "training_logs").glob("tiny_stdlib_128_run_1.jsonl")
    recs = [json.loads(line) for line in log.open()]
    grown = [r for r in recs if r.get("event") == "plan_expanded"]
    first_step = next(r for r in recs if "event" not in r)
    evals = [r for r in recs if r.get("event") == "eval"]
    assert len(grown) >= 20, "the plan grew only a few times: the packer finished before the trainer started"
    assert first_step["plan_steps"] < grown[-1]["total_steps"] / 4   # it started on the first chunks
    assert evals and all(e["val_loss"] is not None for e in evals) and evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert (tmp_path / "cache" / "holdout" / "manifest.json").exists()
    assert "[packtrain] done" in p.stdout
