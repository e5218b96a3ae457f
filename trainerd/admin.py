"""`ckpt`: list, show, delete, prune, clean, verify, export and plot the checkpoints of a run folder.

    ckpt list --run-dir runs/                      # newest first, from each checkpoint's meta.json alone
    ckpt show tiny_pydoc_64-step00000200
    ckpt prune --keep 3 --yes                      # the newest 3 (last saved) of every run stay
    ckpt clean                                     # unfinished saves and orphaned logs, after a question
    ckpt verify tiny_pydoc_64-step00000200         # sizes, xxh64 and the weights against model_config.json
    ckpt export tiny_pydoc_64-step00000200 hf/tiny # a folder AutoModelForCausalLM.from_pretrained loads
    ckpt plot tiny_pydoc_64 --out loss.png         # loss, learning rate and tokens/s against step

The run folder comes from --run-dir or TRAINERD_RUN_DIR; trainerd/rundir.py owns its layout and listing,
trainerd/checkpoint.py what a checkpoint folder holds. Only `verify` and `export` open the weights, so `list` costs one small JSON read per
checkpoint however large the checkpoints are. torch and transformers are imported only by those two.
Checkpoint and run names are names, never paths. `menu(run_dir)` offers the same operations behind prompts
for the trainer's "X. Checkpoint Management" screen.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import click

from shared.fsutil import fsync_dir

from .rundir import META, TMP_PREFIX, Checkpoint, Leftover, RunDir, as_number, check_name

ENV_RUN_DIR = "TRAINERD_RUN_DIR"
DEFAULT_RUN_DIR = "runs"   # trainerd's train.run_dir default
WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"
TOKENIZER = "tokenizer.json"
CONFIG = "config.json"
HASH_BLOCK = 8 << 20


def human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # not reached


def human_time(t: float | None) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if isinstance(t, (int, float)) else "-"
    except (OverflowError, ValueError, OSError):  # a meta.json edited by hand: nan, 1e300
        return "-"


# ---- operations shared by the commands and the menu ----------------------------------------------
def delete_checkpoints(rd: RunDir, cks: list[Checkpoint], yes: bool, verb: str = "Delete") -> int:
    if not cks:
        return 0
    total = sum(c.size or 0 for c in cks)
    click.echo(f"{verb} {len(cks)} checkpoint{'s' if len(cks) != 1 else ''} ({human_bytes(total)}):")
    for c in cks:
        click.echo(f"  {c.name}  (run {c.run}, step {c.step}, {human_bytes(c.size)})")
    if not yes:
        click.confirm(f"{verb} {'them' if len(cks) != 1 else 'it'}?", abort=True)
    done, left = 0, []
    for c in cks:
        # a run whose trainer is alive saves, prunes and may resume from these: its checkpoints are its own
        with rd.hold_run((c.run,) if c.run else None) as free:
            if not free:
                click.echo(f"Skipping {c.name}: its run is training (its lock in {rd.locks_dir} is held)")
                left.append(c.name)
                continue
            try:
                rd.delete(c)
            except OSError as e:
                click.echo(f"Could not delete {c.name}: {e.strerror or e}")
                left.append(c.name)
                continue
        click.echo(f"Deleted {c.name}")
        done += 1
    if left:
        raise click.ClickException(f"{len(left)} of {len(cks)} checkpoint{'s' if len(cks) != 1 else ''} not "
                                   f"{verb.lower()}d: {', '.join(left)}")
    return done


def prune(rd: RunDir, keep: int, run: str | None, yes: bool) -> int:
    """Delete all but the newest KEEP checkpoints (most recently saved) of each run, after a question."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise click.ClickException(f"--keep must be at least 1 (got {keep}); `ckpt delete` removes single checkpoints")
    if run is not None:
        check_name(run, "run")
        if not rd.checkpoints(run):
            raise click.ClickException(f"run {run!r} has no checkpoints in {rd.checkpoints_dir}")
    doomed, unreadable = rd.prune_plan(keep, run)
    for c in unreadable:
        why = c.error or ("no run or step" if c.run is None or c.step is None else "not a complete checkpoint")
        click.echo(f"Skipping {c.name}: {why}")
    if not doomed:
        click.echo(f"Nothing to prune: no run has more than {keep} checkpoint{'s' if keep != 1 else ''}.")
        return 0
    return delete_checkpoints(rd, doomed, yes, verb="Prune")


