"""Held-out loss: evaluated on the first K sequences of a validation cache by real trainer processes (one
process, and two gloo ranks), and equal to what plain transformers computes for the exported checkpoint on
the same sequences with the same positions."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, free_endpoint, free_port, write_jsonl

TINY = ["--model", "tiny", "--hidden-size", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2",
        "--threads", "1", "--log-every", "1000"]


def train(cache, runs, tmp, *args, ranks: int = 1) -> subprocess.CompletedProcess:
    launch = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(ranks),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
        str(free_port())]
    cmd = [*launch, "-m", "trainerd", "--cache-dir", str(cache), "--run-dir", str(runs),
           "--endpoint", free_endpoint(tmp), *TINY, *map(str, args)]
    env = {**os.environ, "HF_HOME": str(tmp / "hf")}  # no user accelerate config
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)


def events(runs: Path, run: str, name: str, k: int = 1) -> list[dict]:
    with open(runs / "training_logs" / f"{run}_run_{k}.jsonl") as f:
        return [r for r in map(json.loads, f) if r.get("event") == name]


@pytest.fixture(scope="module")
def caches(tmp_path_factory, corpus_texts, tokenizer_dir):
    """A training cache of the first 60 documents and a validation cache of the other ones."""
    from conftest import run_packerd
    tmp = tmp_path_factory.mktemp("eval")
    out = {}
    for name, texts in (("train", corpus_texts[:60]), ("val", corpus_texts[60:])):
        write_jsonl(tmp / f"{name}.jsonl", texts)
        run_packerd("run", "--cache-dir", tmp / name, "--source", tmp / f"{name}.jsonl", "--tokenizer", tokenizer_dir,
                    "--seq-len", 64, "--chunk-sequences", 16, "--workers", 1, "--endpoint", free_endpoint(tmp))
        out[name] = tmp / name
    return out


def reference_loss(model_dir: Path, val_cache: Path, k: int) -> tuple[float, int]:
    """transformers' own loss of the exported model on the first k sequences of the cache, positions restarting
    at each document start as the cache records them; the token-weighted mean over those sequences."""
    import torch
    from transformers import AutoModelForCausalLM

    from shared.cache import open_cache
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cache = open_cache(val_cache)
    ids, pos = [], []
    for _, chunk in cache.iter_chunks():
        for i in range(chunk.num_sequences):
            if len(ids) == k:
                break
            seq = chunk.sequence(i).astype(np.int64)
            p = np.arange(len(seq))
            for s in chunk.doc_starts_of(i):
                p[s:] = np.arange(len(seq) - s)
            ids.append(seq), pos.append(p)
    total, targets = 0.0, 0
    with torch.no_grad():
        for seq, p in zip(ids, pos):
            x, q = torch.from_numpy(seq)[None], torch.from_numpy(p)[None]
            loss = model(input_ids=x, position_ids=q, labels=x, use_cache=False).loss.item()  # mean over targets
            total += loss * (len(seq) - 1)
            targets += len(seq) - 1
    return total / targets, targets


@pytest.mark.parametrize("ranks", [1, 2])
def test_held_out_loss_is_transformers_loss_of_the_exported_checkpoint(tmp_path, caches, ranks):
    runs = tmp_path / "runs"
    p = train(caches["train"], runs, tmp_path, "--new", "e", "--max-steps", 12, "--eval-every", 5,
              "--eval-sequences", 40, "--val-cache", caches["val"], "--micro-batch-size", 4 // ranks,
              "--grad-accum", 1, ranks=ranks)
    assert p.returncode == 0, p.stderr
    evals = events(runs, "e", "eval")
    # every 5 steps and at the end, with the weights after that step
    assert [(e["step"], e["val_sequences"]) for e in evals] == [(5, 40), (10, 40), (12, 40)]
    assert all(e["val_tokens"] == 40 * 63 for e in evals)
    assert evals[0]["val_loss"] > evals[-1]["val_loss"]
    assert "eval: step 12, val_loss" in p.stderr
    meta = json.loads((runs / "checkpoints" / "e-step00000012" / "meta.json").read_text())
    assert (meta["val_loss"], meta["val_step"]) == (evals[-1]["val_loss"], 12)
    from click.testing import CliRunner

    from trainerd.admin import cli
    r = CliRunner().invoke(cli, ["export", "--run-dir", str(runs), "e-step00000012", str(tmp_path / "hf_model")])
    assert r.exit_code == 0, r.output
    want, targets = reference_loss(tmp_path / "hf_model", caches["val"], 40)
    assert targets == evals[-1]["val_tokens"]
    assert evals[-1]["val_loss"] == pytest.approx(want, rel=1e-5)
    listed = CliRunner().invoke(cli, ["list", "--run-dir", str(runs), "--json"])
    assert json.loads(listed.output)[0]["val_loss"] == evals[-1]["val_loss"]


def test_a_validation_cache_smaller_than_asked_gives_what_it_holds(tmp_path, caches):
    from shared.manifest import load_manifest
    held = load_manifest(caches["val"]).total_sequences
    runs = tmp_path / "runs"
    p = train(caches["train"], runs, tmp_path, "--new", "s", "--max-steps", 2, "--eval-every", 2,
              "--eval-sequences", held + 100, "--val-cache", caches["val"], "--micro-batch-size", 8)
    assert p.returncode == 0, p.stderr
    (e,) = events(runs, "s", "eval")
    assert e["val_sequences"] == held and e["val_loss"] is not None
    assert f"the validation cache holds {held:,} of the {held + 100:,} asked" in p.stderr


def test_the_holdout_folder_is_the_default_validation_cache(tmp_path, caches):
    """Without --val-cache, CACHE/holdout is evaluated once it exists: before, an evaluation finds nothing."""
    import shutil
    cache = tmp_path / "cache"
    shutil.copytree(caches["train"], cache)
    runs = tmp_path / "runs"
    p = train(cache, runs, tmp_path, "--new", "h", "--max-steps", 2, "--eval-every", 1, "--eval-sequences", 8,
              "--micro-batch-size", 2)
    assert p.returncode == 0, p.stderr
    assert [(e["val_sequences"], e["val_loss"]) for e in events(runs, "h", "eval")] == [(0, None), (0, None)]
    shutil.copytree(caches["val"], cache / "holdout")
    p = train(cache, runs, tmp_path, "--resume", "h", "--max-steps", 3)
    assert p.returncode == 0, p.stderr
    (e,) = events(runs, "h", "eval", k=2)
    assert (e["step"], e["val_sequences"], e["val_tokens"]) == (3, 8, 8 * 63)
