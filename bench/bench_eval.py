"""The held-out evaluation against the same forward passes in a hand loop, in one run.

    python bench/bench_eval.py [--sequences 256] [--seq-len 1024] [--micro-batch-size 8] [--model tiny]
                               [--rounds 5] [--threads 2]

Packs a validation cache (pydoc topics with the built-in BPE, repeated until it holds --sequences
sequences of --seq-len tokens), builds the model, then times in interleaved rounds:
  1. hand loop: the same micro-batches, already as tensors, through model(...).logits and a summed
     cross-entropy under torch.no_grad (the least an evaluation can do),
  2. trainerd: Evaluator.evaluate(model), the trainer's own evaluation (its rows read once and kept, as in a
     run; the first call, which reads the chunks, is timed apart).
Prints the median of each and their ratio (target, issue 13: at most 1.05). The two losses must agree.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pack(folder: Path, sequences: int, seq_len: int) -> Path:
    import json
    import subprocess

    from shared.builtin import pydoc_documents
    docs = pydoc_documents()
    copies = 1 + sequences * seq_len // 100_000
    src = folder / "docs.jsonl"
    with open(src, "w") as f:
        for i in range(copies):
            for t in docs:
                f.write(json.dumps({"text": t}) + "\n")
    cache = folder / "val"
    subprocess.run([sys.executable, "-m", "packerd", "run", "--cache-dir", str(cache), "--source", str(src),
                    "--tokenizer", "builtin:bpe", "--seq-len", str(seq_len), "--chunk-sequences", "64",
                    "--endpoint", f"ipc://{folder}/p.sock"], check=True, capture_output=True, cwd=ROOT)
    return cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from shared.cache import open_cache
    from trainerd.config import load_config
    from trainerd.evaluate import Evaluator
    from trainerd.model import build_model
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cache = open_cache(pack(Path(tmp), a.sequences, a.seq_len))
        cfg = load_config(None, {"data.cache_dir": str(tmp), "eval.cache_dir": str(cache.dir),
                                 "eval.sequences": a.sequences, "train.micro_batch_size": a.micro_batch_size,
                                 "model.preset": a.model})
        tok = cache.manifest.tokenizer
        torch.manual_seed(0)
        model = build_model(cfg.model, tok["vocab_size"], a.seq_len, tok["eos_id"])
        ev = Evaluator(cfg, cache, rank=0, world=1, device=torch.device("cpu"), mixed="no", attention="sdpa",
                       fail=lambda msg, alone=False: sys.exit(msg))
        t0 = time.perf_counter()
        first = ev.evaluate(model)
        first_s = time.perf_counter() - t0
        batches = ev._batches(first["val_sequences"])[0]  # the very tensors, for the hand loop

        def hand() -> float:
            total = 0.0
            with torch.no_grad():
                for ids, pos, labels in batches:
                    logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
                    total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum").item()
            return total

        times = {"hand": [], "trainerd": []}
        for _ in range(a.rounds):
            t0 = time.perf_counter()
            hand_sum = hand()
            times["hand"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            r = ev.evaluate(model)
            times["trainerd"].append(time.perf_counter() - t0)
        hand_loss = hand_sum / r["val_tokens"]
        h, t = statistics.median(times["hand"]), statistics.median(times["trainerd"])
        print(f"{first['val_sequences']} sequences of {a.seq_len} tokens, model {a.model}, micro-batch "
              f"{a.micro_batch_size}, {a.threads} threads, {a.rounds} rounds (medians)")
        print(f"| | seconds |\n|---|---:|\n| hand loop | {h:.3f} |\n| trainerd Evaluator | {t:.3f} |\n"
              f"| ratio trainerd / hand | {t / h:.3f} (target <= 1.05) |\n| first evaluation (reads the chunks) | "
              f"{first_s:.3f} |")
        print(f"losses: trainerd {r['val_loss']:.6f}, hand loop {hand_loss:.6f}")


if __name__ == "__main__":
    main()
