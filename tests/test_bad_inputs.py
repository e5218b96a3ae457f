"""Bad inputs to the three commands (packerd, trainerd, ckpt): each gives one line starting with "Error",
a non-zero exit, and writes nothing (no file or folder in the workspace is created, changed or removed).

The commands are the real click commands (packerd.cli:main, trainerd.__main__:main, trainerd.admin:cli) run
in-process with CliRunner, against a real cache packed by packerd and a real checkpoint folder written by
trainerd.checkpoint.save_checkpoint. Click's own usage errors (an unknown choice, a missing option) print
`Usage:` and `Try ... --help` above their single `Error:` line; that is click's format and is accepted for
those few cases only (kind "usage").

tests/test_packerd.py::test_bad_inputs and ::test_bad_tokenizers cover other packerd inputs (missing file,
bad JSON, non-UTF-8 jsonl, missing text field, non-text value, .csv, seq_len 1, chunk_sequences 0, http://
endpoint, bad TOML, unknown tokenizer, no EOS, unknown --eos); the cases here are different ones.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner

from conftest import run_packerd, write_jsonl


def record(**fields) -> None:
    """Append one result record for bench/faults.py (only when FAULTS_REPORT names a file)."""
    path = os.environ.get("FAULTS_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(fields) + "\n")


# ---- the workspace: a real cache, a real run folder, a few bad files -----------------------------------------
@dataclass
class WS:
    root: Path
    tok: Path
    src: Path
    cache: Path
    runs: Path
    ckpt: str
    endpoint: str
    case: str = ""                             # the id of the case being run: each gets its own new cache folder


@pytest.fixture(scope="module")
def ws(tmp_path_factory, corpus_texts, tokenizer_dir) -> WS:
    root = tmp_path_factory.mktemp("bad")
    src = write_jsonl(root / "docs.jsonl", corpus_texts[:6])
    endpoint = f"ipc://{tmp_path_factory.mktemp('ep')}/p.sock"
    cache = root / "cache"
    run_packerd("run", "--cache-dir", cache, "--source", src, "--tokenizer", tokenizer_dir, "--seq-len", 64,
                "--chunk-sequences", 16, "--workers", 1, "--endpoint", endpoint)
    runs = root / "runs"
    ckpt = _real_checkpoint(runs, cache)
    (root / "runs_empty" / "checkpoints").mkdir(parents=True)
    (root / "not_a_run_dir").mkdir()
    (root / "not_a_run_dir" / "notes.txt").write_text("hello\n")
    return WS(root, Path(tokenizer_dir), src, cache, runs, ckpt, endpoint)


def _real_checkpoint(runs: Path, cache: Path) -> str:
    """A checkpoint exactly as the trainer saves it (tiny model), plus the run's log."""
    import torch

    from shared.manifest import load_manifest
    from trainerd import checkpoint as ck
    from trainerd.config import load_config
    from trainerd.model import build_model
    m = load_manifest(cache)
    cfg = load_config(None, {"data.cache_dir": str(cache), "train.run_dir": str(runs), "model.hidden_size": 32,
                             "model.num_layers": 2, "model.num_heads": 4, "model.num_kv_heads": 2})
    torch.manual_seed(0)
    model = build_model(cfg.model, m.tokenizer["vocab_size"], m.seq_len, m.tokenizer["eos_id"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    name = "good-step00000004"
    meta = {"run": "good", "run_id": "abc", "step": 4, "loss": 6.0, "tokens": 2048, "time": 1_700_000_000.0,
            "elapsed_s": 1.0, "world_size": 1, "model": "tiny", "params": 1}
    ck.save_checkpoint(runs, name, model=model, optimizer_state=opt.state_dict(), state={"step": 4, "rng": [ck.rng_state()]},
                       meta=meta, config=cfg.to_dict(), model_config=model.config.to_dict(), tokenizer=m.tokenizer)
    log = runs / "training_logs" / "good_run_1.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text("".join(json.dumps({"step": s, "loss": 6.0 - s / 10, "lr": 1e-3, "tokens": 512 * s,
                                       "tokens_per_s": 1000.0, "total_steps": 4}) + "\n" for s in range(1, 5)))
    return name


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root with its type, size and modification time."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_mode >> 12, st.st_size if n in filenames else 0, st.st_mtime_ns)
    return out


