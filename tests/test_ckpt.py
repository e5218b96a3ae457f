"""The `ckpt` admin command on a run folder laid out as trainerd writes it.

The fixture checkpoints hold a real tiny transformers Llama (hidden 32, 2 layers, vocabulary 512 padded to 576)
saved with safetensors.torch.save_model, and the fixture BPE tokenizer, so verify and export work on real files.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from shared.fsutil import FolderLock
from trainerd.admin import cli, menu

T0 = 1_700_000_000.0
# (run, step, loss, time): runA was resumed, runB is another run with one checkpoint
CHECKPOINTS = [("runA", 100, 5.5, T0 + 100), ("runA", 200, 4.75, T0 + 200), ("runA", 300, 4.25, T0 + 300),
               ("runB", 50, 6.0, T0 + 250)]


def _xxh64(path: Path) -> str:
    import xxhash
    return xxhash.xxh64(path.read_bytes()).hexdigest()


def write_checkpoint(run_dir: Path, run: str, step: int, loss: float, t: float, model, tokenizer_identity: dict) -> Path:
    import torch
    from safetensors.torch import save_model

    name = f"{run}-step{step:08d}"
    d = run_dir / "checkpoints" / name
    d.mkdir(parents=True)
    save_model(model, str(d / "model.safetensors"))
    torch.save({"state": {}, "param_groups": [{"lr": 1e-3, "params": []}]}, d / "optimizer.pt")
    torch.save({"step": step, "scheduler": {"last_lr": 1e-3}}, d / "state.pt")
    (d / "config.json").write_text(json.dumps({"model": {"preset": "tiny"}, "train": {"lr": 1e-3, "seed": 1},
                                               "checkpoint": {"every": 100}}))
    (d / "model_config.json").write_text(json.dumps(model.config.to_dict()))
    (d / "tokenizer.json").write_text(json.dumps(tokenizer_identity))
    files = {p.name: {"bytes": p.stat().st_size, "xxh64": _xxh64(p)}
             for p in sorted(d.iterdir())}
    params = sum(p.numel() for p in model.parameters())
    meta = {"format": 1, "name": name, "run": run, "run_id": f"{run}-id", "step": step, "loss": loss,
            "tokens": step * 4096, "time": t, "elapsed_s": step * 0.5, "world_size": 1, "model": "tiny",
            "params": params, "files": files}
    (d / "meta.json").write_text(json.dumps(meta))
    return d


def write_log(run_dir: Path, run: str, k: int, steps) -> Path:
    p = run_dir / "training_logs" / f"{run}_run_{k}.jsonl"
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a") as f:
        f.write(json.dumps({"event": "started", "run": run}) + "\n")
        for s in steps:
            f.write(json.dumps({"step": s, "loss": 6.0 - s / 100, "lr": 1e-3 * min(1, s / 50), "tokens": s * 4096,
                                "tokens_per_s": 20000 + s, "total_steps": 400}) + "\n")
        f.write('{"step": 99999, "loss": 1.0, "l')   # a line cut short by a crash
    return p


@pytest.fixture(scope="module")
def template(tmp_path_factory, tokenizer_dir) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from shared.tokenizer import load_tokenizer

    identity = load_tokenizer(str(tokenizer_dir)).identity()
    assert identity["name"] == str(Path(tokenizer_dir).resolve()) and identity["vocab_size"] == 512
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=576, max_position_embeddings=128, tie_word_embeddings=True,
                         eos_token_id=0, bos_token_id=0, pad_token_id=0)
    run_dir = tmp_path_factory.mktemp("template") / "run"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    for run, step, loss, t in CHECKPOINTS:
        write_checkpoint(run_dir, run, step, loss, t, model, identity)
    (run_dir / "runs").mkdir()
    for run in ("runA", "runB"):
        (run_dir / "runs" / f"{run}.json").write_text(json.dumps({"run": run, "run_id": f"{run}-id"}))
    write_log(run_dir, "runA", 1, range(10, 201, 10))
    write_log(run_dir, "runA", 2, range(200, 301, 10))   # resumed from step 200: step 200 logged twice
    write_log(run_dir, "runB", 1, range(10, 51, 10))
    write_log(run_dir, "gone", 1, range(10, 31, 10))     # its checkpoints were deleted: an orphaned log
    write_log(run_dir, "busy", 1, range(10, 21, 10))     # training now, no checkpoint yet
    (run_dir / ".locks").mkdir()
    for run in ("runA", "busy"):
        (run_dir / ".locks" / f"{run}.lock").write_text("4242")
    crashed = run_dir / "checkpoints" / ".tmp-runA-step00000400-99999"   # a save killed half-way
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"\0" * 1000)
    saving = run_dir / "checkpoints" / ".tmp-busy-step00000020-4242"     # the busy run is saving right now
    saving.mkdir()
    (saving / "model.safetensors").write_bytes(b"\0" * 500)
    (run_dir / "checkpoints" / ".tmp-busy-step00000010_run_2-4242").mkdir()  # its line 2 saving a step again
    return run_dir


@pytest.fixture
def run_dir(template, tmp_path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "run"))


def ckpt(run_dir, *args, input=None, env=None):
    result = CliRunner().invoke(cli, [*map(str, args), "--run-dir", str(run_dir)], input=input, env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def names(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith("."))


# ---- list / show ---------------------------------------------------------------------------------
def test_list_newest_first(run_dir):
    r = ckpt(run_dir, "list")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split() == ["NAME", "RUN", "STEP", "LOSS", "VAL", "LOSS", "TOKENS", "TIME", "SIZE"]
    assert [l.split()[0] for l in lines[1:]] == ["runA-step00000300", "runB-step00000050", "runA-step00000200",
                                                 "runA-step00000100"]
    first = lines[1].split()
    assert first[1:6] == ["runA", "300", "4.2500", "-", "1,228,800"]   # no held-out loss in its meta
    assert first[6] == time.strftime("%Y-%m-%d", time.localtime(T0 + 300))
    assert first[-1] == "KB"
    assert ".tmp-" not in r.output


def test_list_json_and_run_filter(run_dir):
    r = ckpt(run_dir, "list", "--json")
    data = json.loads(r.output)
    assert [d["name"] for d in data] == ["runA-step00000300", "runB-step00000050", "runA-step00000200",
                                         "runA-step00000100"]
    meta = json.loads((run_dir / "checkpoints" / "runA-step00000300" / "meta.json").read_text())
    assert data[0] == {"name": "runA-step00000300", "run": "runA", "run_id": "runA-id", "step": 300, "loss": 4.25,
                       "val_loss": None, "tokens": 300 * 4096, "time": T0 + 300, "size": sum(f["bytes"] for f in meta["files"].values()),
                       "path": str(run_dir / "checkpoints" / "runA-step00000300"), "error": None}
    r = ckpt(run_dir, "list", "--run", "runB", "--json")
    assert [d["name"] for d in json.loads(r.output)] == ["runB-step00000050"]
    r = ckpt(run_dir, "list", "--run", "nosuch")
    assert r.exit_code == 0 and r.output.startswith("No checkpoints of run nosuch in ")
    assert json.loads(ckpt(run_dir, "list", "--run", "nosuch", "--json").output) == []


def test_list_reads_only_meta(run_dir):
    # weights replaced by garbage and the optimizer gone: list still shows the sizes meta.json records
    d = run_dir / "checkpoints" / "runA-step00000300"
    recorded = json.loads((d / "meta.json").read_text())["files"]
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    (d / "optimizer.pt").unlink()
    data = json.loads(ckpt(run_dir, "list", "--json").output)
    assert data[0]["size"] == sum(f["bytes"] for f in recorded.values())


def test_list_shows_a_checkpoint_without_meta(run_dir):
    (run_dir / "checkpoints" / "runA-step00000100" / "meta.json").unlink()
    r = ckpt(run_dir, "list")
    assert r.exit_code == 0
    line = [l for l in r.output.splitlines() if l.startswith("runA-step00000100")][0]
    assert "meta.json is missing" in line and " 100 " in line


def test_show_text_and_json(run_dir):
    r = ckpt(run_dir, "show", "runA-step00000200")
    assert r.exit_code == 0, r.output
    out = r.output
    for expected in ("name: runA-step00000200", "run: runA", "run_id: runA-id", "step: 200", "loss: 4.75",
                     "tokens: 819,200", "world_size: 1", "model: tiny", '"lr": 0.001', "config:",
                     "tokenizer: " + json.loads((run_dir / "checkpoints" / "runA-step00000200" / "tokenizer.json")
                                                .read_text())["name"]):
        assert expected in out, expected
    for f in ("model.safetensors", "optimizer.pt", "state.pt", "model_config.json", "config.json", "tokenizer.json"):
        assert any(l.strip().startswith(f) and "xxh64" in l for l in out.splitlines()), f
    assert any(l.strip().startswith("meta.json") and "this metadata" in l for l in out.splitlines())

    data = json.loads(ckpt(run_dir, "show", "runA-step00000200", "--json").output)
    assert data["meta"]["step"] == 200 and data["config"]["train"]["seed"] == 1
    assert data["model_config"]["hidden_size"] == 32 and data["tokenizer"]["vocab_size"] == 512
    files = {f["name"]: f for f in data["files"]}
    st = run_dir / "checkpoints" / "runA-step00000200" / "model.safetensors"
    assert files["model.safetensors"]["bytes"] == files["model.safetensors"]["recorded_bytes"] == st.stat().st_size


# ---- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["../x", "/etc", "a/b", "..", "../checkpoints/runA-step00000100", ".tmp-x"])
@pytest.mark.parametrize("command", [["show"], ["delete", "--yes"], ["verify"], ["export"]])
def test_names_are_not_paths(run_dir, tmp_path, bad, command):
    extra = [tmp_path / "out"] if command == ["export"] else []
    r = ckpt(run_dir, *command, bad, *extra)
    assert r.exit_code == 1
    assert r.output.count("\n") == 1 and "not a checkpoint name" in r.output and "Traceback" not in r.output
    assert names(run_dir) == ["runA-step00000100", "runA-step00000200", "runA-step00000300", "runB-step00000050"]
    assert not (tmp_path / "out").exists()


def test_symlink_out_of_the_run_folder_is_refused(run_dir, tmp_path):
    outside = tmp_path / "elsewhere"
    shutil.copytree(run_dir / "checkpoints" / "runB-step00000050", outside)
    (run_dir / "checkpoints" / "sneaky").symlink_to(outside)
    r = ckpt(run_dir, "delete", "sneaky", "--yes")
    assert r.exit_code == 1 and "refused" in r.output and r.output.count("\n") == 1
    assert (outside / "meta.json").exists()


def test_unknown_name(run_dir):
    r = ckpt(run_dir, "show", "runA-step00000999")
    assert r.exit_code == 1
    assert r.output == (f"Error: no checkpoint named 'runA-step00000999' in {run_dir / 'checkpoints'} "
                        "(`ckpt list` shows the names)\n")
    # one unknown name among good ones: nothing is deleted
    r = ckpt(run_dir, "delete", "runA-step00000100", "nosuch", "--yes")
    assert r.exit_code == 1 and "nosuch" in r.output
    assert "runA-step00000100" in names(run_dir)


def test_run_dir_errors(run_dir, tmp_path, monkeypatch):
    runner = CliRunner()
    monkeypatch.chdir(tmp_path)   # no flag, no variable: trainerd's default, ./runs
    r = runner.invoke(cli, ["list"], env={"TRAINERD_RUN_DIR": None})
    assert r.exit_code == 1 and r.output == "Error: run folder runs does not exist\n"
    shutil.copytree(run_dir, "runs")
    r = runner.invoke(cli, ["list", "--json"], env={"TRAINERD_RUN_DIR": None})
    assert r.exit_code == 0 and len(json.loads(r.output)) == 4
    r = runner.invoke(cli, ["list", "--run-dir", str(tmp_path / "missing")])
    assert r.exit_code == 1 and r.output == f"Error: run folder {tmp_path / 'missing'} does not exist\n"
    (tmp_path / "empty").mkdir()
    r = runner.invoke(cli, ["list", "--run-dir", str(tmp_path / "empty")])
    assert r.exit_code == 1 and "is not a run folder" in r.output
    r = runner.invoke(cli, ["list", "--json"], env={"TRAINERD_RUN_DIR": str(run_dir)})
    assert r.exit_code == 0 and len(json.loads(r.output)) == 4


# ---- delete / prune ------------------------------------------------------------------------------
def test_delete_asks_first(run_dir):
    r = ckpt(run_dir, "delete", "runA-step00000100", "runB-step00000050", input="n\n")
    assert r.exit_code == 1 and "Aborted!" in r.output
    assert "Delete 2 checkpoints" in r.output and "runB-step00000050  (run runB, step 50," in r.output
    assert len(names(run_dir)) == 4

    r = ckpt(run_dir, "delete", "runA-step00000100", "runB-step00000050", input="y\n")
    assert r.exit_code == 0, r.output
    assert names(run_dir) == ["runA-step00000200", "runA-step00000300"]
    assert "Deleted runA-step00000100\nDeleted runB-step00000050\n" in r.output
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-runA-step00000100")]
    # only the checkpoint folder: logs and the run record stay
    assert (run_dir / "training_logs" / "runB_run_1.jsonl").exists() and (run_dir / "runs" / "runB.json").exists()

    r = ckpt(run_dir, "delete", "runA-step00000200", "--yes")
    assert r.exit_code == 0 and names(run_dir) == ["runA-step00000300"]


def test_prune(run_dir):
    r = ckpt(run_dir, "prune", "--keep", "1", input="n\n")
    assert r.exit_code == 1 and len(names(run_dir)) == 4
    assert "Prune 2 checkpoints" in r.output
    r = ckpt(run_dir, "prune", "--keep", "2", "--yes")
    assert r.exit_code == 0 and names(run_dir) == ["runA-step00000200", "runA-step00000300", "runB-step00000050"]
    r = ckpt(run_dir, "prune", "--keep", "2", "--yes")
    assert r.exit_code == 0 and r.output == "Nothing to prune: no run has more than 2 checkpoints.\n"
    r = ckpt(run_dir, "prune", "--keep", "1", "--run", "runB", input="y\n")
    assert r.exit_code == 0 and "Nothing to prune" in r.output
    r = ckpt(run_dir, "prune", "--keep", "1", "--run", "runA", input="y\n")
    assert r.exit_code == 0 and names(run_dir) == ["runA-step00000300", "runB-step00000050"]


def test_prune_keeps_the_last_saved_not_the_highest_step(run_dir):
    # a checkpoint written last at a lower step (the run was resumed from an older checkpoint and follows a new
    # line) is the newest: it stays, the highest step of the line it left goes first (as the trainer prunes)
    d = run_dir / "checkpoints" / "runA-step00000100" / "meta.json"
    meta = json.loads(d.read_text())
    meta["time"] = T0 + 10_000
    d.write_text(json.dumps(meta))
    assert json.loads(ckpt(run_dir, "list", "--json").output)[0]["name"] == "runA-step00000100"
    r = ckpt(run_dir, "prune", "--keep", "2", "--run", "runA", "--yes")
    assert r.exit_code == 0 and names(run_dir) == ["runA-step00000100", "runA-step00000300", "runB-step00000050"]


@pytest.mark.parametrize("args, message", [
    (["--keep", "0"], "--keep must be at least 1 (got 0)"),
    (["--keep", "-3"], "--keep must be at least 1 (got -3)"),
    (["--keep", "1", "--run", "nosuch"], "run 'nosuch' has no checkpoints"),
    (["--keep", "1", "--run", "../runA"], "is not a run name"),
])
def test_prune_errors(run_dir, args, message):
    r = ckpt(run_dir, "prune", *args, "--yes")
    assert r.exit_code == 1 and message in r.output and r.output.count("\n") == 1
    assert len(names(run_dir)) == 4


def test_prune_keep_not_a_number(run_dir):
    r = ckpt(run_dir, "prune", "--keep", "many", "--yes")
    assert r.exit_code == 2 and "'many' is not a valid integer" in r.output


# ---- clean ---------------------------------------------------------------------------------------
def test_clean_leaves_a_training_run_alone(run_dir):
    lock = FolderLock(run_dir / ".locks", "busy.lock").acquire()   # the busy run's trainer
    try:
        r = ckpt(run_dir, "clean", input="n\n")
        assert r.exit_code == 1
        assert "Skipping run busy: it is training" in r.output
        assert "  checkpoints/.tmp-runA-step00000400-99999/  (unfinished save, 1.0 KB)" in r.output
        assert "  training_logs/gone_run_1.jsonl  (orphaned log: run gone has no checkpoint," in r.output
        assert "busy_run_1" not in r.output and "-busy-" not in r.output and "runA_run" not in r.output
        assert (run_dir / "checkpoints" / ".tmp-runA-step00000400-99999").exists()

        r = ckpt(run_dir, "clean", input="y\n")
        assert r.exit_code == 0 and r.output.endswith("Removed 2 items.\n"), r.output
        assert not (run_dir / "checkpoints" / ".tmp-runA-step00000400-99999").exists()
        assert not (run_dir / "training_logs" / "gone_run_1.jsonl").exists()
        assert (run_dir / "checkpoints" / ".tmp-busy-step00000020-4242").exists()
        assert (run_dir / "checkpoints" / ".tmp-busy-step00000010_run_2-4242").exists()
        assert (run_dir / "training_logs" / "busy_run_1.jsonl").exists()
        assert sorted(p.name for p in (run_dir / "training_logs").iterdir()) == [
            "busy_run_1.jsonl", "runA_run_1.jsonl", "runA_run_2.jsonl", "runB_run_1.jsonl"]
        assert len(names(run_dir)) == 4
        assert (run_dir / ".locks" / "busy.lock").read_text() == str(__import__("os").getpid())

        r = ckpt(run_dir, "clean", "--yes")
        assert r.exit_code == 0 and r.output.endswith("Nothing to clean.\n")
    finally:
        lock.release()
    # the trainer has stopped (crashed before its first checkpoint): its leftovers go now
    r = ckpt(run_dir, "clean", "--yes")
    assert r.exit_code == 0 and "Removed 3 items." in r.output
    assert not (run_dir / "training_logs" / "busy_run_1.jsonl").exists()
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")] == []


def test_a_resumed_lines_checkpoint_is_listed_under_its_run(run_dir):
    # runA resumed from step 200 (line 2) and saved step 300 again: beside the first line's, never over it
    cks = run_dir / "checkpoints"
    shutil.copytree(cks / "runA-step00000300", cks / "runA-step00000300_run_2")
    meta = json.loads((cks / "runA-step00000300_run_2" / "meta.json").read_text())
    meta.update(name="runA-step00000300_run_2", time=T0 + 10_000)
    (cks / "runA-step00000300_run_2" / "meta.json").write_text(json.dumps(meta))
    rows = json.loads(ckpt(run_dir, "list", "--json").output)
    assert [(r["name"], r["run"], r["step"]) for r in rows[:2]] == [("runA-step00000300_run_2", "runA", 300),
                                                                    ("runA-step00000300", "runA", 300)]
    r = ckpt(run_dir, "prune", "--keep", "1", "--run", "runA", "--yes")
    assert r.exit_code == 0 and names(run_dir) == ["runA-step00000300_run_2", "runB-step00000050"]


def test_clean_takes_each_unfinished_save_for_its_own_run(run_dir):
    # runB's line 2 died saving step 50 again; run old-runB (a name that extends runB's) died saving too.
    # While runB trains, only old-runB's leftover goes; runB's goes once its trainer has stopped
    cks = run_dir / "checkpoints"
    (cks / ".tmp-runB-step00000050_run_2-56").mkdir()
    (cks / ".tmp-old-runB-step00000050-57").mkdir()
    with FolderLock(run_dir / ".locks", "runB.lock"):
        r = ckpt(run_dir, "clean", "--yes")
        assert r.exit_code == 0, r.output
        assert "Skipping run runB: it is training" in r.output
        assert "checkpoints/.tmp-old-runB-step00000050-57/  (unfinished save" in r.output
        assert ".tmp-runB-step00000050_run_2-56" not in r.output and (cks / ".tmp-runB-step00000050_run_2-56").exists()
    assert not (cks / ".tmp-old-runB-step00000050-57").exists()
    r = ckpt(run_dir, "clean", "--yes")
    assert "checkpoints/.tmp-runB-step00000050_run_2-56/  (unfinished save" in r.output
    assert not (cks / ".tmp-runB-step00000050_run_2-56").exists()
    assert "runB-step00000050" in names(run_dir) and (run_dir / "training_logs" / "runB_run_1.jsonl").exists()


def test_clean_after_deleting_a_run(run_dir):
    ckpt(run_dir, "delete", "runB-step00000050", "--yes")
    r = ckpt(run_dir, "clean", "--yes")
    assert r.exit_code == 0 and "training_logs/runB_run_1.jsonl" in r.output
    assert not (run_dir / "training_logs" / "runB_run_1.jsonl").exists()
    assert (run_dir / "training_logs" / "runA_run_1.jsonl").exists()


# ---- verify --------------------------------------------------------------------------------------
def test_verify_ok(run_dir):
    r = ckpt(run_dir, "verify", "runA-step00000300")
    assert r.exit_code == 0, r.output
    assert "model.safetensors: loads and matches model_config.json" in r.output
    assert r.output.endswith("runA-step00000300: ok\n")


def test_verify_catches_a_flipped_byte(run_dir):
    st = run_dir / "checkpoints" / "runA-step00000300" / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[len(data) // 2] ^= 0x01
    st.write_bytes(bytes(data))
    r = ckpt(run_dir, "verify", "runA-step00000300")
    assert r.exit_code == 1
    assert "BAD model.safetensors: xxh64 " in r.output
    assert r.output.splitlines()[-1] == "Error: runA-step00000300 failed verification: model.safetensors"
    assert "optimizer.pt: " in r.output and "ok" in r.output


def test_verify_catches_missing_truncated_and_unloadable_files(run_dir):
    d = run_dir / "checkpoints" / "runA-step00000200"
    (d / "optimizer.pt").unlink()
    (d / "state.pt").write_bytes((d / "state.pt").read_bytes()[:-5])
    (d / "model.safetensors").write_bytes(b"\xff" * 64)          # header destroyed
    r = ckpt(run_dir, "verify", "runA-step00000200")
    assert r.exit_code == 1
    assert "BAD optimizer.pt: missing" in r.output and "BAD state.pt: " in r.output
    assert "BAD model.safetensors: does not load" in r.output
    assert r.output.splitlines()[-1] == ("Error: runA-step00000200 failed verification: model.safetensors, "
                                         "optimizer.pt, state.pt")


def test_verify_catches_weights_that_do_not_fit_the_model(run_dir):
    d = run_dir / "checkpoints" / "runA-step00000100"
    cfg = json.loads((d / "model_config.json").read_text())
    cfg["intermediate_size"] = 48
    (d / "model_config.json").write_text(json.dumps(cfg))
    meta = json.loads((d / "meta.json").read_text())
    meta["files"]["model_config.json"] = {"bytes": (d / "model_config.json").stat().st_size,
                                          "xxh64": _xxh64(d / "model_config.json")}
    (d / "meta.json").write_text(json.dumps(meta))
    r = ckpt(run_dir, "verify", "runA-step00000100")
    assert r.exit_code == 1
    assert "BAD model.safetensors: model.layers.0.mlp.down_proj.weight has shape [32, 64]" in r.output
    r = ckpt(run_dir, "export", "runA-step00000100", run_dir.parent / "out")
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert "model.safetensors does not load into model_config.json's model" in r.output
    assert not (run_dir.parent / "out").exists()


# ---- export --------------------------------------------------------------------------------------
def test_export_loads_back_and_generates(run_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf" / "tiny"
    r = ckpt(run_dir, "export", "runA-step00000300", out)
    assert r.exit_code == 0, r.output
    assert r.output == f"Exported runA-step00000300 to {out}\n"
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 576
    assert tok.eos_token_id == 0 and tok.pad_token_id == 0 and len(tok) == 512
    assert model.generation_config.eos_token_id == 0 and model.generation_config.pad_token_id == 0
    # the weights are the checkpoint's, bit for bit
    from safetensors.torch import load_file
    saved = load_file(run_dir / "checkpoints" / "runA-step00000300" / "model.safetensors")
    assert torch.equal(model.lm_head.weight, saved["lm_head.weight"])
    assert model.model.embed_tokens.weight.data_ptr() == model.lm_head.weight.data_ptr()   # still tied

    ids = tok("def main():", return_tensors="pt")
    n = ids["input_ids"].shape[1]
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert gen.shape[1] == n + 12
    new = gen[0, n:].tolist()
    assert max(new) < 512   # the padded rows of the vocabulary are suppressed
    text = tok.decode(new)
    assert isinstance(text, str) and text

    r = ckpt(run_dir, "export", "runA-step00000300", out)   # out now exists and is not empty
    assert r.exit_code == 1 and r.output == f"Error: {out} exists and is not empty; export into a new or empty folder\n"


def test_export_into_an_empty_folder_and_bad_tokenizer(run_dir, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    r = ckpt(run_dir, "export", "runB-step00000050", out)
    assert r.exit_code == 0 and (out / "model.safetensors").exists()

    tj = run_dir / "checkpoints" / "runA-step00000100" / "tokenizer.json"
    ident = json.loads(tj.read_text())
    tj.write_text(json.dumps({**ident, "vocab_hash": "0123456789abcdef"}))
    r = ckpt(run_dir, "export", "runA-step00000100", tmp_path / "x")
    assert r.exit_code == 1 and "changed since training" in r.output and not (tmp_path / "x").exists()
    tj.write_text(json.dumps({**ident, "name": str(tmp_path / "no-such-tokenizer")}))
    r = ckpt(run_dir, "export", "runA-step00000100", tmp_path / "x")
    assert r.exit_code == 1 and "cannot load tokenizer" in r.output and r.output.count("\n") == 1
    assert not (tmp_path / "x").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_builtin_tokenizer_name_resolves():
    from shared.builtin import builtin_tokenizer_dir
    from trainerd.admin import tokenizer_source
    assert tokenizer_source("builtin:bpe") == str(builtin_tokenizer_dir())
    assert tokenizer_source("gpt2") == "gpt2"


# ---- plot ----------------------------------------------------------------------------------------
def test_plot(run_dir, tmp_path):
    out = tmp_path / "loss.png"
    r = ckpt(run_dir, "plot", "runA", "runB", "--out", out)
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    r = ckpt(run_dir, "plot", "nosuch", "--out", out)
    assert r.exit_code == 1 and "no training logs for run 'nosuch'" in r.output
    r = ckpt(run_dir, "plot", "runA", "--out", tmp_path / "loss.nope")
    assert r.exit_code == 1 and "give --out a .png" in r.output


def test_plot_reads_every_log_of_a_run(run_dir):
    from trainerd.admin import RunDir, read_log
    recs = read_log(RunDir(run_dir), "runA")
    steps = [r["step"] for r in recs]
    assert steps == list(range(10, 301, 10))   # both logs, step 200 once, no events, no cut-off line


# ---- the trainer's menu ----------------------------------------------------------------------------
@click.command()
@click.argument("run_dir")
def _menu_cmd(run_dir):
    menu(run_dir)


def test_menu_uses_the_same_operations(run_dir, tmp_path):
    out = tmp_path / "exported"
    answers = ["1",                             # list
               "2", "4 runA-step00000200", "n",  # delete: asked, declined
               "2", "4", "y",                    # delete runA-step00000100 (4th newest)
               "2", "../x",                      # refused, one line, the menu goes on
               "3", "1", "y",                    # prune to one per run: runA-step00000200 goes
               "4", "y",                         # clean
               "5", "1", str(out),               # export the newest
               "9", "b"]
    r = CliRunner().invoke(_menu_cmd, [str(run_dir)], input="\n".join(answers) + "\n")
    assert r.exit_code == 0, r.output
    assert r.output.count("Checkpoint Management") == 9
    assert "Cancelled." in r.output and "Deleted runA-step00000100" in r.output
    assert "Error: '../x' is not a checkpoint name" in r.output and "Unknown choice '9'" in r.output
    assert names(run_dir) == ["runA-step00000300", "runB-step00000050"]
    assert not (run_dir / "training_logs" / "gone_run_1.jsonl").exists()
    assert (out / "model.safetensors").exists()
    # end of input leaves the menu too
    r = CliRunner().invoke(_menu_cmd, [str(run_dir)], input="")
    assert r.exit_code == 0


# ---- found by review: a training run's checkpoints, incomplete ones, damaged files ---------------------
def test_delete_and_prune_leave_a_training_runs_checkpoints_alone(run_dir):
    # a trainer whose lock is held saves, prunes and may resume from its run's checkpoints
    lock = FolderLock(run_dir / ".locks", "runA.lock").acquire()
    try:
        r = ckpt(run_dir, "delete", "runA-step00000100", "runB-step00000050", "--yes")
        assert r.exit_code == 1 and "Skipping runA-step00000100: its run is training" in r.output, r.output
        assert "Deleted runB-step00000050" in r.output and r.output.strip().splitlines()[-1].startswith("Error:")
        r = ckpt(run_dir, "prune", "--keep", "1", "--yes")
        assert r.exit_code == 1 and "Skipping runA-step00000100: its run is training" in r.output
        assert names(run_dir) == ["runA-step00000100", "runA-step00000200", "runA-step00000300"]
    finally:
        lock.release()
    r = ckpt(run_dir, "prune", "--keep", "1", "--yes")
    assert r.exit_code == 0 and names(run_dir) == ["runA-step00000300"]


def test_prune_never_counts_a_checkpoint_the_trainer_cannot_resume_among_those_kept(run_dir):
    meta = run_dir / "checkpoints" / "runA-step00000300" / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "format": 2}))   # a format this trainer cannot read
    r = ckpt(run_dir, "prune", "--keep", "1", "--run", "runA", "--yes")
    assert r.exit_code == 0 and "Skipping runA-step00000300: not a complete checkpoint" in r.output, r.output
    assert names(run_dir) == ["runA-step00000200", "runA-step00000300", "runB-step00000050"]


@pytest.mark.parametrize("field,value", [("hidden_act", "nope"), ("vocab_size", 0), ("head_dim", 0)])
def test_a_model_config_that_builds_no_model_is_one_line(run_dir, tmp_path, field, value):
    mc = run_dir / "checkpoints" / "runB-step00000050" / "model_config.json"
    mc.write_text(json.dumps({**json.loads(mc.read_text()), field: value}))
    for args in (("verify", "runB-step00000050"), ("export", "runB-step00000050", tmp_path / "out")):
        r = ckpt(run_dir, *args)
        assert r.exit_code == 1 and "model_config.json" in r.output, r.output
        assert not (tmp_path / "out").exists()


def test_export_to_a_path_it_cannot_write_is_one_line(run_dir, tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    for out, says in ((tmp_path / "afile" / "sub", "cannot export into"), (tmp_path / "link", "symbolic link")):
        r = ckpt(run_dir, "export", "runB-step00000050", out)
        assert r.exit_code == 1 and says in r.output and r.output.count("\n") == 1, r.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "run") == ["afile", "empty", "link"]


@pytest.mark.parametrize("t", [1e300, float("nan")])
def test_a_time_no_clock_can_show_is_listed_as_none(run_dir, t):
    meta = run_dir / "checkpoints" / "runB-step00000050" / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "time": t}))
    for args in (("list",), ("show", "runB-step00000050")):
        r = ckpt(run_dir, *args)
        assert r.exit_code == 0 and "runB-step00000050" in r.output, r.output