def clean_plan(rd: RunDir) -> tuple[list[Leftover], list[str]]:
    """(unfinished saves and orphaned logs, runs skipped because a trainer holds their lock)."""
    kept, busy = [], set()
    training: dict[tuple[str, ...] | None, bool] = {}
    for item in rd.unfinished_saves() + rd.orphaned_logs():
        if item.runs not in training:
            training[item.runs] = rd.is_training(item.runs)
        if not training[item.runs]:
            kept.append(item)
        elif item.runs is None:
            busy.add(f"of {item.path.name} (no run name in it, and some run is training)")
        else:
            busy.update(item.runs)
    return kept, sorted(busy)


def clean(rd: RunDir, yes: bool) -> int:
    items, busy = clean_plan(rd)
    for line in rd.stranded_lines():
        click.echo(line[0].upper() + line[1:])
    for r in busy:
        click.echo(f"Skipping run {r}: it is training (its lock in {rd.locks_dir} is held)")
    if not items:
        click.echo("Nothing to clean.")
        return 0
    click.echo(f"Leftovers in {rd.path} ({human_bytes(sum(i.bytes for i in items))}):")
    for i in items:
        rel = i.path.relative_to(rd.path)
        click.echo(f"  {rel}{'/' if i.path.is_dir() else ''}  ({i.why}, {human_bytes(i.bytes)})")
    if not yes:
        click.confirm(f"Remove {len(items)}?", abort=True)
    removed = 0
    for i in items:
        with rd.hold_run(i.runs) as free:   # checked again, holding the lock: a trainer may have started since
            if not free:
                click.echo(f"Skipping {i.path.name}: its run started training meanwhile")
                continue
            try:
                if i.path.is_dir() and not i.path.is_symlink():
                    shutil.rmtree(i.path)
                else:
                    i.path.unlink()
            except FileNotFoundError:
                pass
            removed += 1
    click.echo(f"Removed {removed} item{'s' if removed != 1 else ''}.")
    return removed


def _xxh64_file(path: Path) -> str:
    import xxhash
    h = xxhash.xxh64()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def _read_json(ck: Checkpoint, fname: str) -> dict:
    try:
        d = json.loads((ck.path / fname).read_text())
    except FileNotFoundError:
        raise click.ClickException(f"{ck.name}: {fname} is missing") from None
    except (OSError, ValueError) as e:
        raise click.ClickException(f"{ck.name}: {fname} is unreadable ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise click.ClickException(f"{ck.name}: {fname} is not a JSON object")
    return d


def _llama_config(ck: Checkpoint):
    from transformers import LlamaConfig
    d = _read_json(ck, MODEL_CONFIG)
    try:
        return LlamaConfig.from_dict(d)
    except Exception as e:  # noqa: BLE001 - any bad field becomes one line
        raise click.ClickException(f"{ck.name}: {MODEL_CONFIG} is not a LlamaConfig ({str(e).splitlines()[0]})") from None


def _llama_model(ck: Checkpoint, config):
    """The model of `config`; a config that builds none (an unknown activation, a zero size) is one line."""
    from transformers import LlamaForCausalLM
    try:
        return LlamaForCausalLM(config)
    except Exception as e:  # noqa: BLE001 - any bad field becomes one line
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise click.ClickException(f"{ck.name}: {MODEL_CONFIG} builds no model ({type(e).__name__}: {msg})") from None


def check_weights(ck: Checkpoint) -> list[str]:
    """Problems found opening model.safetensors: unreadable tensors, non-finite values, keys or shapes that
    do not match model_config.json. Tensors are read one at a time (memory: the largest tensor)."""
    import torch
    from safetensors import safe_open
    problems = []
    try:
        with safe_open(str(ck.path / WEIGHTS), framework="pt") as f:
            aliases = f.metadata() or {}   # save_model records tied names it dropped: {dropped: kept}
            shapes = {}
            for k in f.keys():
                t = f.get_tensor(k)
                shapes[k] = tuple(t.shape)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    problems.append(f"tensor {k} holds NaN or infinite values")
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged file
        return [f"does not load ({str(e).splitlines()[0] if str(e) else type(e).__name__})"]
    if any(k.startswith("_orig_mod.") for k in shapes):
        return problems + ["keys carry torch.compile's _orig_mod. prefix; they load only into a compiled model"]
    if not (ck.path / MODEL_CONFIG).exists():
        return problems + [f"cannot be matched to a model: {MODEL_CONFIG} is missing"]
    try:
        config = _llama_config(ck)
    except click.ClickException as e:
        return problems + [e.format_message()]
    try:
        with torch.device("meta"):   # shapes only: no memory, no initialisation
            expected = {k: tuple(v.shape) for k, v in _llama_model(ck, config).state_dict().items()}
    except click.ClickException as e:
        return problems + [e.format_message()]
    present = set(shapes) | {a for a, kept in aliases.items() if kept in shapes and a in expected}
    missing = sorted(set(expected) - present)
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in shapes if k in expected and shapes[k] != expected[k])
    if missing:
        problems.append(f"lacks {len(missing)} tensors of {MODEL_CONFIG}'s model (first: {missing[0]})")
    if unexpected:
        problems.append(f"has {len(unexpected)} tensors {MODEL_CONFIG}'s model does not (first: {unexpected[0]})")
    for k in wrong:
        problems.append(f"{k} has shape {list(shapes[k])}, {MODEL_CONFIG}'s model expects {list(expected[k])}")
    return problems