# ---- the cases ---------------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    cli: str                                   # packerd | trainerd | ckpt
    args: Callable[[WS], list]                 # argv after the command name
    expect: str                                # part of the Error line
    setup: Callable[[WS], None] | None = None  # files the case needs, made before the snapshot
    kind: str = "error"                        # error: ClickException (exit 1); usage: click usage error (exit 2)
    env: dict = field(default_factory=dict)


def _write(rel: str, text: str | bytes):
    def make(w: WS):
        p = w.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text) if isinstance(text, bytes) else p.write_text(text)
    return make


def _pq_without_text(w: WS):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": ["a", "b"]}), w.root / "notext.parquet")


def _corrupt_ckpt_config(w: WS):
    d = w.runs / "checkpoints" / "broken-step00000002"
    if not d.exists():
        shutil.copytree(w.runs / "checkpoints" / w.ckpt, d)
        meta = json.loads((d / "meta.json").read_text())
        meta.update(name=d.name, run="broken", step=2)
        (d / "meta.json").write_text(json.dumps(meta))
        (d / "config.json").write_text("{not json")


def _other_cache(name: str, *flags):
    """A validation cache packed from the workspace's documents with other settings (made once)."""
    def make(w: WS):
        if not (w.root / name).exists():
            run_packerd("run", "--cache-dir", w.root / name, "--source", w.src, "--workers", 1,
                        "--endpoint", w.endpoint, *[a(w) if callable(a) else a for a in flags])
    return make


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _missing_tracker() -> str | None:
    """A tracker accelerate knows whose package is not installed here (wandb, mlflow, ...)."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType
    installed = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    return next((t.value for t in LoggerType if t.value not in installed and t.value != "all"), None)


MISSING_TRACKER = _missing_tracker()


def P(*args):   # packerd run with the workspace's endpoint and one worker
    return lambda w: ["run", "--endpoint", w.endpoint, "--workers", "1", *[a(w) if callable(a) else a for a in args]]


def T(*args):   # trainerd with the workspace's run folder and endpoint
    return lambda w: ["--run-dir", str(w.runs), "--endpoint", w.endpoint, *[a(w) if callable(a) else a for a in args]]


def TM(*args):  # trainerd on several caches: the run folder, each cache's endpoint from its manifest
    return lambda w: ["--run-dir", str(w.runs), *[a(w) if callable(a) else a for a in args]]


def C(*args):   # ckpt
    return lambda w: [a(w) if callable(a) else a for a in args]


CACHE = lambda w: str(w.root / f"new-{w.case}")    # noqa: E731  a cache folder that does not exist yet
SRC = lambda w: str(w.src)                          # noqa: E731
TOK = lambda w: str(w.tok)                          # noqa: E731
REAL_CACHE = lambda w: str(w.cache)                 # noqa: E731
RUNS = lambda w: str(w.runs)                        # noqa: E731
R = lambda rel: (lambda w: str(w.root / rel))       # noqa: E731

CASES = [
    # packerd: missing settings, bad values, bad config files
    # no --source: FineWeb-Edu from the hub, which the tests run offline (HF_HUB_OFFLINE=1, conftest.py)
    Case("packerd-no-source-offline", "packerd", P("--cache-dir", CACHE, "--tokenizer", TOK),
         "source hf:HuggingFaceFW/fineweb-edu:sample-10BT:train cannot be loaded"),
    Case("packerd-no-tokenizer", "packerd", P("--cache-dir", CACHE, "--source", SRC), "no tokenizer given"),
    Case("packerd-no-cache-dir", "packerd", P("--source", SRC, "--tokenizer", TOK), "cache_dir is required"),
    Case("packerd-workers-negative", "packerd", lambda w: ["run", "--cache-dir", CACHE(w), "--source", SRC(w), "--tokenizer", TOK(w),
                                                           "--endpoint", w.endpoint, "--workers", "-1"], "workers must be 0 or more"),
    Case("packerd-lz4-level-13", "packerd", P("--cache-dir", CACHE, "--source", SRC, "--tokenizer", TOK, "--lz4-level", "13"),
         "lz4_level must be between 0 and 12"),
    Case("packerd-mode-unknown", "packerd", P("--cache-dir", CACHE, "--source", SRC, "--tokenizer", TOK, "--mode", "sideways"),
         "Invalid value for '--mode'", kind="usage"),
    Case("packerd-seq-len-not-a-number", "packerd", P("--cache-dir", CACHE, "--source", SRC, "--tokenizer", TOK, "--seq-len", "big"),
         "Invalid value for '--seq-len'", kind="usage"),
    Case("packerd-config-unknown-key", "packerd", P("--config", R("unknown.toml"), "--cache-dir", CACHE, "--source", SRC, "--tokenizer", TOK),
         "sequence_length", setup=_write("unknown.toml", "sequence_length = 64\n")),
    Case("packerd-config-wrong-type", "packerd", P("--config", R("wrongtype.toml"), "--cache-dir", CACHE, "--source", SRC, "--tokenizer", TOK),
         "seq_len", setup=_write("wrongtype.toml", 'seq_len = "long"\n')),
    Case("packerd-config-not-utf8", "packerd", P("--config", R("latin1p.toml"), "--cache-dir", CACHE, "--source", SRC, "--tokenizer", TOK),
         "is not UTF-8 text", setup=_write("latin1p.toml", "# caf\xe9\nseq_len = 64\n".encode("latin-1"))),
    Case("packerd-config-missing", "packerd", P("--config", R("nope.toml"), "--cache-dir", CACHE, "--source", SRC, "--tokenizer", TOK),
         "does not exist"),
    Case("packerd-source-empty-folder", "packerd", P("--cache-dir", CACHE, "--source", R("emptysrc"), "--tokenizer", TOK),
         "has no .jsonl, .json, .parquet or .txt files", setup=lambda w: (w.root / "emptysrc").mkdir(exist_ok=True)),
    Case("packerd-source-glob-matches-nothing", "packerd", P("--cache-dir", CACHE, "--source", R("nowhere/*.jsonl"), "--tokenizer", TOK),
         "has no .jsonl, .json, .parquet or .txt files"),
    Case("packerd-source-bad-hf-spec", "packerd", P("--cache-dir", CACHE, "--source", "hf:", "--tokenizer", TOK),
         "expected hf:NAME"),
    Case("packerd-source-txt-not-utf8", "packerd", P("--cache-dir", CACHE, "--source", R("latin1.txt"), "--tokenizer", TOK),
         "not UTF-8", setup=_write("latin1.txt", b"caf\xe9 \xff\xfe au lait\n")),
    Case("packerd-source-json-object-without-text", "packerd", P("--cache-dir", CACHE, "--source", R("object.json"), "--tokenizer", TOK),
         "has no field 'text'", setup=_write("object.json", '{"title": "x", "body": [1, 2]}\n')),
    Case("packerd-source-empty-file", "packerd", P("--cache-dir", CACHE, "--source", R("empty.jsonl"), "--tokenizer", TOK),
         "empty.jsonl", setup=_write("empty.jsonl", "")),
    Case("packerd-source-parquet-no-text", "packerd", P("--cache-dir", CACHE, "--source", R("notext.parquet"), "--tokenizer", TOK),
         "has no field 'text'", setup=_pq_without_text),
    Case("packerd-text-field-absent", "packerd", P("--cache-dir", CACHE, "--source", SRC, "--tokenizer", TOK, "--text-field", "body"),
         "has no field 'body'"),
    Case("packerd-tokenizer-empty-folder", "packerd", P("--cache-dir", CACHE, "--source", SRC, "--tokenizer", R("emptytok")),
         "cannot load tokenizer", setup=lambda w: (w.root / "emptytok").mkdir(exist_ok=True)),
    Case("packerd-tokenizer-json-garbage", "packerd", P("--cache-dir", CACHE, "--source", SRC, "--tokenizer", R("garbage/tokenizer.json")),
         "cannot load tokenizer", setup=_write("garbage/tokenizer.json", '{"version": "1.0", "model": 12}')),
    Case("packerd-cache-other-tokenizer", "packerd", P("--cache-dir", REAL_CACHE, "--tokenizer", "builtin:bpe"),
         "tokenizer"),
    Case("packerd-cache-manifest-corrupt", "packerd", P("--cache-dir", R("badcache"), "--source", SRC, "--tokenizer", TOK),
         "manifest", setup=_write("badcache/manifest.json", '{"seq_len": 64, "chunks": [')),
    Case("packerd-curve-dir-without-keys", "packerd", P("--cache-dir", CACHE, "--source", SRC, "--tokenizer", TOK, "--curve-dir", R("nokeys")),
         "has no server.key_secret", setup=lambda w: (w.root / "nokeys").mkdir(exist_ok=True)),
    Case("packerd-holdout-above-half", "packerd", P("--cache-dir", CACHE, "--source", SRC, "--tokenizer", TOK, "--holdout", "0.7"),
         "holdout must be in (0, 0.5] (got 0.7)"),
    Case("packerd-holdout-zero", "packerd", P("--cache-dir", CACHE, "--source", SRC, "--tokenizer", TOK, "--holdout", "0"),
         "holdout must be in (0, 0.5] (got 0.0)"),
    Case("packerd-shard-index-equals-count", "packerd", P("--cache-dir", CACHE, "--source", SRC, "--tokenizer", TOK, "--shard", "3/3"),
         "shard index I must be below N: the shards of 3 are 0/3 to 2/3 (got '3/3')"),
    Case("packerd-shard-negative", "packerd", P("--cache-dir", CACHE, "--source", SRC, "--tokenizer", TOK, "--shard", "-1/2"),
         "shard must be I/N, shard I of N counted from 0, e.g. 0/4 (got '-1/2')"),
    Case("packerd-shard-count-zero", "packerd", P("--cache-dir", CACHE, "--source", SRC, "--tokenizer", TOK, "--shard", "1/0"),
         "shard count N must be at least 1 (got '1/0')"),
    Case("packerd-shard-not-numbers", "packerd", P("--cache-dir", CACHE, "--source", SRC, "--tokenizer", TOK, "--shard", "a/b"),
         "shard must be I/N"),
    Case("packerd-shard-on-an-unsharded-cache", "packerd", P("--cache-dir", REAL_CACHE, "--shard", "0/2"),
         "was packed with shard None (now '0/2')"),
    Case("packerd-status-no-manifest", "packerd", C("status", "--cache-dir", R("not_a_run_dir")), "has no manifest"),
    Case("packerd-verify-missing-folder", "packerd", C("verify", "--cache-dir", R("missing")), "has no manifest"),
    Case("packerd-keys-into-nonempty-folder", "packerd", C("keys", R("not_a_run_dir")), "is not empty"),
    # trainerd: flags, --set, config files, the cache, run names, resume
    Case("trainerd-set-without-equals", "trainerd", T("--cache-dir", REAL_CACHE, "--new", "x", "--set", "train.lr"),
         "expected section.key=value"),
    Case("trainerd-set-unknown-key", "trainerd", T("--cache-dir", REAL_CACHE, "--new", "x", "--set", "train.learning_rate=1"),
         "train.learning_rate"),
    Case("trainerd-set-not-a-number", "trainerd", T("--cache-dir", REAL_CACHE, "--new", "x", "--set", "train.lr=fast"),
         "train.lr"),
    Case("trainerd-lr-negative", "trainerd", T("--cache-dir", REAL_CACHE, "--new", "x", "--lr", "-1"), "train.lr must be positive"),
    Case("trainerd-hidden-not-multiple-of-heads", "trainerd",
         T("--cache-dir", REAL_CACHE, "--new", "x", "--hidden-size", "30", "--heads", "4"), "must be a multiple of model.num_heads"),
    Case("trainerd-kv-heads-not-dividing", "trainerd",
         T("--cache-dir", REAL_CACHE, "--new", "x", "--heads", "4", "--kv-heads", "3"), "must divide model.num_heads"),
    Case("trainerd-epoch-fraction-above-1", "trainerd", T("--cache-dir", REAL_CACHE, "--new", "x", "--epoch-fraction", "1.5"),
         "data.epoch_fraction"),
    Case("trainerd-endpoint-http", "trainerd", lambda w: ["--run-dir", str(w.runs), "--cache-dir", REAL_CACHE(w), "--new", "x",
                                                          "--endpoint", "http://127.0.0.1:5557"], "data.endpoint must start"),
    Case("trainerd-max-steps-zero", "trainerd", T("--cache-dir", REAL_CACHE, "--new", "x", "--max-steps", "0"),
         "train.max_steps must be at least 1"),
    Case("trainerd-model-unknown", "trainerd", T("--cache-dir", REAL_CACHE, "--new", "x", "--model", "huge"),
         "Invalid value for '--model'", kind="usage"),
    Case("trainerd-config-bad-toml", "trainerd", T("--config", R("bad.toml"), "--cache-dir", REAL_CACHE, "--new", "x"),
         "not valid TOML", setup=_write("bad.toml", "[train\nlr = 1\n")),
    Case("trainerd-config-not-utf8", "trainerd", T("--config", R("latin1.toml"), "--cache-dir", REAL_CACHE, "--new", "x"),
         "is not UTF-8 text", setup=_write("latin1.toml", "[train]\n# caf\xe9\nlr = 1e-3\n".encode("latin-1"))),
    Case("trainerd-config-unknown-section", "trainerd", T("--config", R("section.toml"), "--cache-dir", REAL_CACHE, "--new", "x"),
         "optimizer", setup=_write("section.toml", "[optimizer]\nname = \"adamw\"\n")),
    Case("trainerd-config-wrong-type", "trainerd", T("--config", R("type.toml"), "--cache-dir", REAL_CACHE, "--new", "x"),
         "train.micro_batch_size", setup=_write("type.toml", "[train]\nmicro_batch_size = \"eight\"\n")),
    Case("trainerd-config-section-not-a-table", "trainerd", T("--config", R("flat.toml"), "--cache-dir", REAL_CACHE, "--new", "x"),
         "model must be a table", setup=_write("flat.toml", "model = \"124m\"\n")),
    Case("trainerd-lr-nan", "trainerd", T("--cache-dir", REAL_CACHE, "--new", "x", "--lr", "nan"), "train.lr must be a finite number"),
    Case("trainerd-beta1-one", "trainerd", T("--cache-dir", REAL_CACHE, "--new", "x", "--set", "train.beta1=1"),
         "train.beta1 must be in [0, 1)"),
    Case("trainerd-weight-decay-negative", "trainerd", T("--cache-dir", REAL_CACHE, "--new", "x", "--set", "train.weight_decay=-0.1"),
         "train.weight_decay must be 0 or more"),
    Case("trainerd-threads-negative", "trainerd", T("--cache-dir", REAL_CACHE, "--new", "x", "--threads", "-1"),
         "train.threads must be 0 or more"),
    Case("trainerd-log-with-unknown", "trainerd", T("--cache-dir", REAL_CACHE, "--new", "x", "--log-with", "tensorbored"),
         "unknown tracker 'tensorbored'"),
    *([] if MISSING_TRACKER is None else [
        Case("trainerd-log-with-not-installed", "trainerd",
             T("--cache-dir", REAL_CACHE, "--new", "x", "--log-with", MISSING_TRACKER),
             f"tracker '{MISSING_TRACKER}' is not installed")]),
    *([] if _cuda() else [  # where CUDA is present fp16 is allowed
        Case("trainerd-fp16-on-the-cpu", "trainerd", T("--cache-dir", REAL_CACHE, "--new", "x", "--mixed-precision", "fp16"),
             "fp16 needs CUDA")]),
    *([] if _cuda() else [  # where CUDA is present these kernels may be there
        Case("trainerd-flex-attention-on-the-cpu", "trainerd", T("--cache-dir", REAL_CACHE, "--new", "x", "--attention", "flex"),
             "model.attention = flex needs CUDA"),
        Case("trainerd-flash-attention-on-the-cpu", "trainerd", T("--cache-dir", REAL_CACHE, "--new", "x", "--attention", "flash"),
             "model.attention = flash needs flash_attn installed and CUDA"),
        Case("trainerd-liger-loss-on-the-cpu", "trainerd", T("--cache-dir", REAL_CACHE, "--new", "x", "--loss", "liger"),
             "train.loss = liger needs liger-kernel"),
        Case("trainerd-liger-kernels-on-the-cpu", "trainerd", T("--cache-dir", REAL_CACHE, "--new", "x", "--liger-kernels"),
             "model.liger_kernels needs liger-kernel")]),
    Case("trainerd-attention-contradicts-flash-switch", "trainerd",
         T("--cache-dir", REAL_CACHE, "--new", "x", "--attention", "sdpa", "--flash-attention"),
         "model.flash_attention = true contradicts model.attention = sdpa"),
    Case("trainerd-loss-unknown", "trainerd", T("--cache-dir", REAL_CACHE, "--new", "x", "--loss", "fused"),
         "Invalid value for '--loss'", kind="usage"),
    Case("trainerd-no-wait-folder-without-manifest", "trainerd", T("--cache-dir", R("not_a_run_dir"), "--new", "x", "--no-wait"),
         "has no manifest.json"),
    Case("trainerd-resume-without-checkpoints", "trainerd",
         lambda w: ["--run-dir", str(w.root / "runs_empty"), "--endpoint", w.endpoint, "--resume", "latest"], "no checkpoint in"),
    Case("trainerd-resume-unknown-name", "trainerd", T("--cache-dir", REAL_CACHE, "--resume", "nosuchrun"), "no checkpoint or run named"),
    Case("trainerd-resume-corrupt-config", "trainerd", T("--resume", "broken-step00000002"), "config.json",
         setup=_corrupt_ckpt_config),
    Case("trainerd-new-and-resume", "trainerd", T("--cache-dir", REAL_CACHE, "--new", "x", "--resume", "latest"), "not both"),
    Case("trainerd-run-name-is-a-path", "trainerd", T("--cache-dir", REAL_CACHE, "--new", "../escape"), "run name"),
    Case("trainerd-val-cache-is-the-training-cache", "trainerd",
         T("--cache-dir", REAL_CACHE, "--new", "x", "--eval-every", "5", "--val-cache", REAL_CACHE),
         "is the training cache itself"),
    Case("trainerd-val-cache-missing-no-wait", "trainerd",
         T("--cache-dir", REAL_CACHE, "--new", "x", "--eval-every", "5", "--val-cache", R("no-such-val"), "--no-wait"),
         "validation cache"),
    Case("trainerd-val-cache-other-seq-len", "trainerd",
         T("--cache-dir", REAL_CACHE, "--new", "x", "--eval-every", "5", "--val-cache", R("val32")),
         "has seq_len 32", setup=_other_cache("val32", "--tokenizer", TOK, "--seq-len", "32")),
    Case("trainerd-val-cache-other-tokenizer", "trainerd",
         T("--cache-dir", REAL_CACHE, "--new", "x", "--eval-every", "5", "--val-cache", R("valbpe")),
         "another tokenizer", setup=_other_cache("valbpe", "--tokenizer", "builtin:bpe", "--seq-len", "64")),
    Case("trainerd-new-on-a-run-with-checkpoints", "trainerd", T("--cache-dir", REAL_CACHE, "--new", "good"), "already has checkpoints"),
    # several caches: weights, their count, caches that cannot be mixed
    *[Case(f"trainerd-mix-{name}", "trainerd", TM("--cache-dir", REAL_CACHE, "--cache-dir", R("val32"), "--new", "x", *args),
           expect) for name, args, expect in [
        ("weight-negative", ("--weights", "0.5,-1"), "data.weights must be 0 or more"),
        ("weight-not-a-number", ("--weights", "0.5,half"), "data.weights must be a finite number"),
        ("weights-all-zero", ("--weights", "0,0"), "data.weights are all zero"),
        ("weights-count", ("--weights", "1"), "data.weights: 1 given for 2 cache(s)"),
        ("endpoints-count", ("--endpoint", "tcp://127.0.0.1:1"), "data.endpoint: 1 given for 2 cache(s)"),
        ("same-cache-twice", ("--cache-dir", REAL_CACHE), "names a cache twice")]],
    Case("trainerd-mix-other-seq-len", "trainerd", TM("--cache-dir", REAL_CACHE, "--cache-dir", R("val32"), "--new", "x"),
         "val32 has seq_len 32", setup=_other_cache("val32", "--tokenizer", TOK, "--seq-len", "32")),
    Case("trainerd-mix-other-tokenizer", "trainerd", TM("--cache-dir", REAL_CACHE, "--cache-dir", R("valbpe"), "--new", "x"),
         "valbpe was packed with another tokenizer",
         setup=_other_cache("valbpe", "--tokenizer", "builtin:bpe", "--seq-len", "64")),
    # ckpt: run folders, names, options
    Case("ckpt-list-missing-run-dir", "ckpt", C("list", "--run-dir", R("missing")), "does not exist"),
    Case("ckpt-list-not-a-run-dir", "ckpt", C("list", "--run-dir", R("not_a_run_dir")), "is not a run folder"),
    Case("ckpt-list-run-is-a-path", "ckpt", C("list", "--run-dir", RUNS, "--run", "../good"), "is not a run name"),
    Case("ckpt-show-empty-name", "ckpt", C("show", "--run-dir", RUNS, ""), "is not a checkpoint name"),
    Case("ckpt-delete-one-unknown-of-two", "ckpt", lambda w: ["delete", "--run-dir", str(w.runs), w.ckpt, "good-step00000999", "--yes"],
         "no checkpoint named 'good-step00000999'"),
    Case("ckpt-prune-keep-negative", "ckpt", C("prune", "--run-dir", RUNS, "--keep", "-2", "--yes"), "--keep must be at least 1"),
    Case("ckpt-prune-without-keep", "ckpt", C("prune", "--run-dir", RUNS, "--yes"), "Missing option '--keep'", kind="usage"),
    Case("ckpt-plot-not-an-image", "ckpt", C("plot", "--run-dir", RUNS, "good", "--out", R("loss.txt")), "give --out a .png"),
    Case("ckpt-plot-unknown-run", "ckpt", C("plot", "--run-dir", RUNS, "nosuchrun", "--out", R("loss.png")), "no training logs"),
    Case("ckpt-export-into-nonempty-folder", "ckpt", lambda w: ["export", "--run-dir", str(w.runs), w.ckpt, str(w.root / "not_a_run_dir")],
         "exists and is not empty"),
    Case("ckpt-plot-out-not-writable", "ckpt", C("plot", "--run-dir", RUNS, "good", "--out", "/proc/loss.png"),
         "cannot write /proc/loss.png"),
    Case("ckpt-run-dir-from-env-missing", "ckpt", C("list"), "does not exist", env={"TRAINERD_RUN_DIR": "/nonexistent/runs"}),
]


def _command(name: str):
    if name == "packerd":
        from packerd.cli import main
    elif name == "trainerd":
        from trainerd.__main__ import main
    else:
        from trainerd.admin import cli as main
    return main


@pytest.fixture
def in_root(ws, monkeypatch):
    """Commands run inside the workspace, so a default relative path (runs/) would show up in the snapshot."""
    monkeypatch.chdir(ws.root)
    yield ws
    try:  # trainerd.train.run sets up accelerate's process state in this process; leave none behind
        from accelerate.state import AcceleratorState, PartialState
        AcceleratorState._reset_state(True)
        PartialState._reset_state()
    except Exception:  # noqa: BLE001 - accelerate internals differ between versions; nothing to reset then
        pass


def check_error(output: str, exit_code: int, kind: str) -> str:
    """The single Error line of a command's output (and the checks that make it one)."""
    assert "Traceback" not in output, output
    lines = [l for l in output.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("Error")]
    assert len(errors) == 1, f"expected one Error line:\n{output}"
    assert lines[-1] == errors[0], f"the Error line is not the last line:\n{output}"
    if kind == "usage":
        assert exit_code == 2 and lines[0].startswith("Usage:"), output
    else:
        assert exit_code == 1, (exit_code, output)
    return errors[0]


