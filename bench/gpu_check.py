"""Every GPU check of trainerd in one run, printed as one table (bench/gpu_check.sh runs it).

    bench/gpu_check.sh                 # one H100 or H200: 124m and 415m, GPT-2 vocabulary, seq_len 1024, bf16
    bench/gpu_check.sh --cpu-smoke     # the same paths on the CPU with tiny sizes (no figure to trust)

Sections, in this order (each row printed as soon as it is measured; a section that would not fit in what is
left of --budget-s is printed as skipped):
  1. speed: per preset, a hand loop (forward, backward, clip, AdamW; batches in memory) with each attention and
     loss (sdpa/full, flex/full, flex/chunked, causal without document masking, and where liger-kernel is
     installed its fused loss and, as `+kernels`, its RMSNorm, SwiGLU and RoPE kernels): step
     time, tokens/s, MFU over the card's dense bf16 peak, peak memory; then the real trainer (`python -m
     trainerd`, same model, cache, attention and loss) and its step time over the hand loop's.
  2. flex against SDPA: the difference of the loss and of the gradients on one packed batch (124m, fp32).
  3. FSDP2: a run under launch/fsdp2.yaml saves at step 3 and goes on to step 6; a resume from step 3 must give
     steps 4 to 6 bitwise (--deterministic).
  4. memory: the largest micro-batch of 124m and 415m that trains within 8, 12, 16 and 24 GB
     (torch.cuda.set_per_process_memory_fraction), with and without activation checkpointing.
The data is a synthetic cache: random ids of the GPT-2 vocabulary in documents of log-normal lengths (median
about 500 tokens), packed as packerd packs them, so no tokenizer or corpus needs to travel.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from packerd.pack import build_chunk  # noqa: E402
from shared.chunk import dtype_for_vocab, encode_chunk, file_checksum  # noqa: E402
from shared.fsutil import atomic_write_bytes  # noqa: E402
from shared.manifest import ChunkEntry, Manifest, chunk_filename  # noqa: E402

GPT2_VOCAB, GPT2_EOS = 50257, 50256
CAPS_GB = (8, 12, 16, 24)


def synthetic_cache(folder: Path, vocab: int, seq_len: int, sequences: int, chunk_sequences: int = 256) -> Path:
    """A finished cache of random documents, written as packerd writes one (chunk files, then the manifest)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    lengths = np.maximum(rng.lognormal(6.2, 1.0, size=sequences * seq_len // 300 + 10).astype(np.int64), 2)
    tokens = rng.integers(0, vocab - 1, size=int(lengths.sum()), dtype=np.int64)
    ends = np.cumsum(lengths)
    tokens[ends - 1] = vocab - 1                      # each document ends with EOS, as packerd appends it
    dtype = dtype_for_vocab(vocab)
    tok = {"name": f"synthetic-{vocab}", "vocab_hash": f"synthetic-{vocab}", "vocab_size": vocab,
           "eos_id": vocab - 1, "pad_id": vocab - 1}
    m = Manifest(seq_len=seq_len, chunk_sequences=chunk_sequences, dtype=np.dtype(dtype).name, tokenizer=tok,
                 sources=["synthetic"])
    starts, per_chunk, pos, doc = np.concatenate([[0], ends[:-1]]), chunk_sequences * seq_len, 0, 0
    for cid in range(sequences // chunk_sequences):
        part = tokens[pos:pos + per_chunk].astype(dtype)
        inside = starts[(starts >= pos) & (starts < pos + per_chunk)] - pos
        data = encode_chunk(build_chunk(part, inside, seq_len))
        atomic_write_bytes(folder / chunk_filename(cid), data)
        first = doc
        doc += len(inside)
        m.chunks.append(ChunkEntry(id=cid, sequences=chunk_sequences, tokens=len(part), bytes=len(data),
                                   checksum=file_checksum(data), start=[first, 0], end=[doc, 0],
                                   documents=len(inside), committed_at=time.time()))
        pos += per_chunk
    m.documents, m.finished = doc, True
    m.save(folder)
    return folder


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def rows_of(cache: Path, steps: int, global_batch: int):
    from shared.cache import open_cache
    from trainerd.data import DataPlan
    plan = DataPlan(open_cache(cache), seed=1337, global_batch=global_batch, rank=0, world_size=1, target_epochs=50)
    return [plan.get_batch(s) for s in range(steps)]


def hand_loop(a, preset: str, attention: str, loss: str, cache: Path, device, *, mb: int | None = None,
              steps: int | None = None, ckpt: bool = False) -> dict:
    """Forward, backward, clip, AdamW over batches held in memory: the reference for trainerd's step."""
    from trainerd.config import ModelConfig
    from trainerd.model import build_model, checkpoint_activations, flops_per_token, num_params, param_groups
    from trainerd.model import summed_loss
    mb, steps = mb or a.micro_batch, steps or a.steps
    kernels, loss = loss.endswith("+kernels"), loss.removesuffix("+kernels")
    batches = rows_of(cache, steps, mb)
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset=preset, **a.size), a.vocab, a.seq_len, a.vocab - 1,
                        attention="sdpa" if attention == "causal" else attention).to(device)
    if ckpt:
        checkpoint_activations(model)
    if kernels:  # what model.liger_kernels does in trainerd.model.build
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama(rope=True, swiglu=True, rms_norm=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False, model=model)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=3e-4, **({"fused": True} if device.type == "cuda" else {}))
    fwd = torch.compile(model) if a.compile else model
    mixed = "bf16" if device.type == "cuda" else "no"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, toks = [], []
    for b in batches:
        t0 = time.perf_counter()
        ids, pos, labels = b.to(device)
        if attention == "causal":                      # one causal sequence per row: no document masking
            pos = torch.arange(a.seq_len, device=device).expand_as(ids)
        total = summed_loss(fwd, ids, pos, labels, attention="sdpa" if attention == "causal" else attention,
                            mixed=mixed, loss=loss, loss_chunk=a.loss_chunk)
        (total / b.num_targets).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        toks.append(b.num_tokens)
    step = statistics.median(times[a.skip:])
    tps = statistics.median(toks[a.skip:]) / step
    n = num_params(model)
    peak = a.peak
    return {"step_ms": step * 1000, "tokens_per_s": tps,
            "mfu": 100 * flops_per_token(model.config, n, a.seq_len) * tps / peak if peak else None,
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            "params": n}


