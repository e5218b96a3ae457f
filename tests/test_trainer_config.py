"""The trainer's typed config: TOML sections, command-line precedence, errors that name the field."""
from __future__ import annotations

import subprocess
import sys

import pytest

from shared.config import ConfigError
from trainerd.config import Config, help_text, load_config

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def write(tmp_path, text: str):
    p = tmp_path / "run.toml"
    p.write_text(text)
    return p


def test_defaults_file_and_flags_in_that_order(tmp_path):
    cfg = load_config(None, {})
    assert cfg.model.preset == "tiny" and cfg.schedule.kind == "wsd" and cfg.schedule.warmup_fraction == 0.025
    p = write(tmp_path, '[model]\npreset = "124m"\n[train]\nlr = 1e-3\nmicro_batch_size = 4\n[schedule]\nkind = "cosine"\n')
    cfg = load_config(p, {"train.lr": 2e-3})
    assert (cfg.model.preset, cfg.train.lr, cfg.train.micro_batch_size, cfg.schedule.kind) == ("124m", 2e-3, 4, "cosine")
    # a saved config (resume) is the lowest layer above the defaults
    base = load_config(None, {"train.seed": 7, "train.lr": 5e-4}).to_dict()
    cfg = load_config(p, {}, base=base)
    assert cfg.train.seed == 7 and cfg.train.lr == 1e-3


@pytest.mark.parametrize("toml, field", [
    ("[train]\nlr = \"fast\"\n", "train.lr"),
    ("[train]\nmicro_batch_size = 0\n", "train.micro_batch_size"),
    ("[train]\nbatchsize = 4\n", "train.batchsize"),
    ("[model]\npreset = \"7b\"\n", "model.preset"),
    ("[schedule]\nwarmup_fraction = 1.5\n", "schedule.warmup_fraction"),
    ("[schedule]\nkind = \"linear\"\n", "schedule.kind"),
    ("[data]\nepoch_fraction = 0\n", "data.epoch_fraction"),
    ("[data]\nendpoint = \"udp://x\"\n", "data.endpoint"),
    ("[checkpoint]\nevery = -1\n", "checkpoint.every"),
    ("[model]\nnum_heads = 4\nnum_kv_heads = 3\n", "model.num_kv_heads"),
    ("[nonsense]\nx = 1\n", "nonsense"),
])
def test_errors_name_the_field(tmp_path, toml, field):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, toml), {})
    assert field in str(e.value)


def test_bad_toml_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[train\n"), {})


def test_every_field_is_documented():
    text = help_text()
    for line in text.splitlines():
        name, rest = line.split(None, 1)
        assert len(rest.split(None, 1)) == 2, f"{name} has no help"
    assert "schedule.decay_fraction" in text and "checkpoint.keep" in text
    assert set(Config().to_dict()) == {"model", "data", "train", "schedule", "checkpoint", "log"}


def test_cli_error_is_one_line_and_writes_nothing(tmp_path):
    """The real command: a bad flag value names the field, exits 1, and creates no run folder."""
    run_dir = tmp_path / "runs"
    p = subprocess.run([sys.executable, "-m", "trainerd", "--cache-dir", str(tmp_path / "none"), "--run-dir", str(run_dir),
                        "--new", "x", "--set", "train.grad_accum=zero"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 1
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "train.grad_accum" in err[0], p.stderr
    assert not run_dir.exists()


def test_mixed_precision_auto_follows_accelerate_launch(monkeypatch):
    import click

    from trainerd.train import resolve_mixed_precision
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert resolve_mixed_precision("auto", cuda=False) == "no"
    assert resolve_mixed_precision("bf16", cuda=False) == "bf16"          # bf16 autocast works on the CPU
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")            # accelerate launch --mixed_precision bf16
    assert resolve_mixed_precision("auto", cuda=False) == "bf16"
    assert resolve_mixed_precision("no", cuda=False) == "no"             # trainerd's own setting wins
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(click.ClickException, match="'fp8' is not supported"):
        resolve_mixed_precision("auto", cuda=False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(click.ClickException, match="fp16 needs CUDA"):
        resolve_mixed_precision("auto", cuda=False)
