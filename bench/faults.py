"""The fault, bad-input and security suite, run through pytest, summed up as the README's Reliability table.

    python bench/faults.py              # everything, the slow faults included (about 10-15 minutes on 2 cores)
    python bench/faults.py --quick      # the default-run part only (about 1.5 minutes)
    python bench/faults.py --seed 123   # replay the random instants of an earlier run (FAULTS_SEED)

It runs `pytest tests/faults tests/test_bad_inputs.py [--run-slow]` with FAULTS_REPORT pointing at a file the
tests append JSON records to (tests/faults/test_faults.py and tests/test_bad_inputs.py: `record(...)`), then
prints per fault: what was injected, how many times the system survived as promised (resumed from the newest
complete checkpoint, verified, ignored, refused...), and how much data was lost (documents or steps that differ
from an uninterrupted run; must be 0); the bad inputs tried and how many were handled (one Error line, non-zero
exit, nothing written); the pytest outcome, including the tests marked xfail for reported bugs. Exit status:
pytest's.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ITEMS = {
    "1": "packerd SIGKILL at random instants",
    "2": "trainerd SIGKILL at random instants (in saves, after steps, from outside)",
    "3": "packer restarted under running trainers; late and deaf subscribers; trainer after the end",
    "4": "foreign and forged messages on the endpoint",
    "5": "a flipped byte in N chunks",
    "6": "disk full while checkpointing",
    "7": "a second packer / trainer on the same cache / run",
    "8": "packerd SIGKILL mid-append to the manifest's commit log (a torn record)",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the default-run tests (no --run-slow)")
    ap.add_argument("--seed", type=int, help="FAULTS_SEED: the seed of the random instants")
    ap.add_argument("--pytest-args", default="", help="extra pytest arguments, e.g. '-k packerd'")
    a = ap.parse_args()

    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1 << 30)
    report = Path(tempfile.mkdtemp(prefix="faults-")) / "report.jsonl"
    cmd = [sys.executable, "-m", "pytest", "tests/faults", "tests/test_bad_inputs.py", "-q", "-rxXfE", "-p", "no:cacheprovider"]
    if not a.quick:
        cmd.append("--run-slow")
    cmd += shlex.split(a.pytest_args)
    env = {**os.environ, "FAULTS_REPORT": str(report), "FAULTS_SEED": str(seed)}
    print(f"$ FAULTS_SEED={seed} python {' '.join(shlex.quote(c) for c in cmd[1:])}", flush=True)
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    tail = [l for l in p.stdout.splitlines() if l.strip()]
    summary = tail[-1] if tail else "(no pytest output)"
    notes = [l for l in tail if l.startswith(("XFAIL", "XPASS", "FAILED", "ERROR"))]

    recs = [json.loads(l) for l in report.read_text().splitlines()] if report.exists() else []
    faults = [r for r in recs if r.get("kind") == "fault"]
    bad = [r for r in recs if r.get("kind") == "bad_input"]

    print()
    print(f"Reliability (FAULTS_SEED={seed}, {'quick' if a.quick else 'full'} run, {wall / 60:.1f} min)")
    print()
    print("| # | Fault | Injected | Survived | Data lost |")
    print("|---|-------|---------:|---------:|----------:|")
    tot_inj = tot_surv = 0
    lost_total, lost_unknown = 0, False
    for r in sorted(faults, key=lambda r: (r["item"], r["name"])):
        lost = r.get("data_lost")
        lost_unknown |= lost is None
        lost_total += lost or 0
        tot_inj += r.get("injected") or 0
        tot_surv += r.get("survived") or 0
        extra = ""
        if r.get("max_plan_lag_ms"):
            extra = " (plan lag max " + ", ".join(f"{k} {v / 1000:.2f} s" for k, v in r["max_plan_lag_ms"].items()) + ")"
        print(f"| {r['item']} | {r['name']}{extra} | {r.get('injected', 0)} | {r.get('survived', 0)} | "
              f"{'?' if lost is None else lost} |")
    print(f"|   | **total** | **{tot_inj}** | **{tot_surv}** | **{'?' if lost_unknown else lost_total}** |")
    print()
    by_cmd: dict[str, list[int]] = {}
    defects: dict[str, list[str]] = {}
    for r in bad:
        c = by_cmd.setdefault(r["command"], [0, 0])
        c[0] += 1
        c[1] += int(bool(r["handled"]))
        if not r["handled"]:
            defects.setdefault(r.get("defect") or "not handled", []).append(r["id"])
    print("| Bad inputs | Tried | Handled (one Error line, exit != 0, nothing written) |")
    print("|------------|------:|------:|")
    for name in sorted(by_cmd):
        print(f"| {name} | {by_cmd[name][0]} | {by_cmd[name][1]} |")
    print(f"| **total** | **{sum(v[0] for v in by_cmd.values())}** | **{sum(v[1] for v in by_cmd.values())}** |")
    print()
    for what, ids in sorted(defects.items()):
        print(f"not handled ({what}): {', '.join(ids)}")
    missing = sorted(set(ITEMS) - {r["item"] for r in faults})
    if missing:
        print("not run: " + "; ".join(f"{i} {ITEMS[i]}" for i in missing) + ("" if not a.quick else " (slow: drop --quick)"))
    where = [r for r in faults if r.get("where")]
    for r in where:
        counts: dict[str, int] = {}
        for w in r["where"]:
            key = w if isinstance(w, str) else w[0]
            counts[key] = counts.get(key, 0) + 1
        print(f"item {r['item']} kills landed: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    print(f"pytest: {summary}")
    for n in notes:
        print("  " + n)
    if p.returncode not in (0, 5):
        print(p.stdout[-6000:])
        print(p.stderr[-3000:], file=sys.stderr)
    return p.returncode


if __name__ == "__main__":
    sys.exit(main())