def written(before: dict, after: dict) -> tuple[list, list, list]:
    """(added, removed, changed) paths. Re-taking an existing lock file (flock, then its pid written into it)
    is how a command claims a folder, not data: an existing `.lock` whose size or time changed is not counted."""
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after)
                     if before[k] != after[k] and before[k][0] != 4 and not k.endswith(".lock"))  # 4: a folder
    return added, removed, changed


def run_case(w: WS, case: Case, folder_tag: str = ""):
    w.case = case.id + folder_tag
    if case.setup:
        case.setup(w)
    before = snapshot(w.root)
    result = CliRunner().invoke(_command(case.cli), [str(a) for a in case.args(w)], env=case.env or None,
                                catch_exceptions=True)
    return result, before, snapshot(w.root)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(in_root, case):
    w = in_root
    ok = False
    try:
        result, before, after = run_case(w, case)
        assert result.exception is None or isinstance(result.exception, SystemExit), \
            f"{case.id}: {result.exception!r}\n{result.output}"
        line = check_error(result.output, result.exit_code, case.kind)
        assert case.expect in line, f"{case.id}: {case.expect!r} not in {line!r}"
        added, removed, changed = written(before, after)
        assert not (added or removed or changed), f"{case.id} wrote: added {added}, removed {removed}, changed {changed}"
        ok = True
    finally:
        record(kind="bad_input", id=case.id, command=case.cli, handled=ok, defect=None if ok else "not handled")


