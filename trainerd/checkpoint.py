"""Checkpoints: one folder per save, written to a temporary folder, fsynced, then renamed.

    RUN_DIR/checkpoints/<run>-step<8 digits>/
        meta.json           small, readable without torch (step, loss, tokens, time, run, files and hashes)
        config.json         the resolved trainer config
        model_config.json   transformers LlamaConfig.to_dict()
        tokenizer.json      the cache's tokenizer identity {name, vocab_hash, vocab_size, eos_id, pad_id}
        model.safetensors   safetensors.torch.save_model(unwrapped model): no _orig_mod., tied weights once
        optimizer.pt        torch.save(optimizer.state_dict())
        state.pt            step, schedule, data plan state, RNG states of every rank
    RUN_DIR/checkpoints/.tmp-<name>-<pid>/   a save in progress

FSDP2 (accelerate's fsdp_version 2: parameters are DTensor shards). The full weights and optimizer state
are gathered with torch.distributed.checkpoint.state_dict (collectives: every rank calls
`gather_full_state`, rank 0 receives the tensors and writes). model.safetensors then has the same layout
as save_model's: the same names, the tied duplicate dropped under the same rule and recorded in the same
metadata, so `ckpt export` and transformers read either. optimizer.pt differs in its keys only:

    unsharded   {"state": {0: {...}, 1: ...}, "param_groups": [{"params": [0, 1, ...], ...}]}
    FSDP2       {"state": {"model.embed_tokens.weight": {...}, ...}, "param_groups": [{"params": [FQN, ...], ...}]}

Both hold full (unsharded) tensors. Ids are positions in the optimizer's parameter order, names are
each parameter's first name in model.named_parameters() (the tied embedding: model.embed_tokens.weight);
`load_optimizer` converts one into the other, so a checkpoint of either kind resumes under either kind.

A crash during a save leaves only the temporary folder: the previous checkpoint is intact, and the next
trainer of that run removes the leftover. Everything loads with `torch.load(weights_only=True)`: no
pickled code runs. meta.json is written last inside the temporary folder, so a folder with a complete
meta.json lists every file that belongs to it.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import xxhash

from shared.fsutil import FolderLock, LockHeld, fsync_dir, probe_locks

# torch and safetensors are imported by the functions that need them: listing checkpoints and the checks
# on resume stay fast (the command checks its arguments before torch loads)

FORMAT = 1
CKPT_DIR = "checkpoints"
LOCKS_DIR = ".locks"   # RUN_DIR/.locks/<run>.lock: held by the trainer of that run while it runs
TMP_PREFIX = ".tmp-"
FILES = ("config.json", "model_config.json", "tokenizer.json", "model.safetensors", "optimizer.pt", "state.pt")


class CheckpointError(RuntimeError):
    pass


def ckpt_name(run: str, step: int) -> str:
    return f"{run}-step{step:08d}"


def ckpt_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CKPT_DIR


# -- RNG --------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) generator states, in types weights_only loading accepts."""
    import torch
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import torch
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def plain(x):
    """NumPy scalars and arrays as Python ints, floats and lists, so state.pt loads with weights_only."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(plain(v) for v in x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


# -- writing ----------------------------------------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _torch_save(obj, path: Path) -> None:
    import torch
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def file_digest(path: Path) -> dict:
    h = xxhash.xxh64()
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 22)
            if not block:
                break
            h.update(block)
    return {"bytes": path.stat().st_size, "xxh64": h.hexdigest()}


def save_checkpoint(run_dir, name: str, *, model, optimizer_state: dict, state: dict,
                    meta: dict, config: dict, model_config: dict, tokenizer: dict,
                    weights: dict | None = None, kill_after_weights: bool = False) -> Path:
    """Write checkpoint `name` atomically; returns its folder. `model` must be the unwrapped module.

    `weights`: the full state dict from `gather_full_state` when the model is sharded (FSDP2); then the
    file is written from it, and `model` only tells which names are tied. None: save_model(model).
    `kill_after_weights` is a fault hook for tests: SIGKILL this process once the weights are in the
    temporary folder (a crash in the middle of a save).
    """
    root = ckpt_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    tmp = root / f"{TMP_PREFIX}{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "model_config.json", model_config)
        _write_json(tmp / "tokenizer.json", tokenizer)
        _save_weights(model, weights, tmp / "model.safetensors")
        _fsync_file(tmp / "model.safetensors")
        if kill_after_weights:
            os.kill(os.getpid(), signal.SIGKILL)
        _torch_save(optimizer_state, tmp / "optimizer.pt")
        _torch_save(plain(state), tmp / "state.pt")
        files = {f: file_digest(tmp / f) for f in FILES}
        _write_json(tmp / "meta.json", {"format": FORMAT, "name": name, **meta, "files": files})
        fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. resumed and stopped at once): replace it
            old = root / f"{TMP_PREFIX}old-{name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _save_weights(model, weights: dict | None, path: Path) -> None:
    from safetensors.torch import save_file, save_model
    if weights is None:
        save_model(model, str(path))
        return
    # the gathered tensors are copies, so safetensors cannot see the tie: drop the duplicates by name,
    # as save_model would, and record them the same way ({dropped: kept}, read by `ckpt verify`)
    aliases = tied_names(model)
    tensors = {k: v.contiguous() for k, v in weights.items() if k not in aliases}
    save_file(tensors, str(path), metadata=aliases or None)


def prune(run_dir, run: str, keep: int, keep_name: str | None = None) -> list[str]:
    """Delete all but the newest `keep` checkpoints of `run`; returns the deleted names.

    Newest means most recently saved (then highest step), not highest step: a run resumed from an older
    checkpoint follows a new line, and its saves must outlive the later steps of the line it left (by
    step, each new save would be the first to go). `keep_name` (the save just written) counts as the newest
    whatever its time says: a clock set back since an earlier save must not make it the first to go."""
    if keep <= 0:
        return []
    mine = list_checkpoints(run_dir, run=run)  # oldest first by time, then step
    mine = [m for m in mine if m["name"] != keep_name] + [m for m in mine if m["name"] == keep_name]
    removed = []
    for m in mine[:-keep]:
        shutil.rmtree(ckpt_root(run_dir) / m["name"], ignore_errors=True)
        removed.append(m["name"])
    if removed:
        fsync_dir(ckpt_root(run_dir))
    return removed


def resave_leftover(folder: Path) -> dict | None:
    """The meta of checkpoint NAME when `folder` is .tmp-old-NAME-PID, what a same-step re-save moved aside.

    save_checkpoint replaces a checkpoint of the same step by renaming it to .tmp-old-NAME-PID, then the new
    one into place, then removing the old. NAME comes from the folder's meta.json (such a folder was a
    complete checkpoint), not from its name, which is ambiguous for runs named old-...: an unfinished save
    of run `old-x` is .tmp-old-x-stepN-PID too, and has no meta, or one that names old-x-stepN."""
    folder = Path(folder)
    if not folder.name.startswith(f"{TMP_PREFIX}old-"):
        return None
    meta = read_meta(folder)
    name = meta.get("name") if meta else None
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        return None
    rest = folder.name[len(f"{TMP_PREFIX}old-"):]
    if not (rest.startswith(f"{name}-") and rest[len(name) + 1:].isdigit()):
        return None
    return meta


def interrupted_resave(folder: Path) -> dict | None:
    """The meta of a re-save's leftover whose NAME is missing: the crash came between the two renames, and
    the folder is the only copy of that checkpoint."""
    meta = resave_leftover(folder)
    return meta if meta is not None and not (Path(folder).parent / meta["name"]).exists() else None


def restore_interrupted_resave(folder: Path) -> str:
    """Rename the checkpoint of an interrupted re-save back into place; returns one line."""
    name = interrupted_resave(folder)["name"]
    os.replace(folder, Path(folder).parent / name)
    fsync_dir(Path(folder).parent)
    return f"restored {name}: a save that replaced it was interrupted"


def remove_stale_temporaries(run_dir, run: str) -> list[str]:
    """Clear what crashed saves of `run` left (call only while holding the run's lock); returns one line each.

    An interrupted same-step re-save is restored, everything else removed. .tmp-old-RUN-stepN-PID without a
    meta naming RUN-stepN is the rest of a re-save's removal, or an unfinished save of run old-RUN: it is
    left alone while a trainer of old-RUN is alive."""
    root = ckpt_root(run_dir)
    out = []
    if not root.is_dir():
        return out
    for p in sorted(root.iterdir()):
        if not (p.is_dir() and p.name.startswith(TMP_PREFIX)):
            continue
        meta = resave_leftover(p)
        if meta is not None:
            if meta.get("run") != run:
                continue  # another run's: its next trainer or `ckpt clean` sees to it
            if interrupted_resave(p) is not None:
                out.append(restore_interrupted_resave(p))
            else:
                shutil.rmtree(p, ignore_errors=True)
                out.append(f"removed {p.name}: the copy of {meta['name']} that a finished re-save replaced")
            continue
        elif p.name.startswith(f"{TMP_PREFIX}old-{run}-step"):
            with run_lock_free(run_dir, f"old-{run}") as free:
                if not free:
                    continue
                shutil.rmtree(p, ignore_errors=True)
            out.append(f"removed {p.name}: an unfinished save of an earlier trainer")
            continue
        elif not p.name.startswith(f"{TMP_PREFIX}{run}-step"):
            continue
        shutil.rmtree(p, ignore_errors=True)
        out.append(f"removed {p.name}: an unfinished save of an earlier trainer")
    return out


@contextmanager
def run_lock_free(run_dir, run):
    """Yields False when a trainer of run RUN is alive (its lock is held); True while holding that lock.

    A probe: the lock file is not created and nothing is written to it (the trainer's pid stays). A trainer
    starting at this moment retries its acquisition for a while (acquire_run_lock), so the probe's moment
    of holding never makes it fail."""
    if not isinstance(run, str) or not run or "/" in run or run.startswith(".") or ".." in run:
        yield False
        return
    with probe_locks([Path(run_dir) / LOCKS_DIR / f"{run}.lock"]) as free:  # no lock file: never trained here
        yield free


def acquire_run_lock(run_dir, run: str, patience_s: float = 2.0) -> FolderLock:
    """The trainer's lock of RUN, held until release. Retries for `patience_s` before LockHeld: `ckpt
    clean` and other trainers probe locks for a moment (run_lock_free)."""
    locks = Path(run_dir) / LOCKS_DIR
    locks.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return FolderLock(locks, f"{run}.lock").acquire()
        except LockHeld:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def restore_interrupted_resaves(run_dir) -> list[str]:
    """Restore the interrupted re-saves of every run before a trainer decides what to resume (a checkpoint
    away from its place would be passed over). A run whose trainer is alive is left alone: its re-save may
    be between the two renames right now."""
    root = ckpt_root(run_dir)
    out = []
    if not root.is_dir():
        return out
    for p in sorted(root.iterdir()):
        meta = interrupted_resave(p) if p.is_dir() else None
        if meta is None:
            continue
        with run_lock_free(run_dir, meta.get("run")) as free:
            if free and interrupted_resave(p) is not None:  # checked again under the lock
                out.append(restore_interrupted_resave(p))
    return out


# -- reading ----------------------------------------------------------------------------------------------
def read_meta(folder: Path) -> dict | None:
    try:
        with open(folder / "meta.json") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "step" not in meta:
        return None
    meta["path"] = str(folder)
    return meta


def list_checkpoints(run_dir, run: str | None = None) -> list[dict]:
    """Metadata of every complete checkpoint (temporary folders skipped), oldest first by time, then step."""
    root = ckpt_root(run_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if p.is_dir() and not p.name.startswith("."):
            meta = read_meta(p)
            if meta is not None and (run is None or meta.get("run") == run):
                out.append(meta)
    out.sort(key=lambda m: (m.get("time", 0), m["step"]))
    return out


def find_checkpoint(run_dir, spec: str) -> dict:
    """'latest' (the newest of any run), a checkpoint name, or a run name (its newest checkpoint); newest is
    the most recently saved, as for prune: after a resume from an older step, the line the run follows now."""
    metas = list_checkpoints(run_dir)
    if not metas:
        raise CheckpointError(f"no checkpoint in {ckpt_root(run_dir)} to resume from")
    if spec == "latest":
        return metas[-1]
    for m in metas:
        if m["name"] == spec:
            return m
    runs = [m for m in metas if m.get("run") == spec]
    if runs:
        return runs[-1]
    raise CheckpointError(f"no checkpoint or run named {spec!r} in {ckpt_root(run_dir)} "
                          f"(see `ckpt list --run-dir {run_dir}`)")


def read_json(folder: Path, name: str) -> dict:
    try:
        with open(Path(folder) / name) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {Path(folder).name}: cannot read {name}: {e}") from None


def check_files(folder: Path, meta: dict) -> None:
    for fname, info in meta.get("files", {}).items():
        p = Path(folder) / fname
        if not p.is_file():
            raise CheckpointError(f"checkpoint {Path(folder).name} lacks {fname}")
        if p.stat().st_size != info["bytes"]:
            raise CheckpointError(f"checkpoint {Path(folder).name}: {fname} is {p.stat().st_size} bytes, "
                                  f"meta.json says {info['bytes']}")


def load_weights(folder: Path, model) -> None:
    """Weights into the (unwrapped) model; tied weights were saved once and are restored to both names.

    A sharded (FSDP2) model: every rank reads the whole file and keeps its shards (no collective).
    """
    from safetensors.torch import load_file, load_model
    path = str(Path(folder) / "model.safetensors")
    try:
        if not is_sharded(model):
            load_model(model, path, strict=True)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        weights = load_file(path)
        for dropped, kept in tied_names(model).items():
            if dropped not in weights and kept in weights:
                weights[dropped] = weights[kept]
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=True))
    except (RuntimeError, OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {Path(folder).name}: weights do not fit the model: "
                              f"{_first_line(e)}") from None


def load_torch(folder: Path, name: str, map_location="cpu"):
    import torch
    try:
        return torch.load(Path(folder) / name, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, or a pickle with code in it
        import pickle
        if isinstance(e, pickle.UnpicklingError):  # torch's text advises weights_only=False: never do that here
            first = "it holds objects other than tensors and plain data (a pickle that may run code); refused"
        else:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"checkpoint {Path(folder).name}: cannot load {name}: {first}") from None


def compatibility_error(folder: Path, manifest) -> str | None:
    """Why checkpoint `folder` cannot go on with the cache of `manifest` (seq_len, tokenizer), or None."""
    folder = Path(folder)
    seq = read_json(folder, "model_config.json").get("max_position_embeddings")
    if seq is not None and seq != manifest.seq_len:
        return (f"the cache has seq_len {manifest.seq_len} but checkpoint {folder.name} was trained with "
                f"seq_len {seq}: resume on a cache of the same seq_len")
    saved, tok = read_json(folder, "tokenizer.json"), manifest.tokenizer
    if saved.get("vocab_hash") != tok.get("vocab_hash"):
        return (f"the cache's tokenizer ({tok.get('name')}, vocab hash {str(tok.get('vocab_hash'))[:12]}) differs "
                f"from checkpoint {folder.name}'s ({saved.get('name')}, {str(saved.get('vocab_hash'))[:12]})")
    return None


# -- FSDP2: full state from sharded parameters ------------------------------------------------------------
def is_sharded(model) -> bool:
    """True when the model's parameters are DTensor shards (FSDP2's fully_shard, as accelerate applies it)."""
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


def tied_names(model) -> dict[str, str]:
    """{dropped name: kept name} for parameters shared under several names (the tied embedding).

    The kept name follows save_model's rule (the first in sorted order), so both writers give one layout.
    """
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    out = {}
    for group in names.values():
        kept, *dropped = sorted(group)
        out.update({d: kept for d in dropped})
    return out


def _unwrap_optimizer(optimizer):
    # accelerate wraps the optimizer; torch's state-dict helpers want the torch optimizer inside
    return getattr(optimizer, "optimizer", optimizer)


def gather_full_state(model, optimizer) -> tuple[dict, dict]:
    """The full model state dict and full optimizer state dict (keyed by parameter name) of a sharded model.

    A collective: every rank must call it, in the same order relative to other collectives. With
    cpu_offload only rank 0 receives the tensors (on the CPU); the other ranks get empty dicts.
    """
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, _unwrap_optimizer(optimizer), options=options)
    return weights, optim


def _param_names(model, optimizer) -> list[str]:
    """The name of each parameter in the optimizer's order (the ids of an unsharded state_dict)."""
    name_of = {id(p): n for n, p in model.named_parameters()}  # first name of a tied parameter, as torch's
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _keyed_by(state: dict, new: dict) -> dict:
    """Optimizer state dict `state` with its parameter keys mapped through `new` (ids <-> names)."""
    try:
        groups = [{**group, "params": [new[k] for k in group["params"]]} for group in state["param_groups"]]
        return {"state": {new[k]: v for k, v in state["state"].items()}, "param_groups": groups}
    except KeyError as e:
        raise CheckpointError(f"the optimizer state names parameter {e.args[0]!r}, which the model lacks") from None


def _by_name(state: dict) -> bool:
    params = [k for group in state.get("param_groups", []) for k in group["params"]]
    return bool(params) and isinstance(params[0], str)


def load_optimizer(folder: Path, model, optimizer) -> None:
    """optimizer.pt into `optimizer`, whether the model is sharded or not and whichever way it was saved.

    Sharded: every rank loads the full state (host memory: one full copy per rank) and keeps its shards.
    """
    state = load_torch(folder, "optimizer.pt")
    try:
        _load_optimizer_state(state, model, optimizer)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {Path(folder).name}: {e}") from None


def _load_optimizer_state(state: dict, model, optimizer) -> None:
    if not is_sharded(model):
        if _by_name(state):  # saved under FSDP2
            state = _keyed_by(state, {n: i for i, n in enumerate(_param_names(model, optimizer))})
        optimizer.load_state_dict(state)  # moved to the parameters' device
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    inner = _unwrap_optimizer(optimizer)
    if not _by_name(state):  # saved unsharded (one process, DDP)
        state = _keyed_by(state, dict(enumerate(_param_names(model, inner))))
    try:
        set_optimizer_state_dict(model, inner, state, options=StateDictOptions(full_state_dict=True))
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"the optimizer state does not fit: {_first_line(e)}") from None