def trainerd_run(a, preset: str, attention: str, loss: str, cache: Path, work: Path, extra=(), launch=None,
                 name: str = "gc", steps: int | None = None) -> list[dict]:
    """The real trainer on the same cache; its step records."""
    args = ["--cache-dir", str(cache), "--run-dir", str(work / "runs"), "--endpoint", f"ipc://{work}/{name}.sock",
            "--model", preset, "--attention", attention, "--loss", loss, "--micro-batch-size", str(a.micro_batch),
            "--max-steps", str(steps or a.steps), "--checkpoint-every", "0", "--log-every", "1",
            "--set", "data.target_epochs=50", "--set", f"train.loss_chunk={a.loss_chunk}", *extra]
    for k, v in a.size.items():
        args += ["--set", f"model.{k}={v}"]
    if a.compile:
        args.append("--compile")
    if "--resume" not in extra:
        args += ["--new", name]
    cmd = (launch or [sys.executable, "-m", "trainerd"]) + args
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"trainerd exited {p.returncode}: {p.stderr.strip().splitlines()[-1:]}")
    logs = sorted((work / "runs" / "training_logs").glob(f"{name}_run_*.jsonl"))
    return [r for r in map(json.loads, logs[-1].read_text().splitlines()) if "event" not in r]


def speed(a, jobs, device, cache: Path, work: Path, budget: Budget, out) -> None:
    """Each job: (preset, attention, loss) for the hand loop, or (preset, "trainerd", None) for the trainer with
    a.default against the hand loop's figure for it (measured by an earlier job)."""
    from importlib.util import find_spec

    from trainerd.model import triton_available
    liger = device.type == "cuda" and find_spec("liger_kernel") is not None
    for preset, attention, loss in jobs:
        label = f"{preset} {attention}" + (f"/{loss}" if loss else "")
        if loss and ("liger" in loss or "+kernels" in loss) and not liger:
            out(label, "skipped: liger-kernel not installed or no CUDA")
        elif attention == "flex" and (device.type != "cuda" or not triton_available()):
            out(label, "skipped: flex trains on CUDA with Triton only (no CPU backward)")
        elif budget.left() < a.section_s * (2 if attention == "trainerd" else 1):
            out(label, "skipped: time budget")
        elif attention != "trainerd":
            r = a.hand[(preset, attention, loss)] = hand_loop(a, preset, attention, loss, cache, device)
            mfu = f"{r['mfu']:.1f}% MFU" if r["mfu"] is not None else "MFU n/a"
            mem = f"{r['peak_gb']:.1f} GiB peak" if r["peak_gb"] is not None else "memory n/a"
            out(label, f"hand loop {r['step_ms']:.1f} ms/step, {r['tokens_per_s']:,.0f} tokens/s, {mfu}, {mem}")
        elif (base := a.hand.get((preset, *a.default))) is None:
            out(label, "skipped: no hand-loop figure for " + "/".join(a.default))
        else:
            steps = trainerd_run(a, preset, *a.default, cache, work, name=f"speed{preset}")
            t = statistics.median(r["step_s"] for r in steps[a.skip:] if r["step_s"]) * 1000
            out(f"{label} {'/'.join(a.default)}", f"{t:.1f} ms/step = {t / base['step_ms']:.3f} x the hand loop "
                f"(target <= 1.03), {statistics.median(r['tokens_per_s'] for r in steps[a.skip:]):,.0f} tokens/s")


