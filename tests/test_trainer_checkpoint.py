"""The checkpoint folder: layout, atomic save, weights-only loading, RNG states, keep-last-N."""
from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import pytest
import torch

from shared.fsutil import FolderLock
from trainerd import checkpoint as ck
from trainerd.config import ModelConfig
from trainerd.model import build_model, model_from_config_dict

SMALL = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)


def save(run_dir, run, step, model, opt, time=None, **kw):
    meta = {"run": run, "run_id": "abc", "step": step, "loss": 1.0 / (step + 1), "tokens": 64 * step,
            "time": 1000.0 + step if time is None else time, "elapsed_s": 1.0, "world_size": 1, "model": "tiny", "params": 1}
    state = {"step": step, "data": {"order0": np.arange(4), "n": np.int64(3)}, "rng": [ck.rng_state()]}
    return ck.save_checkpoint(run_dir, ck.ckpt_name(run, step), model=model, optimizer_state=opt.state_dict(),
                              state=state, meta=meta, config={"train": {"lr": 1e-3}},
                              model_config=model.config.to_dict(), tokenizer={"vocab_hash": "h"}, **kw)


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
    assert [x["name"] for x in ck.list_checkpoints(tmp_path)] == ["b-step00000005", "a-step00000010"]
    assert ck.find_checkpoint(tmp_path, "latest")["name"] == "a-step00000010"  # newest by time
    assert ck.find_checkpoint(tmp_path, "b")["name"] == "b-step00000005"
    assert ck.find_checkpoint(tmp_path, "a-step00000010")["step"] == 10
    with pytest.raises(ck.CheckpointError, match="no checkpoint or run named"):
        ck.find_checkpoint(tmp_path, "c")
    assert ck.remove_stale_temporaries(tmp_path, "a") == ["removed .tmp-a-step00000020-999: an unfinished save of an earlier trainer"]


def test_a_crash_while_replacing_a_checkpoint_of_the_same_step_loses_nothing(tmp_path):
    # the save of a step that exists renames the old folder aside, then the new one into place: a crash
    # between the two leaves .tmp-old-NAME-PID (complete) and no NAME; the next trainer renames it back
    m, opt = trained_model()
    path = save(tmp_path, "a", 10, m, opt)
    want = ck.read_meta(path)
    root = tmp_path / "checkpoints"
    os.replace(path, root / ".tmp-old-a-step00000010-4242")
    (root / ".tmp-a-step00000010-4242").mkdir()   # the new save, complete or not
    assert ck.list_checkpoints(tmp_path) == []
    assert ck.remove_stale_temporaries(tmp_path, "a") == [
        "removed .tmp-a-step00000010-4242: an unfinished save of an earlier trainer",
        "restored a-step00000010: a save that replaced it was interrupted"]
    assert [x["name"] for x in ck.list_checkpoints(tmp_path)] == ["a-step00000010"]
    assert ck.read_meta(root / "a-step00000010") == want and sorted(os.listdir(root)) == ["a-step00000010"]
    # with NAME in place (the crash came after the second rename), the old copy is only removed, complete
    # or half removed already
    path = save(tmp_path, "a", 20, m, opt)
    shutil.copytree(path, root / ".tmp-old-a-step00000020-7")
    shutil.copytree(path, root / ".tmp-old-a-step00000020-8")
    os.remove(root / ".tmp-old-a-step00000020-8" / "meta.json")
    assert ck.remove_stale_temporaries(tmp_path, "a") == [
        "removed .tmp-old-a-step00000020-7: the copy of a-step00000020 that a finished re-save replaced",
        "removed .tmp-old-a-step00000020-8: an unfinished save of an earlier trainer"]
    assert ck.read_meta(root / "a-step00000020") is not None and sorted(os.listdir(root)) == [
        "a-step00000010", "a-step00000020"]


