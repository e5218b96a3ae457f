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
    assert set(Config().to_dict()) == {"model", "data", "train", "schedule", "checkpoint", "log", "eval"}
    assert "eval.every" in text and "--val-cache" in text


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

    from trainerd.start import resolve_mixed_precision
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


# ---- the command line: generated from the config fields -------------------------------------------------------
USER_FLAGS = ["--cache-dir", "--run-dir", "--model", "--hidden-size", "--layers", "--heads", "--kv-heads",
              "--micro-batch-size", "--batch-size", "--grad-accum", "--lr", "--schedule", "--warmup-fraction",
              "--decay-fraction", "--decay-tokens", "--target-epochs", "--epoch-fraction", "--max-steps",
              "--checkpoint-every", "--keep", "--endpoint", "--curve-dir", "--mixed-precision", "--compile",
              "--no-compile", "--flash-attention", "--no-flash-attention", "--seed", "--deterministic",
              "--no-deterministic", "--threads", "--wait", "--no-wait", "--log-every", "--log-with",
              "--config", "--new", "--resume", "--set", "--help-config", "-h", "--help"]


def cli(*args: str) -> dict:
    """The dotted overrides trainerd's command makes of `args` (parsed only: nothing runs)."""
    from shared.config import flags
    from trainerd.__main__ import main
    from trainerd.config import cli_overrides
    params = main.make_context("trainerd", list(args)).params
    names = {f.param for f in flags(Config)}
    return cli_overrides({k: v for k, v in params.items() if k in names})


def test_every_flag_users_type_exists():
    from trainerd.__main__ import main
    declared = {o for p in main.get_params(main.make_context("trainerd", [])) for o in (*p.opts, *p.secondary_opts)}
    assert set(USER_FLAGS) <= declared, sorted(set(USER_FLAGS) - declared)


def test_a_generated_flag_sets_its_field():
    assert cli() == {}                                   # a flag not given overrides nothing (the file's value stays)
    overrides = cli("--layers", "3", "--model", "124m", "--schedule", "cosine", "--lr", "1e-3", "--keep", "0")
    assert overrides == {"model.num_layers": 3, "model.preset": "124m", "schedule.kind": "cosine", "train.lr": 1e-3,
                         "checkpoint.keep": 0}
    cfg = load_config(None, overrides)
    assert (cfg.model.num_layers, cfg.model.preset, cfg.schedule.kind, cfg.checkpoint.keep) == (3, "124m", "cosine", 0)


def test_batch_size_is_an_alias_and_bool_flags_are_pairs():
    assert cli("--batch-size", "4") == cli("--micro-batch-size", "4") == {"train.micro_batch_size": 4}
    assert cli("--no-compile") == {"train.compile": False}
    assert cli("--compile", "--no-wait", "--no-flash-attention") == {
        "train.compile": True, "data.wait": False, "model.flash_attention": False}


def test_a_bad_choice_is_a_usage_error():
    from click.testing import CliRunner

    from trainerd.__main__ import main
    result = CliRunner().invoke(main, ["--model", "huge"])
    assert result.exit_code == 2 and "Invalid value for '--model'" in result.output, result.output
    with pytest.raises(ConfigError, match=r"model.preset must be one of tiny, 124m, 415m, 680m, 1b \(got '7b'\)"):
        load_config(None, {"model.preset": "7b"})


def test_presets_and_schedule_kinds_come_from_one_table():
    import dataclasses

    from launch.__main__ import main as packtrain
    from trainerd.__main__ import main
    from trainerd.config import PRESETS, ModelConfig, ScheduleConfig
    from trainerd.schedule import KINDS

    def choices(command, flag):
        return tuple(next(p for p in command.params if flag in p.opts).type.choices)

    field = {f.name: f for f in dataclasses.fields(ModelConfig)}["preset"]
    assert field.metadata["choices"] == choices(main, "--model") == choices(packtrain, "--model") == tuple(PRESETS)
    kind = {f.name: f for f in dataclasses.fields(ScheduleConfig)}["kind"]
    assert kind.metadata["choices"] == choices(main, "--schedule") == tuple(KINDS)
    for name in (*PRESETS, *KINDS):
        assert name in help_text()


def test_a_preset_and_a_schedule_kind_are_each_one_entry_in_one_file(tmp_path):
    """Add one line to trainerd/config.py's PRESETS and one to trainerd/schedule.py's KINDS, in a copy of the
    code: the trainer's flags, --help-config, packtrain's --model, the model and the schedule all take them."""
    import shutil
    import subprocess
    import sys

    from conftest import ROOT
    for pkg in ("shared", "trainerd", "launch"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    config, schedule = tmp_path / "trainerd" / "config.py", tmp_path / "trainerd" / "schedule.py"
    anchor = '    "415m": Preset('
    assert config.read_text().count(anchor) == 1
    config.write_text(config.read_text().replace(anchor, '    "small": Preset(hidden_size=96, num_layers=3, num_heads=6, '
                                                         'num_kv_heads=2, intermediate_size=256),\n' + anchor))
    anchor = '    "cosine": Kind('
    assert schedule.read_text().count(anchor) == 1
    schedule.write_text(schedule.read_text().replace(anchor, '    "linear": Kind(lambda q: 1.0 - q, whole_run=True, '
                                                             'help="warmup, then a linear decay"),\n' + anchor))
    code = """
import click.testing
from trainerd.__main__ import main
from trainerd.config import load_config
from trainerd.model import build_model
from trainerd.schedule import LRSchedule
from launch.__main__ import main as packtrain
cfg = load_config(None, {"model.preset": "small", "schedule.kind": "linear", "schedule.warmup_steps": 0})
m = build_model(cfg.model, 512, 64, 0)
print("layers", m.config.num_hidden_layers, "width", m.config.hidden_size)
s = LRSchedule(cfg.schedule, 1.0)
s.update(0, 100, 100, True)
print("lr", round(s.lr(50), 6))
r = click.testing.CliRunner()
help = r.invoke(main, ["--help"]).output
print("trainerd", "124m|small|415m" in help, "wsd|linear|cosine" in help)
print("config", "linear: warmup, then a linear decay" in r.invoke(main, ["--help-config"]).output)
print("packtrain", "124m|small|415m" in r.invoke(packtrain, ["--help"]).output)
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("\n")[:5] == ["layers 3 width 96", "lr 0.55", "trainerd True True", "config True",
                                         "packtrain True"], p.stdout