def flex_vs_sdpa(a, device, out) -> None:
    """The loss and gradients of flex and SDPA on one packed batch, same weights, fp32."""
    from trainerd.config import ModelConfig
    from trainerd.model import build_model, summed_loss
    preset = a.presets[0]
    g = torch.Generator().manual_seed(0)
    n, L = 2, a.seq_len
    ids = torch.randint(0, a.vocab - 1, (n, L), generator=g)
    cut = [0, L // 5, L // 2, L - L // 7]
    pos = torch.cat([torch.arange(e - s) for s, e in zip(cut, cut[1:] + [L])]).repeat(n, 1)
    labels = ids.clone()
    ids, pos, labels = ids.to(device), pos.to(device), labels.to(device)
    results = {}
    for attention in ("sdpa", "flex"):
        torch.manual_seed(0)
        model = build_model(ModelConfig(preset=preset, **a.size), a.vocab, L, a.vocab - 1, attention=attention).to(device)
        backward = device.type == "cuda"           # flex has no backward on the CPU
        with torch.set_grad_enabled(backward):
            loss = summed_loss(model, ids, pos, labels, attention=attention, mixed="no")
        grads = None
        if backward:
            loss.backward()
            grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[attention] = (loss.detach(), grads)
    (ls, gs), (lf, gf) = results["sdpa"], results["flex"]
    text = f"loss {ls.item():.6f} vs {lf.item():.6f} (relative difference {abs(lf - ls).item() / ls.item():.2e})"
    if gs is not None:
        text += f", gradients: |flex - sdpa| / |sdpa| = {((gf - gs).norm() / gs.norm()).item():.2e}"
    else:
        text += ", gradients n/a (no flex backward on the CPU)"
    out(f"flex vs sdpa ({preset}, fp32)", text)


def fsdp_resume(a, device, cache: Path, work: Path, out) -> None:
    """6 steps with a save at 3, then a resume from 3: steps 4 to 6 bitwise. FSDP2 on CUDA (one process)."""
    if device.type == "cuda":
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / "fsdp2.yaml"), "--num_processes", "1",
                  "-m", "trainerd"]
        how = "FSDP2 (launch/fsdp2.yaml, 1 GPU)"
    else:
        launch, how = [sys.executable, "-m", "trainerd"], "one CPU process (FSDP2 is CUDA only)"
    small = argparse.Namespace(**{**vars(a), "compile": False, "size": a.size})
    extra = ["--deterministic", "--set", "checkpoint.every=3", "--set", "checkpoint.keep=0"]
    whole = trainerd_run(small, "tiny", "sdpa" if device.type != "cuda" else "flex", "full", cache, work,
                         extra, launch, name="fsdp", steps=6)
    resumed = trainerd_run(small, "tiny", "sdpa" if device.type != "cuda" else "flex", "full", cache, work,
                           [*extra, "--resume", "fsdp-step00000003"], launch, name="fsdp", steps=6)
    same = [r["loss"] for r in whole[3:]] == [r["loss"] for r in resumed]
    out(f"resume {how}", f"steps 4-6 {'bitwise equal' if same else 'DIFFER'}: "
        f"{[r['loss'] for r in whole[3:]]} vs {[r['loss'] for r in resumed]}")