def test_a_run_named_old_x_is_not_taken_for_a_re_save_of_run_x(tmp_path):
    # run old-x's unfinished save is .tmp-old-x-step00000010-PID, the very name a re-save of x-step00000010
    # would leave; its meta (written last, so present when the crash came just before the rename) names
    # old-x-step00000010. Run x's trainer must not rename it to x-step00000010.
    m, opt = trained_model()
    root = tmp_path / "checkpoints"
    (tmp_path / ck.LOCKS_DIR).mkdir()
    path = save(tmp_path, "old-x", 10, m, opt)
    os.replace(path, root / ".tmp-old-x-step00000010-77")
    assert ck.resave_leftover(root / ".tmp-old-x-step00000010-77") is None
    assert ck.restore_interrupted_resaves(tmp_path) == []
    # while a trainer of old-x is alive, x's trainer leaves it alone; after that, it is debris
    with FolderLock(root.parent / ck.LOCKS_DIR, "old-x.lock"):
        assert ck.remove_stale_temporaries(tmp_path, "x") == []
    assert ck.remove_stale_temporaries(tmp_path, "x") == [
        "removed .tmp-old-x-step00000010-77: an unfinished save of an earlier trainer"]
    assert os.listdir(root) == []
    # the re-save leftover of run old-x itself is .tmp-old-old-x-...: restored for old-x, not for x
    path = save(tmp_path, "old-x", 10, m, opt)
    os.replace(path, root / ".tmp-old-old-x-step00000010-78")
    assert ck.remove_stale_temporaries(tmp_path, "x") == []
    with FolderLock(root.parent / ck.LOCKS_DIR, "old-x.lock"):   # its trainer is alive: not touched
        assert ck.restore_interrupted_resaves(tmp_path) == []
    assert ck.restore_interrupted_resaves(tmp_path) == ["restored old-x-step00000010: a save that replaced it was interrupted"]


def test_prune_never_removes_the_save_just_written(tmp_path):
    # the clock was set back between saves: the save of step 30 has the oldest time of all
    m, opt = trained_model()
    for step in (10, 20):
        save(tmp_path, "a", step, m, opt)
    save(tmp_path, "a", 30, m, opt, time=1.0)
    assert ck.prune(tmp_path, "a", keep=2) == ["a-step00000030"]   # what a clock set back did without keep_name
    save(tmp_path, "a", 30, m, opt, time=1.0)
    assert ck.prune(tmp_path, "a", keep=2, keep_name="a-step00000030") == ["a-step00000010"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["a-step00000020", "a-step00000030"]


def test_keep_last_n(tmp_path):
    m, opt = trained_model()
    for step in (1, 2, 3, 4):
        save(tmp_path, "a", step, m, opt)
    save(tmp_path, "b", 1, m, opt)
    assert ck.prune(tmp_path, "a", keep=2) == ["a-step00000001", "a-step00000002"]
    assert sorted(x["name"] for x in ck.list_checkpoints(tmp_path)) == ["a-step00000003", "a-step00000004", "b-step00000001"]


def test_a_run_resumed_from_an_older_step_keeps_its_new_saves(tmp_path):
    # steps 30, 40, 50 kept; the run is resumed from step 30 and saves at 35 and 45 (a new line). By step,
    # the prune after the save at 45 would delete 35, and --resume a would go back to step 50 of the old line
    m, opt = trained_model()
    for step in (10, 20, 30, 40, 50):
        save(tmp_path, "a", step, m, opt)
        ck.prune(tmp_path, "a", keep=3)
    save(tmp_path, "a", 35, m, opt, time=2000.0)
    assert ck.prune(tmp_path, "a", keep=3) == ["a-step00000030"]
    save(tmp_path, "a", 45, m, opt, time=2001.0)
    assert ck.prune(tmp_path, "a", keep=3) == ["a-step00000040"]
    assert [x["name"] for x in ck.list_checkpoints(tmp_path)] == ["a-step00000050", "a-step00000035", "a-step00000045"]
    assert ck.find_checkpoint(tmp_path, "a")["name"] == ck.find_checkpoint(tmp_path, "latest")["name"] == "a-step00000045"


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


def test_lock_probes_create_nothing_and_a_starting_trainer_waits_them_out(tmp_path):
    import threading
    import time
    from shared.fsutil import LockHeld
    with ck.run_lock_free(tmp_path, "never") as free:      # a run never trained here: no lock file made
        assert free
    assert not (tmp_path / ck.LOCKS_DIR / "never.lock").exists()
    lock = ck.acquire_run_lock(tmp_path, "r")
    with ck.run_lock_free(tmp_path, "r") as free:
        assert not free                                    # its trainer is alive
    lock.release()
    assert (tmp_path / ck.LOCKS_DIR / "r.lock").read_text() == str(os.getpid())
    # a probe (ckpt clean, another trainer's restore) holds the lock for a moment: a trainer starting
    # then retries instead of reporting "another trainer is running"
    probe = ck.run_lock_free(tmp_path, "r")
    assert probe.__enter__()
    threading.Timer(0.3, probe.__exit__, (None, None, None)).start()
    ck.acquire_run_lock(tmp_path, "r", patience_s=10).release()
    with ck.run_lock_free(tmp_path, "r"):
        with pytest.raises(LockHeld):
            ck.acquire_run_lock(tmp_path, "r", patience_s=0.2)