def verify_checkpoint(ck: Checkpoint) -> tuple[list[tuple[str, str]], list[str]]:
    """([(bad file, what is wrong)], one-line notes on what was checked and found right)."""
    if ck.error:
        return [(META, ck.error)], []
    problems, notes = [], []
    if not ck.files:
        problems.append((META, "records no files"))
    for fname, rec in sorted(ck.files.items()):
        try:
            check_name(fname, "file")
        except click.ClickException:
            problems.append((META, f"names {fname!r}, which is not a file of this checkpoint"))
            continue
        rec = rec if isinstance(rec, dict) else {}
        path = ck.path / fname
        if not path.is_file():
            problems.append((fname, "missing"))
            continue
        size = path.stat().st_size
        if size != rec.get("bytes"):
            problems.append((fname, f"{size} bytes, {META} records {rec.get('bytes')}"))
            continue
        digest = _xxh64_file(path)
        if str(rec.get("xxh64", "")).lower() != digest:
            problems.append((fname, f"xxh64 {digest} differs from the recorded {rec.get('xxh64')}"))
            continue
        notes.append(f"{fname}: {human_bytes(size)}, xxh64 {digest} ok")
    if WEIGHTS not in ck.files:
        problems.append((WEIGHTS, f"not recorded in {META}"))
    if (ck.path / WEIGHTS).is_file():
        weight_problems = check_weights(ck)
        problems += [(WEIGHTS, p) for p in weight_problems]
        if not weight_problems:
            notes.append(f"{WEIGHTS}: loads and matches {MODEL_CONFIG}")
    return problems, notes


def tokenizer_source(name: str) -> str:
    """What AutoTokenizer.from_pretrained takes for the name in a checkpoint's tokenizer.json."""
    from shared.builtin import BUILTIN_TOKENIZER, builtin_tokenizer_dir
    return str(builtin_tokenizer_dir()) if name == BUILTIN_TOKENIZER else name


def load_checkpoint_tokenizer(ck: Checkpoint):
    """The tokenizer the checkpoint was trained with, checked against its recorded vocabulary hash."""
    import transformers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from shared.tokenizer import TokenizerError, load_tokenizer

    ident = _read_json(ck, TOKENIZER)
    name = ident.get("name")
    if not isinstance(name, str) or not name:
        raise click.ClickException(f"{ck.name}: {TOKENIZER} names no tokenizer")
    transformers.logging.set_verbosity_error()
    src = tokenizer_source(name)
    try:
        if src.endswith(".json") and Path(src).is_file():
            tok = PreTrainedTokenizerFast(tokenizer_file=src)
        else:
            tok = AutoTokenizer.from_pretrained(src)
    except Exception as e:  # noqa: BLE001 - hub and file errors all become one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise click.ClickException(f"cannot load tokenizer {name!r}: {msg}") from None
    eos_id, pad_id = ident.get("eos_id"), ident.get("pad_id")
    if not isinstance(eos_id, int) or not 0 <= eos_id < len(tok):
        raise click.ClickException(f"{ck.name}: {TOKENIZER} has no usable eos_id ({eos_id!r})")
    if ident.get("vocab_hash"):
        try:
            info = load_tokenizer(name, eos=tok.convert_ids_to_tokens(eos_id))
        except TokenizerError as e:
            raise click.ClickException(str(e)) from None
        if info.vocab_hash != ident["vocab_hash"]:
            raise click.ClickException(f"tokenizer {name!r} changed since training (vocabulary hash {info.vocab_hash}, "
                                       f"the checkpoint records {ident['vocab_hash']})")
    if tok.eos_token_id != eos_id:
        tok.eos_token = tok.convert_ids_to_tokens(eos_id)
    if tok.pad_token_id is None:
        tok.pad_token = tok.convert_ids_to_tokens(pad_id if isinstance(pad_id, int) else eos_id)
    return tok, ident