def largest_micro_batch(fits, hi: int) -> int:
    """The largest micro-batch in 1..hi for which fits(mb) is true (fits is monotone), 0 if none."""
    lo, best = 1, 0
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(mid):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def memory(a, device, budget: Budget, out) -> None:
    """Per preset and activation checkpointing: one model and optimizer, then a search of the micro-batch that
    trains two steps under each cap (the optimizer's state exists after the first step, as in training)."""
    from trainerd.config import ModelConfig
    from trainerd.model import build_model, checkpoint_activations, param_groups, summed_loss
    cuda = device.type == "cuda"
    total = torch.cuda.get_device_properties(device).total_memory if cuda else None
    attention = a.default[0] if cuda else "sdpa"
    for preset in a.memory_presets:
        for ckpt in (False, True):
            torch.manual_seed(0)
            model = build_model(ModelConfig(preset=preset, **a.size), a.vocab, a.seq_len, a.vocab - 1,
                                attention=attention).to(device)
            if ckpt:
                checkpoint_activations(model)
            opt = torch.optim.AdamW(param_groups(model, 0.1), lr=3e-4, **({"fused": True} if cuda else {}))

            def attempt(model, opt, mb: int, cap: int) -> bool:
                ids = torch.randint(0, a.vocab - 1, (mb, a.seq_len), device=device)
                pos = (torch.arange(a.seq_len, device=device) % 512).expand(mb, -1)   # documents of 512 tokens
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / total))
                try:
                    for _ in range(2):
                        summed_loss(model, ids, pos, ids, attention=attention, mixed="bf16" if cuda else "no",
                                    loss=a.default[1] if cuda else "full", loss_chunk=a.loss_chunk).backward()
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                    return True
                except torch.OutOfMemoryError:
                    opt.zero_grad(set_to_none=True)
                    return False

            found = []
            for cap in CAPS_GB:
                if budget.left() < a.section_s / 4:
                    found.append(f"{cap} GB: skipped (time budget)")
                    continue
                found.append(f"{cap} GB: {largest_micro_batch(lambda mb: attempt(model, opt, mb, cap), a.max_micro_batch)}")
            where = "" if cuda else " (CPU: no cap, the search alone)"
            out(f"{preset} largest micro-batch{' + act. ckpt' if ckpt else ''}", ", ".join(found) + where)
            model = opt = None  # freed before the next one is built
    if cuda:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


def settings(cpu_smoke: bool) -> tuple[argparse.Namespace, list, list]:
    """(sizes, the speed jobs that come first, those that come last if time is left): the GPU figures the issue
    asks for first, then the variants that explain them."""
    if cpu_smoke:
        a = argparse.Namespace(presets=["tiny"], memory_presets=["tiny"], size={}, vocab=1024, seq_len=128,
                               micro_batch=2, steps=4, skip=1, compile=False, loss_chunk=64, max_micro_batch=4,
                               default=("sdpa", "chunked"), section_s=0)
        first = [("tiny", "sdpa", "chunked"), ("tiny", "trainerd", None), ("tiny", "sdpa", "full"),
                 ("tiny", "causal", "full"), ("tiny", "flex", "chunked")]
        return a, first, [("tiny", "flex", "liger"), ("tiny", "sdpa", "chunked+kernels")]
    a = argparse.Namespace(presets=["124m", "415m"], memory_presets=["124m", "415m"], size={}, vocab=GPT2_VOCAB,
                           seq_len=1024, micro_batch=16, steps=14, skip=4, compile=True, loss_chunk=8192,
                           max_micro_batch=64, default=("flex", "chunked"), section_s=45)
    first = [("124m", "flex", "chunked"), ("124m", "trainerd", None), ("124m", "sdpa", "full"),
             ("124m", "causal", "full"), ("415m", "flex", "chunked"), ("415m", "trainerd", None)]
    last = [("415m", "sdpa", "full"), ("124m", "flex", "full"), ("124m", "flex", "liger"),
            ("124m", "flex", "chunked+kernels"), ("415m", "causal", "full")]
    return a, first, last


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: every path, no figure to trust")
    ap.add_argument("--budget-s", type=float, default=450, help="stop starting sections after this many seconds")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    device = torch.device("cuda" if cuda else "cpu")
    a, first, last = settings(not cuda)
    a.hand = {}
    from trainerd.model import peak_flops
    a.peak = peak_flops(device)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    peak = f"{a.peak / 1e12:.0f} TFLOP/s dense bf16" if a.peak else "peak unknown: no MFU"
    rows, failed, budget = [], [], Budget(args.budget_s)

    def out(key: str, value: str) -> None:
        rows.append((key, value))
        print(f"{key}: {value}", flush=True)

    out("device", f"{name} ({peak}); torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        cache = synthetic_cache(work / "cache", a.vocab, a.seq_len, sequences=max(4096, a.micro_batch * a.steps * 4))
        for section, call in (("speed", lambda: speed(a, first, device, cache, work, budget, out)),
                              ("flex vs sdpa", lambda: flex_vs_sdpa(a, device, out)),
                              ("resume", lambda: fsdp_resume(a, device, cache, work, out)),
                              ("memory", lambda: memory(a, device, budget, out)),
                              ("speed, more variants", lambda: speed(a, last, device, cache, work, budget, out))):
            try:
                call()
            except Exception as e:  # a failed section is a row of the table, and the exit status
                failed.append(section)
                out(section, f"FAILED: {type(e).__name__}: {str(e).strip()[:300]}")
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(f"\ncommand: bench/gpu_check.sh {' '.join(sys.argv[1:])}".rstrip())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
