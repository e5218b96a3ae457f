"""Checkpoints: one folder per save, written to a temporary folder, fsynced, then renamed.

    RUN_DIR/checkpoints/<run>-step<8 digits>[_run_<k>]/
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
trainer of that run removes the leftover. A save never replaces or moves an existing folder: the name comes
from RunDir.save_name (see trainerd/rundir.py, which owns every name in the run folder). Everything loads with `torch.load(weights_only=True)`: no
pickled code runs. meta.json is written last inside the temporary folder, so a folder with a complete
meta.json lists every file that belongs to it.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import xxhash

from shared.fsutil import fsync_dir

from .rundir import FORMAT, RunDir

# torch and safetensors are imported by the functions that need them: listing checkpoints and the checks
# on resume stay fast (the command checks its arguments before torch loads)

FILES = ("config.json", "model_config.json", "tokenizer.json", "model.safetensors", "optimizer.pt", "state.pt")


class CheckpointError(RuntimeError):
    pass


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
    fd = os.open(path, os.O_RDWR)  # Windows flushes only a file open for writing
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
    rd = RunDir(run_dir)
    root = rd.checkpoints_dir
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    if final.exists():
        raise CheckpointError(f"checkpoint {name} exists already; a save never replaces a folder")
    tmp = rd.temporary(name)
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
        os.rename(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_failure(e: BaseException) -> str:
    """What went wrong in a save, in a few words: disk full surfaces as OSError, or as RuntimeError from
    torch.save."""
    if getattr(e, "errno", None) == 28 or "No space" in str(e) or "unexpected pos" in str(e):
        return "disk full"
    return _first_line(e)


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


# -- reading ----------------------------------------------------------------------------------------------
def read_json(folder: Path, name: str) -> dict:
    try:
        with open(Path(folder) / name) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {Path(folder).name}: cannot read {name}: {e}") from None


def check_files(folder: Path, meta: dict) -> None:
    """Every file meta.json records is there with its recorded size (the hashes are `ckpt verify`'s)."""
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
