"""The checkpoint folder: layout, atomic save, weights-only loading, RNG states, keep-last-N."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from trainerd import checkpoint as ck
from trainerd.config import ModelConfig
from trainerd.model import build_model, model_from_config_dict
from trainerd.rundir import LOCKS, RunDir, TrainError, ckpt_name

SMALL = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)


def save(run_dir, run, step, model, opt, time=None, name=None, **kw):
    meta = {"run": run, "run_id": "abc", "step": step, "loss": 1.0 / (step + 1), "tokens": 64 * step,
            "time": 1000.0 + step if time is None else time, "elapsed_s": 1.0, "world_size": 1, "model": "tiny", "params": 1}
    state = {"step": step, "data": {"order0": np.arange(4), "n": np.int64(3)}, "rng": [ck.rng_state()]}
    return ck.save_checkpoint(run_dir, name or ckpt_name(run, step), model=model, optimizer_state=opt.state_dict(),
                              state=state, meta=meta, config={"train": {"lr": 1e-3}},
                              model_config=model.config.to_dict(), tokenizer={"vocab_hash": "h"}, **kw)


def names(run_dir, run=None):
    """Complete checkpoints, oldest first."""
    return [c.name for c in reversed(RunDir(run_dir).checkpoints(run, complete=True))]


def prune(run_dir, run, keep, keep_name=None):
    """What the trainer does after a save: delete all but the newest KEEP of the run; returns the names."""
    rd = RunDir(run_dir)
    doomed = rd.prune_plan(keep, run=run, keep_name=keep_name)[0]
    for c in doomed:
        rd.delete(c)
    return sorted(c.name for c in doomed)


def trained_model():
    torch.manual_seed(0)
    m = build_model(SMALL, 512, 64, 0)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    x = torch.randint(0, 512, (2, 64))
    m(input_ids=x, labels=x).loss.backward()
    opt.step()
    return m, opt


def test_layout_and_round_trip(tmp_path):
    m, opt = trained_model()
    path = save(tmp_path, "r", 200, m, opt)
    assert path.name == "r-step00000200"
    assert sorted(os.listdir(path)) == sorted(["meta.json", *ck.FILES])
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 200 and meta["run"] == "r" and meta["files"]["model.safetensors"]["bytes"] > 0
    assert not [p for p in os.listdir(tmp_path / "checkpoints") if p.startswith(".tmp-")]

    back = model_from_config_dict(ck.read_json(path, "model_config.json"))
    ck.load_weights(path, back)
    for (k, a), b in zip(m.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k
    assert back.lm_head.weight is back.model.embed_tokens.weight
    opt2 = torch.optim.AdamW(back.parameters(), lr=1e-3)
    opt2.load_state_dict(ck.load_torch(path, "optimizer.pt"))
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    state = ck.load_torch(path, "state.pt")   # weights_only: numpy was turned into plain lists
    assert state["data"] == {"order0": [0, 1, 2, 3], "n": 3}


def test_rng_states_restore_every_generator(tmp_path):
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    s = ck.rng_state()
    want = (torch.rand(3), np.random.rand(3), random.random())
    torch.save(ck.plain(s), tmp_path / "s.pt")
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    ck.set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]


def test_unfinished_save_is_invisible_and_latest_is_found(tmp_path):
    m, opt = trained_model()
    save(tmp_path, "a", 10, m, opt)
    save(tmp_path, "b", 5, m, opt)
    (tmp_path / "checkpoints" / ".tmp-a-step00000020-999").mkdir()
    (tmp_path / "checkpoints" / "a-step00000030").mkdir()  # no meta.json: not a checkpoint
    rd = RunDir(tmp_path)
    assert names(tmp_path) == ["b-step00000005", "a-step00000010"]
    assert rd.find("latest").name == "a-step00000010"  # newest by time
    assert rd.find("b").name == "b-step00000005"
    assert rd.find("a-step00000010").step == 10
    with pytest.raises(TrainError, match="no checkpoint or run named"):
        rd.find("c")
    assert rd.remove_unfinished_saves("a") == ["removed .tmp-a-step00000020-999: an unfinished save of an earlier trainer"]


def test_a_save_never_replaces_a_folder_and_a_resumed_line_saves_under_its_own_name(tmp_path):
    # run a saved steps 10 and 20; line 2 resumed from step 10 and reaches step 20 again: it saves beside
    # the first line's step 20, never over it, and the first line's folder is untouched
    m, opt = trained_model()
    save(tmp_path, "a", 10, m, opt)
    first = save(tmp_path, "a", 20, m, opt)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    rd = RunDir(tmp_path)
    with pytest.raises(ck.CheckpointError, match="exists already"):
        save(tmp_path, "a", 20, m, opt)
    assert not [p for p in os.listdir(tmp_path / "checkpoints") if p.startswith(".tmp-")]
    (tmp_path / "training_logs").mkdir()
    (tmp_path / "training_logs" / "a_run_1.jsonl").write_text("")
    assert rd.next_line("a") == 2
    name = rd.save_name("a", 20, line=2)
    assert name == "a-step00000020_run_2" and rd.save_name("a", 30, line=2) == "a-step00000030"
    second = save(tmp_path, "a", 20, m, opt, time=5000.0, name=name)
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert rd.find("a").path == second and rd.find("a").step == 20 and rd.find("a").run == "a"
    # a line number shown only by a checkpoint (its log deleted by hand) is never taken again
    (tmp_path / "training_logs" / "a_run_1.jsonl").unlink()
    assert rd.next_line("a") == 3 and rd.next_line("b") == 1


def test_a_trainer_removes_only_its_own_runs_unfinished_saves(tmp_path):
    # run names may extend one another (a, a-step1x, old-a): only the exact run's leftovers are its own
    m, opt = trained_model()
    root = tmp_path / "checkpoints"
    save(tmp_path, "a", 10, m, opt)
    for leftover in (".tmp-a-step00000020-7", ".tmp-a-step00000020_run_2-8", ".tmp-a-step1x-step00000010-9",
                     ".tmp-old-a-step00000010-10", ".tmp-ab-step00000010-11"):
        (root / leftover).mkdir()
    rd = RunDir(tmp_path)
    assert rd.remove_unfinished_saves("a") == [
        "removed .tmp-a-step00000020-7: an unfinished save of an earlier trainer",
        "removed .tmp-a-step00000020_run_2-8: an unfinished save of an earlier trainer"]
    assert sorted(os.listdir(root)) == [".tmp-a-step1x-step00000010-9", ".tmp-ab-step00000010-11",
                                        ".tmp-old-a-step00000010-10", "a-step00000010"]
    assert [i.runs for i in rd.unfinished_saves()] == [("a-step1x",), ("ab",), ("old-a",)]


def test_prune_never_removes_the_save_just_written(tmp_path):
    # the clock was set back between saves: the save of step 30 has the oldest time of all
    m, opt = trained_model()
    for step in (10, 20):
        save(tmp_path, "a", step, m, opt)
    save(tmp_path, "a", 30, m, opt, time=1.0)
    assert prune(tmp_path, "a", keep=2) == ["a-step00000030"]   # what a clock set back did without keep_name
    save(tmp_path, "a", 30, m, opt, time=1.0)
    assert prune(tmp_path, "a", keep=2, keep_name="a-step00000030") == ["a-step00000010"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["a-step00000020", "a-step00000030"]


def test_keep_last_n(tmp_path):
    m, opt = trained_model()
    for step in (1, 2, 3, 4):
        save(tmp_path, "a", step, m, opt)
    save(tmp_path, "b", 1, m, opt)
    assert prune(tmp_path, "a", keep=2) == ["a-step00000001", "a-step00000002"]
    assert sorted(names(tmp_path)) == ["a-step00000003", "a-step00000004", "b-step00000001"]


def test_a_run_resumed_from_an_older_step_keeps_its_new_saves(tmp_path):
    # steps 30, 40, 50 kept; the run is resumed from step 30 and saves at 35 and 45 (a new line). By step,
    # the prune after the save at 45 would delete 35, and --resume a would go back to step 50 of the old line
    m, opt = trained_model()
    for step in (10, 20, 30, 40, 50):
        save(tmp_path, "a", step, m, opt)
        prune(tmp_path, "a", keep=3)
    save(tmp_path, "a", 35, m, opt, time=2000.0)
    assert prune(tmp_path, "a", keep=3) == ["a-step00000030"]
    save(tmp_path, "a", 45, m, opt, time=2001.0)
    assert prune(tmp_path, "a", keep=3) == ["a-step00000040"]
    assert names(tmp_path) == ["a-step00000050", "a-step00000035", "a-step00000045"]
    rd = RunDir(tmp_path)
    assert rd.find("a").name == rd.find("latest").name == "a-step00000045"


def test_pickled_code_is_refused(tmp_path):
    m, opt = trained_model()
    path = save(tmp_path, "a", 1, m, opt)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"step": Evil()}, path / "state.pt")
    with pytest.raises(ck.CheckpointError, match="state.pt"):
        ck.load_torch(path, "state.pt")


def test_weights_that_do_not_fit_are_one_error(tmp_path):
    m, opt = trained_model()
    path = save(tmp_path, "a", 1, m, opt)
    other = build_model(ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2), 512, 64, 0)
    with pytest.raises(ck.CheckpointError, match="do not fit"):
        ck.load_weights(path, other)


def test_a_complete_checkpoint_outside_the_listing_is_never_removed(tmp_path):
    # a folder moved aside by hand (or a save cut between its last fsync and its rename) may be the only
    # copy of a checkpoint: neither the run's next trainer nor `ckpt clean` removes it; both say how to use it
    from click.testing import CliRunner

    from trainerd.admin import cli
    m, opt = trained_model()
    path = save(tmp_path, "a", 10, m, opt)
    aside = tmp_path / "checkpoints" / ".tmp-old-a-step00000010-4242"
    os.replace(path, aside)
    (tmp_path / "checkpoints" / ".tmp-a-step00000020-4243").mkdir()   # an unfinished save: removed
    rd = RunDir(tmp_path)
    assert rd.remove_unfinished_saves("a") == [
        "removed .tmp-a-step00000020-4243: an unfinished save of an earlier trainer",
        f"kept .tmp-old-a-step00000010-4242: it holds the complete checkpoint a-step00000010, which is not listed; "
        f"rename it to {tmp_path / 'checkpoints' / 'a-step00000010'} to use it"]
    r = CliRunner().invoke(cli, ["clean", "--run-dir", str(tmp_path), "--yes"])
    assert r.exit_code == 0 and "Kept .tmp-old-a-step00000010-4242" in r.output and aside.is_dir(), r.output
    os.replace(aside, path)
    assert rd.find("a").name == "a-step00000010" and rd.stranded_lines() == []


def test_a_delete_cut_short_is_removed_by_the_next_trainer_not_kept_as_a_copy(tmp_path, monkeypatch):
    # a delete renames the checkpoint out of the listing, then unlinks its meta.json: cut in between (a second
    # Ctrl-C, a crash), the folder still held a complete checkpoint and was kept at every start as a copy
    import pathlib
    m, opt = trained_model()
    save(tmp_path, "a", 10, m, opt)
    save(tmp_path, "a", 20, m, opt)
    rd = RunDir(tmp_path)
    real_unlink = pathlib.Path.unlink

    def cut_short(self, *a, **kw):
        if self.name == "meta.json":
            raise KeyboardInterrupt
        return real_unlink(self, *a, **kw)

    monkeypatch.setattr(pathlib.Path, "unlink", cut_short)
    with pytest.raises(KeyboardInterrupt):
        rd.delete(rd.find("a-step00000010"))
    monkeypatch.undo()
    left = [p for p in os.listdir(tmp_path / "checkpoints") if p.startswith(".tmp-")]
    assert len(left) == 1 and (tmp_path / "checkpoints" / left[0] / "meta.json").exists()
    assert rd.stranded_lines() == []
    assert rd.remove_unfinished_saves("a") == [f"removed {left[0]}: an unfinished delete of an earlier trainer"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["a-step00000020"]


def test_lock_probes_create_nothing_and_a_starting_trainer_waits_them_out(tmp_path):
    import threading
    rd = RunDir(tmp_path)
    with rd.hold_run(("never",)) as free:                 # a run never trained here: no lock file made
        assert free
    assert not (tmp_path / LOCKS / "never.lock").exists()
    lock = rd.lock_run("r")
    with rd.hold_run(("r",)) as free:
        assert not free                                    # its trainer is alive
    lock.release()
    assert (tmp_path / LOCKS / "r.lock").read_text() == str(os.getpid())
    # a probe (ckpt clean) holds the lock for a moment: a trainer starting then retries instead of
    # reporting "another trainer is running"
    probe = rd.hold_run(("r",))
    assert probe.__enter__()
    threading.Timer(0.3, probe.__exit__, (None, None, None)).start()
    rd.lock_run("r", patience_s=10).release()
    with rd.hold_run(("r",)):
        with pytest.raises(TrainError, match="another trainer is running run r"):
            rd.lock_run("r", patience_s=0.2)