def export_checkpoint(ck: Checkpoint, out: str | os.PathLike) -> Path:
    """Write a Hugging Face folder: config, safetensors weights, tokenizer, generation config.

    Built in a temporary folder beside OUT and renamed into place: OUT is whole or absent.
    """
    out = Path(out)
    if out.is_symlink():
        raise click.ClickException(f"{out} is a symbolic link; export into a new or empty folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise click.ClickException(f"{out} exists and is not empty; export into a new or empty folder")
    if ck.error:
        raise click.ClickException(f"{ck.name}: {ck.error}")
    if not (ck.path / WEIGHTS).is_file():
        raise click.ClickException(f"{ck.name}: {WEIGHTS} is missing")
    from safetensors.torch import load_model
    from transformers import GenerationConfig

    config = _llama_config(ck)
    tok, ident = load_checkpoint_tokenizer(ck)
    eos_id = ident["eos_id"]
    pad_id = ident["pad_id"] if isinstance(ident.get("pad_id"), int) else eos_id
    bos_id = tok.bos_token_id
    config.eos_token_id, config.pad_token_id, config.bos_token_id = eos_id, pad_id, bos_id
    model = _llama_model(ck, config)
    try:
        load_model(model, str(ck.path / WEIGHTS), strict=True)
    except Exception as e:  # noqa: BLE001 - key/shape mismatch or a damaged file
        msg = " ".join(str(e).split())[:300]
        raise click.ClickException(f"{ck.name}: {WEIGHTS} does not load into {MODEL_CONFIG}'s model ({msg})") from None
    # the rows the vocabulary was padded with were never trained: never generate them
    vocab = ident.get("vocab_size") if isinstance(ident.get("vocab_size"), int) else len(tok)
    suppress = list(range(vocab, config.vocab_size))
    gen = dict(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    if suppress:
        gen["suppress_tokens"] = suppress
    model.generation_config = GenerationConfig(**gen)

    tmp = out.parent / f"{TMP_PREFIX}{out.name}-{os.getpid()}"
    from transformers.utils import logging as hf_logging
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()   # no "Writing model shards" bar: plain one-line output
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "training_meta.json").write_text(json.dumps(ck.meta, indent=2) + "\n")
        for f in (f for f in tmp.iterdir() if f.is_file()):  # durable before the rename shows the folder
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        if out.is_dir():
            out.rmdir()   # empty, checked above
        os.rename(tmp, out)
        fsync_dir(out.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise click.ClickException(f"cannot export into {out}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return out


def read_log(rd: RunDir, run: str, event: str | None = None) -> list[dict]:
    """Step records of every log of RUN (or its records of `event`, e.g. "eval"), in step order; a step
    logged again after a resume wins."""
    by_step: dict[int, dict] = {}
    for p in rd.log_files(run):
        with open(p, encoding="utf-8", errors="replace") as f:  # a damaged line is skipped below, not fatal
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue   # a line cut short by a crash
                if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec.get("event") == event:
                    by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


# the panels of `ckpt plot`: (label, [(key in the step records or the eval records, line label suffix)])
PANELS = [("loss", [("loss", ""), ("val_loss", " held-out")]), ("learning rate", [("lr", "")]),
          ("tokens/s", [("tokens_per_s", "")]), ("steps in the plan", [("plan_steps", "")])]


def _plot_panel(ax, label: str, lines: list, logs: dict) -> None:
    for run, recs in logs.items():
        for key, suffix in lines:
            pts = [(r["step"], r[key]) for r in recs if as_number(r.get(key)) is not None and math.isfinite(r[key])]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=run + suffix, linewidth=1.2,
                        marker="o" if suffix else None, markersize=3)
    ax.set_ylabel(label)
    ax.grid(True, alpha=0.3)


def plot_runs(rd: RunDir, runs: list[str], out: str | os.PathLike) -> Path:
    """Loss (train and held-out), learning rate, tokens/s and the planned steps (the plan growing) against
    step, one line per run, as one image (Agg, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out)
    logs = {}
    for run in dict.fromkeys(runs):
        check_name(run, "run")
        if not rd.log_files(run):
            raise click.ClickException(f"no training logs for run {run!r} in {rd.logs_dir}")
        logs[run] = read_log(rd, run)
        if not logs[run]:
            raise click.ClickException(f"the logs of run {run!r} hold no step records yet")
        logs[run] += read_log(rd, run, event="eval")
    fig = Figure(figsize=(9, 12), layout="constrained")
    canvas = FigureCanvasAgg(fig)
    fmt = out.suffix.lstrip(".").lower()
    if fmt not in canvas.get_supported_filetypes():
        raise click.ClickException(f"cannot write {out.name!r}: give --out a .png (or .svg, .pdf) file name")
    if not out.parent.is_dir():
        raise click.ClickException(f"folder {out.parent} does not exist")
    axes = fig.subplots(len(PANELS), 1, sharex=True)
    for (label, lines), ax in zip(PANELS, axes):
        _plot_panel(ax, label, lines, logs)
    axes[0].legend(loc="upper right")
    axes[0].set_title(f"{rd.path.name}: {', '.join(logs)}")
    axes[-1].set_xlabel("step")
    tmp = out.with_name(f"{TMP_PREFIX}{out.name}-{os.getpid()}")
    try:
        fig.savefig(tmp, format=fmt, dpi=110)
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise click.ClickException(f"cannot write {out}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


# ---- output --------------------------------------------------------------------------------------
def format_table(cks: list[Checkpoint]) -> str:
    head = ("NAME", "RUN", "STEP", "LOSS", "VAL LOSS", "TOKENS", "TIME", "SIZE")
    rows = []
    for c in cks:
        loss, val = as_number(c.meta.get("loss")), as_number(c.meta.get("val_loss"))
        tokens = c.meta.get("tokens")
        rows.append((c.name, c.run or "?", "?" if c.step is None else str(c.step),
                     "-" if loss is None else f"{loss:.4f}", "-" if val is None else f"{val:.4f}",
                     f"{tokens:,}" if isinstance(tokens, int) else "-", human_time(c.time),
                     human_bytes(c.size) + (f"  ({c.error})" if c.error else "")))
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
    right = {2, 3, 4, 5}
    lines = []
    for r in [head, *rows]:
        cells = [r[i].rjust(widths[i]) if i in right else r[i].ljust(widths[i]) for i in range(len(widths))]
        lines.append("  ".join(cells + [r[-1]]).rstrip())
    return "\n".join(lines)


def print_list(rd: RunDir, run: str | None = None, numbered: bool = False) -> list[Checkpoint]:
    cks = rd.checkpoints(run)
    if not cks:
        click.echo(f"No checkpoints{f' of run {run}' if run else ''} in {rd.checkpoints_dir}")
        return cks
    table = format_table(cks).splitlines()
    if numbered:
        table = ["    " + table[0]] + [f"{i:>2}. {line}" for i, line in enumerate(table[1:], 1)]
    click.echo("\n".join(table))
    return cks


def show_data(ck: Checkpoint) -> dict:
    on_disk = {p.name: p.stat().st_size for p in sorted(ck.path.iterdir()) if p.is_file()}
    files = []
    for fname in sorted(set(on_disk) | set(ck.files)):
        rec = ck.files.get(fname) if isinstance(ck.files.get(fname), dict) else {}
        files.append({"name": fname, "bytes": on_disk.get(fname), "recorded_bytes": rec.get("bytes"),
                      "xxh64": rec.get("xxh64")})

    def optional(fname):
        try:
            return _read_json(ck, fname)
        except click.ClickException:
            return None
    return {"name": ck.name, "path": str(ck.path), "error": ck.error, "meta": ck.meta, "size": ck.size,
            "files": files, "tokenizer": optional(TOKENIZER), "config": optional(CONFIG),
            "model_config": optional(MODEL_CONFIG)}


def print_show(d: dict) -> None:
    click.echo(f"name: {d['name']}")
    click.echo(f"path: {d['path']}")
    if d["error"]:
        click.echo(f"error: {d['error']}")
    for k, v in d["meta"].items():
        if k == "files" or k == "name":
            continue
        if k == "time" and as_number(v) is not None:
            v = f"{human_time(v)} (unix {v})"
        elif k == "elapsed_s" and as_number(v) is not None:
            v = f"{v:.0f} s ({v / 3600:.2f} h)"
        elif isinstance(v, int) and not isinstance(v, bool) and k in ("tokens", "params"):
            v = f"{v:,}"
        elif isinstance(v, (dict, list)):
            v = json.dumps(v)
        click.echo(f"{k}: {v}")
    if d["tokenizer"] is not None:
        t = d["tokenizer"]
        click.echo(f"tokenizer: {t.get('name')} (vocab {t.get('vocab_size')}, eos {t.get('eos_id')}, "
                   f"pad {t.get('pad_id')}, vocab hash {t.get('vocab_hash')})")
    click.echo(f"files ({human_bytes(d['size'])} recorded):")
    width = max((len(f["name"]) for f in d["files"]), default=0)
    for f in d["files"]:
        if f["name"] == META:
            state = "this metadata"
        elif f["bytes"] is None:
            state = "MISSING"
        elif f["recorded_bytes"] is None:
            state = "not recorded in meta.json"
        elif f["recorded_bytes"] != f["bytes"]:
            state = f"SIZE DIFFERS: meta.json records {f['recorded_bytes']} bytes"
        else:
            state = f"xxh64 {f['xxh64']}"
        size = human_bytes(f["bytes"] if f["bytes"] is not None else f["recorded_bytes"])
        click.echo(f"  {f['name'].ljust(width)}  {size:>9}  {state}")
    click.echo("config:" if d["config"] is not None else "config: (config.json missing)")
    if d["config"] is not None:
        for line in json.dumps(d["config"], indent=2).splitlines():
            click.echo("  " + line)


# ---- the command ---------------------------------------------------------------------------------
def run_dir_option(f):
    return click.option("--run-dir", "run_dir", metavar="DIR", envvar=ENV_RUN_DIR, show_envvar=True,
                        default=DEFAULT_RUN_DIR, show_default=True,
                        help="Run folder (holds checkpoints/ and training_logs/); trainerd's default too.")(f)


def yes_option(f):
    return click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")(f)


@click.group()
def cli() -> None:
    """ckpt: list, inspect, delete, prune, clean, verify, export and plot trainerd checkpoints."""


@cli.command(name="list")
@run_dir_option
@click.option("--run", metavar="NAME", help="Only the checkpoints of this run.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_(run_dir, run, as_json):
    """Checkpoints, newest first: name, run, step, loss, tokens, time, size (from meta.json alone)."""
    rd = RunDir(run_dir, must_exist=True)
    if run is not None:
        check_name(run, "run")
    if as_json:
        click.echo(json.dumps([c.summary() for c in rd.checkpoints(run)], indent=2))
    else:
        print_list(rd, run)


@cli.command()
@run_dir_option
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(run_dir, name, as_json):
    """Everything about checkpoint NAME: metadata, tokenizer, files and sizes, the resolved config."""
    d = show_data(RunDir(run_dir, must_exist=True).get(name))
    if as_json:
        click.echo(json.dumps(d, indent=2))
    else:
        print_show(d)


@cli.command()
@run_dir_option
@click.argument("names", nargs=-1, required=True)
@yes_option
def delete(run_dir, names, yes):
    """Delete the checkpoints NAMES (their folders only; logs stay)."""
    rd = RunDir(run_dir, must_exist=True)
    cks = [rd.get(n) for n in dict.fromkeys(names)]   # every name checked before anything is deleted
    delete_checkpoints(rd, cks, yes)


@cli.command(name="prune")
@run_dir_option
@click.option("--keep", type=int, required=True, metavar="N", help="Checkpoints to keep per run (the most recently saved).")
@click.option("--run", metavar="NAME", help="Only this run.")
@yes_option
def prune_(run_dir, keep, run, yes):
    """Delete all but the newest N checkpoints (most recently saved) of each run."""
    prune(RunDir(run_dir, must_exist=True), keep, run, yes)


@cli.command(name="clean")
@run_dir_option
@yes_option
def clean_(run_dir, yes):
    """Remove unfinished saves (checkpoints/.tmp-*) and logs of runs with no checkpoint left.

    Runs whose trainer is running (its lock in RUN_DIR/.locks is held) are left alone.
    """
    clean(RunDir(run_dir, must_exist=True), yes)


@cli.command()
@run_dir_option
@click.argument("name")
def verify(run_dir, name):
    """Check NAME's files against the sizes and xxh64 in meta.json, and that the weights load."""
    ck = RunDir(run_dir, must_exist=True).get(name)
    problems, notes = verify_checkpoint(ck)
    for n in notes:
        click.echo(n)
    if problems:
        for fname, what in problems:
            click.echo(f"BAD {fname}: {what}")
        bad = ", ".join(dict.fromkeys(fname for fname, _ in problems))
        raise click.ClickException(f"{ck.name} failed verification: {bad}")
    click.echo(f"{ck.name}: ok")


@cli.command()
@run_dir_option
@click.argument("name")
@click.argument("out", type=click.Path(path_type=Path))
def export(run_dir, name, out):
    """Write checkpoint NAME as a Hugging Face model folder OUT (a new or empty folder).

    AutoModelForCausalLM.from_pretrained(OUT) and AutoTokenizer.from_pretrained(OUT) load it.
    """
    ck = RunDir(run_dir, must_exist=True).get(name)
    export_checkpoint(ck, out)
    click.echo(f"Exported {ck.name} to {out}")


@cli.command()
@run_dir_option
@click.argument("runs", nargs=-1, required=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, metavar="FILE.png",
              help="Image to write.")
def plot(run_dir, runs, out):
    """Plot loss and held-out loss, learning rate, tokens/s and the steps in the plan against step for RUNS,
    from training_logs/<run>_run_<k>.jsonl."""
    rd = RunDir(run_dir, must_exist=True)
    plot_runs(rd, list(runs), out)
    click.echo(f"Wrote {out} ({', '.join(dict.fromkeys(runs))})")


# ---- the trainer's interactive menu ---------------------------------------------------------------
MENU = """
Checkpoint Management ({path})
  1. List checkpoints
  2. Delete checkpoints
  3. Prune: keep the newest N of each run
  4. Clean: unfinished saves and orphaned logs
  5. Export to a Hugging Face folder
  B. Back"""


def _pick(rd: RunDir, answer: str, cks: list[Checkpoint]) -> list[Checkpoint]:
    """Checkpoints by list number or name, space- or comma-separated."""
    picked = []
    for word in answer.replace(",", " ").split():
        if word.isdigit():
            i = int(word)
            if not 1 <= i <= len(cks):
                raise click.ClickException(f"no checkpoint number {i} (1 to {len(cks)})")
            picked.append(cks[i - 1])
        else:
            picked.append(rd.get(word))
    return list({c.name: c for c in picked}.values())


def menu(run_dir: str | os.PathLike) -> None:
    """The "X. Checkpoint Management" screen: the `ckpt` operations behind prompts. Returns on B or end of input."""
    rd = RunDir(run_dir, must_exist=False)
    while True:
        click.echo(MENU.format(path=rd.path))
        try:
            choice = click.prompt("Choice", default="B", show_default=False).strip().lower()
        except click.Abort:
            return
        if choice in ("b", "q", "x"):
            return
        try:
            if choice == "1":
                print_list(rd)
            elif choice == "2":
                cks = print_list(rd, numbered=True)
                if cks:
                    delete_checkpoints(rd, _pick(rd, click.prompt("Delete which (numbers or names)"), cks), yes=False)
            elif choice == "3":
                prune(rd, click.prompt("Keep how many per run", type=int), None, yes=False)
            elif choice == "4":
                clean(rd, yes=False)
            elif choice == "5":
                cks = print_list(rd, numbered=True)
                if cks:
                    picked = _pick(rd, click.prompt("Export which (number or name)"), cks)
                    if len(picked) != 1:
                        raise click.ClickException("export one checkpoint at a time")
                    out = click.prompt("Output folder", type=click.Path(path_type=Path))
                    export_checkpoint(picked[0], out)
                    click.echo(f"Exported {picked[0].name} to {out}")
            else:
                click.echo(f"Unknown choice {choice!r}")
        except click.ClickException as e:
            click.echo(f"Error: {e.format_message()}", err=True)
        except click.Abort:
            click.echo("Cancelled.")


if __name__ == "__main__":
    cli()