@pytest.mark.parametrize("case_id", ["packerd-source-txt-not-utf8", "packerd-tokenizer-empty-folder",
                                     "packerd-no-source-offline"])
def test_packerd_bad_source_or_tokenizer_creates_no_cache_folder(in_root, case_id):
    """A first run with a bad source or tokenizer leaves no cache folder, not even DIR/.lock."""
    case = next(c for c in CASES if c.id == case_id)
    result, before, after = run_case(in_root, case, "-bug")
    assert result.exit_code == 1
    added, _, _ = written(before, after)
    assert added == [], f"{case.id} created {added}"


@pytest.mark.parametrize("bad", ["tokenizer", "source"])
def test_force_rebuild_with_a_bad_input_keeps_the_cache(in_root, bad):
    """--force-rebuild with a typo in --tokenizer or --source fails before it deletes anything."""
    w = in_root
    cache = w.root / f"rebuild-{bad}"
    shutil.copytree(w.cache, cache)
    before = snapshot(cache)
    args = ["run", "--cache-dir", str(cache), "--endpoint", w.endpoint, "--workers", "1", "--force-rebuild", "--yes"]
    args += ["--tokenizer", str(w.root / "no-such-tokenizer")] if bad == "tokenizer" else \
            ["--source", str(w.root / "no-such-source.jsonl")]
    result = CliRunner().invoke(_command("packerd"), args)
    check_error(result.output, result.exit_code, "error")
    added, removed, changed = written(before, snapshot(cache))
    kept = not removed and not changed
    record(kind="bad_input", id=f"packerd-force-rebuild-bad-{bad}", command="packerd", handled=kept,
           defect=None if kept else f"deletes the existing cache ({len(removed)} files)")
    assert kept, f"a failed --force-rebuild removed {removed} and changed {changed}"


def test_at_least_25_bad_inputs_over_three_commands():
    by = {}
    for c in CASES:
        by[c.cli] = by.get(c.cli, 0) + 1
    assert len(CASES) >= 25 and set(by) == {"packerd", "trainerd", "ckpt"} and min(by.values()) >= 5, by
