"""Step time of trainerd's loop against a minimal hand-written PyTorch loop on the same model and batches.

    python bench/bench_trainer.py                                   # CPU: tiny model, builtin corpus
    python bench/bench_trainer.py --model 124m --seq-len 1024 --micro-batch-size 16 --steps 60   # one GPU

In one run it:
  1. packs a cache (builtin:pydoc with builtin:bpe, or --cache-dir of an existing one),
  2. runs the real trainer (`python -m trainerd ... --max-steps N`) and reads its per-step times from the
     JSON-lines log (whole optimizer steps, synchronized on CUDA, real tokens only) and the time its
     prefetcher spent waiting for data,
  3. runs a minimal loop in this process (same model, initial weights, optimizer, precision, loss, and the
     same batches from the same data plan, loaded into memory beforehand, so it never waits for data)
     before and after the trainer, and takes the faster of the two as the baseline,
  4. prints the ratio of median step times (target <= 1.03), the share of step time waiting for data
     (target < 0.5%), and on CUDA tokens/s and MFU (6 N + attention FLOPs per token over the peak),
  5. then (unless --skip-loader) runs bench/bench_loader.py with --loader-args (default "--rounds 3"): loader
     tokens/s per core against LZ4 alone in the same rounds (target >= 200 M) and the notification latency
     from a packer's commit to the trainer's expanded plan (target p99 < 20 ms). So one command prints all
     of issue 3's speed figures.
The first --skip steps of each loop (allocation, compilation) are left out of the medians.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pack(cache: Path, seq_len: int, endpoint: str) -> None:
    cmd = [sys.executable, "-m", "packerd", "run", "--cache-dir", str(cache), "--tokenizer", "builtin:bpe",
           "--source", "builtin:pydoc", "--seq-len", str(seq_len), "--chunk-sequences", "64", "--workers", "1",
           "--endpoint", endpoint]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)


def trainer_args(a, cache: Path, run_dir: Path, endpoint: str) -> list[str]:
    args = ["--cache-dir", str(cache), "--run-dir", str(run_dir), "--new", "bench", "--endpoint", endpoint,
            "--model", a.model, "--micro-batch-size", str(a.micro_batch_size), "--grad-accum", str(a.grad_accum),
            "--max-steps", str(a.steps), "--checkpoint-every", "0", "--mixed-precision", a.mixed_precision,
            "--log-every", str(max(a.steps // 4, 1)), "--set", f"data.target_epochs={a.epochs}"]
    if a.threads:
        args += ["--threads", str(a.threads)]
    if a.compile:
        args += ["--compile"]
    if a.hidden_size:
        args += ["--hidden-size", str(a.hidden_size)]
    if a.layers:
        args += ["--layers", str(a.layers)]
    return args


def run_trainerd(a, cache: Path, run_dir: Path, endpoint: str) -> dict:
    cmd = [sys.executable, "-m", "trainerd", *trainer_args(a, cache, run_dir, endpoint)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"trainerd failed ({p.returncode}):\n{p.stderr[-3000:]}")
    recs = [json.loads(l) for l in open(run_dir / "training_logs" / "bench_run_1.jsonl")]
    steps = [r for r in recs if "event" not in r]
    fin = [r for r in recs if r.get("event") == "finished"][0]
    started = [r for r in recs if r.get("event") == "started"][0]
    times = [r["step_s"] for r in steps[a.skip:] if r["step_s"]]
    return {"step_s": times, "tokens_per_s": [r["tokens_per_s"] for r in steps[a.skip:] if r["tokens_per_s"]],
            "wait_s": fin["data_wait_s"], "loop_s": sum(r["step_s"] for r in steps if r["step_s"]),
            "params": started["params"], "device": started["device"], "losses": [r["loss"] for r in steps],
            "cmd": cmd}


def minimal_loop(a, cache_dir: Path) -> dict:
    """The hand-written reference: nothing but forward, backward, clip, AdamW, and a loss readout."""
    import torch
    import torch.nn.functional as F

    from shared.cache import open_cache
    from trainerd.config import load_config
    from trainerd.data import DataPlan
    from trainerd.model import build_model, param_groups
    from trainerd.schedule import LRSchedule

    over = {"model.preset": a.model}
    if a.hidden_size:
        over["model.hidden_size"] = a.hidden_size
    if a.layers:
        over["model.num_layers"] = a.layers
    cfg = load_config(None, over)
    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    cache = open_cache(cache_dir)
    tok = cache.manifest.tokenizer
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, int(tok["vocab_size"]), cache.seq_len, int(tok["eos_id"])).to(device)
    opt = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
                            betas=(cfg.train.beta1, cfg.train.beta2), eps=cfg.train.eps, **({"fused": True} if cuda else {}))
    fwd = torch.compile(model) if a.compile else model
    mp = a.mixed_precision if a.mixed_precision != "auto" else ("bf16" if cuda else "no")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp)
    plan = DataPlan(cache, seed=cfg.train.seed, global_batch=a.micro_batch_size * a.grad_accum, rank=0, world_size=1,
                    target_epochs=a.epochs)
    batches = [plan.get_batch(s) for s in range(a.steps)]  # in memory: the baseline never waits for data
    sched = LRSchedule(cfg.schedule, cfg.train.lr, max_steps=a.steps)  # the same rates, so the losses compare
    sched.update(0, plan.total_steps, plan.estimated_total_steps, plan.finished)
    mb = a.micro_batch_size
    times, losses = [], []
    for step, b in enumerate(batches):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = sched.lr(step)
        ids, pos, labels = b.to(device, non_blocking=True)  # as trainerd does: the labels of a full batch are its ids
        n = torch.tensor(float(b.num_targets), dtype=torch.float64, device=device)
        scale = (1 / n).to(torch.float32)
        total = torch.zeros((), device=device)
        for m in range(a.grad_accum):
            rows = slice(m * mb, (m + 1) * mb)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = fwd(input_ids=ids[rows], position_ids=pos[rows], use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[rows][:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
            (loss * scale).backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append((total / n).item())
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"step_s": times[a.skip:], "losses": losses, "tokens": [b.num_tokens for b in batches]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="tiny (CPU default) | 124m (CUDA default) | 415m")
    ap.add_argument("--hidden-size", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--seq-len", type=int, default=None, help="for the packed cache (CPU default 128, CUDA 1024)")
    ap.add_argument("--micro-batch-size", type=int, default=None)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--skip", type=int, default=None, help="first steps left out of the medians")
    ap.add_argument("--epochs", type=float, default=20.0, help="target epochs (the builtin corpus is small)")
    ap.add_argument("--mixed-precision", default="auto")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--cache-dir", type=Path, help="an existing cache instead of packing builtin:pydoc")
    ap.add_argument("--skip-loader", action="store_true", help="do not run bench/bench_loader.py afterwards")
    ap.add_argument("--loader-args", default="--rounds 3", help="arguments for bench/bench_loader.py")
    a = ap.parse_args()
    import torch
    cuda = torch.cuda.is_available()
    a.model = a.model or ("124m" if cuda else "tiny")
    a.seq_len = a.seq_len or (1024 if cuda else 128)
    a.micro_batch_size = a.micro_batch_size or (16 if cuda else 8)
    a.steps = a.steps or (60 if cuda else 80)
    a.skip = a.skip if a.skip is not None else (10 if cuda else 5)

    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        tmp = Path(tmp)
        endpoint = f"ipc://{tmp}/p.sock"
        cache = a.cache_dir or tmp / "cache"
        if a.cache_dir is None:
            pack(cache, a.seq_len, endpoint)
        base1 = minimal_loop(a, cache)
        t = run_trainerd(a, cache, tmp / "runs", endpoint)
        base2 = minimal_loop(a, cache)

    med_t = statistics.median(t["step_s"])
    med_b = min(statistics.median(base1["step_s"]), statistics.median(base2["step_s"]))
    same = t["losses"][: len(base1["losses"])] == base1["losses"]
    rows = [("device", t["device"] + (f" ({torch.cuda.get_device_name()})" if cuda else f", {torch.get_num_threads()} threads")),
            ("model", f"{a.model}, {t['params']:,} parameters"),
            ("batch", f"{a.micro_batch_size} x {a.grad_accum} x {a.seq_len} tokens, {a.steps} steps ({a.skip} skipped)"),
            ("minimal loop step", f"{med_b * 1000:.2f} ms (median; runs before/after: "
                                  f"{statistics.median(base1['step_s']) * 1000:.2f} / {statistics.median(base2['step_s']) * 1000:.2f} ms)"),
            ("trainerd step", f"{med_t * 1000:.2f} ms (median)"),
            ("ratio trainerd/minimal", f"{med_t / med_b:.3f} (target <= 1.03)"),
            ("waiting for data", f"{100 * t['wait_s'] / t['loop_s']:.3f}% of step time ({t['wait_s'] * 1000:.1f} ms of "
                                 f"{t['loop_s']:.2f} s; target < 0.5%)"),
            ("same losses", "yes (bitwise)" if same else "no (nondeterministic kernels or precision)")]
    tps = statistics.median(t["tokens_per_s"]) if t["tokens_per_s"] else 0.0
    rows.append(("trainerd tokens/s", f"{tps:,.0f}"))
    if cuda:
        from trainerd.model import flops_per_token
        from trainerd.model import peak_flops
        name = torch.cuda.get_device_name()
        peak = peak_flops(torch.device("cuda"))
        from trainerd.config import load_config
        from trainerd.model import llama_config
        from shared.cache import open_cache
        c = open_cache(cache) if a.cache_dir else None
        cfg = load_config(None, {"model.preset": a.model, **({"model.hidden_size": a.hidden_size} if a.hidden_size else {}),
                                 **({"model.num_layers": a.layers} if a.layers else {})})
        lc = llama_config(cfg.model, 4096 if c is None else int(c.manifest.tokenizer["vocab_size"]), a.seq_len, 0)
        fpt = flops_per_token(lc, t["params"], a.seq_len)
        rows.append(("MFU", f"{100 * fpt * tps / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s bf16" if peak else "unknown peak for " + name))
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print()
    print("command:  python bench/bench_trainer.py " + " ".join(shlex.quote(x) for x in sys.argv[1:]))
    print("trainerd: " + " ".join(shlex.quote(x) for x in t["cmd"][1:]))
    if not a.skip_loader:
        # after the trainer, not beside it: on a small host the two would measure each other
        print("\nloader and notification latency (bench/bench_loader.py):", flush=True)
        subprocess.run([sys.executable, str(ROOT / "bench" / "bench_loader.py"), *shlex.split(a.loader_args)],
                       cwd=ROOT, check=True)


if __name__ == "__main__":
    main()
