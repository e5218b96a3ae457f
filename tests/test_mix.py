"""Several caches in one run (trainerd.mix): the weighted interleave, each cache's epochs, growth, ranks,
resume; and the trainer on two caches: its step records, exact resume, two ranks following two packers.
The bad inputs (weights, their count, caches that cannot be mixed) are cases of tests/test_bad_inputs.py."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, free_endpoint, records, run_packerd, run_trainerd, write_jsonl
from shared.cache import open_cache
from shared.manifest import load_manifest
from trainerd.mix import PERIOD, MixPlan, Pattern, allocate, quantize, resolve_endpoints, source_seed

WEIGHTS = [[0.75, 0.25], [0.3, 0.7], [1, 1, 1], [0.01, 0.99], [0.5, 0.2, 0.2, 0.1], [5, 0, 3], [1]]


def window_shares(src: np.ndarray, k: int, width: int = 1000) -> np.ndarray:
    """[k, n - width + 1]: each source's count in every window of `width` consecutive positions."""
    out = []
    for i in range(k):
        c = np.concatenate([[0], np.cumsum(src == i)])
        out.append(c[width:] - c[:-width])
    return np.array(out)


@pytest.mark.parametrize("weights", WEIGHTS + [list(np.random.default_rng(s).random(3) + 0.01) for s in range(5)])
def test_every_1000_consecutive_sequences_hold_each_source_within_1_percent(weights):
    n = 3 * PERIOD + 12345  # several periods and a part of one
    src = allocate(weights, n)
    share = np.asarray(weights, dtype=np.float64) / sum(weights)
    counts = window_shares(src, len(weights))
    worst = np.abs(counts - 1000 * share[:, None]).max()
    assert worst <= 10, f"a window of 1000 is {worst:.1f} sequences off its weights"
    assert worst <= len(weights) + 1  # in fact the bound of the construction
    assert np.array_equal(src, allocate(weights, n))  # a function of the weights alone


def test_the_pattern_counts_match_the_allocation_and_the_units_are_exact():
    assert quantize([0.75, 0.25]) == (3, 1) and quantize([1, 1, 1]) == (21846, 21845, 21845)
    assert quantize([2, 0]) == (1, 0) and quantize([0.3, 0.7]) == (19661, 45875)
    for weights in WEIGHTS:
        p = Pattern(quantize(weights))
        src = np.resize(p.source, 2 * p.period + 7)
        for t in (0, 1, p.period - 1, p.period, p.period + 3, 2 * p.period + 7):
            assert p.counts(t).tolist() == [int((src[:t] == i).sum()) for i in range(len(weights))]
    # draws at their ideal times (2c + 1) / 2u: source 0 at 1/6, 3/6, 5/6, source 1 at 1/2 (ties to 0)
    assert allocate([0.75, 0.25], 8).tolist() == [0, 0, 1, 0, 0, 0, 1, 0]
    assert source_seed(5, 0) == 5 and source_seed(5, 1) != source_seed(5, 2)


@pytest.fixture(scope="module")
def caches(tmp_path_factory, corpus_texts, tokenizer_dir):
    """Two real caches of seq_len 64, 16 sequences a chunk: a large one (the whole corpus) and a small one."""
    tmp = tmp_path_factory.mktemp("mix")
    out = []
    for name, texts in (("big", corpus_texts), ("small", corpus_texts[:12])):
        src = write_jsonl(tmp / f"{name}.jsonl", texts)
        run_packerd("run", "--cache-dir", tmp / name, "--source", src, "--tokenizer", tokenizer_dir,
                    "--seq-len", 64, "--chunk-sequences", 16, "--workers", 1, "--endpoint", free_endpoint(tmp))
        out.append(tmp / name)
    return out


def opened(dirs):
    return [open_cache(d) for d in dirs]


def grown(plan: MixPlan, step: int = 0) -> MixPlan:
    plan.grow_sources(step, [(len(c.chunks), c.manifest.finished, c.manifest.estimated_total_sequences())
                             for c in plan.caches])
    return plan


def stream(plan: MixPlan, steps) -> list[tuple[int, int, int]]:
    out = []
    for s in steps:
        b = plan.get_batch(s)
        assert [x[0] for x in b.seq_ids] == b.sources
        out += b.seq_ids
    return out


def sizes(cs) -> list[int]:
    return [sum(e.sequences for e in c.chunks) for c in cs]


def test_without_weights_two_caches_are_one_dataset(caches):
    cs = opened(caches)
    G = 16
    plan = grown(MixPlan(cs, seed=1, global_batch=G, rank=0, world_size=1))
    n = sizes(cs)
    assert plan.total_steps == sum(n) // G and plan.finished
    seen = stream(plan, range(plan.total_steps))
    assert len(seen) == len(set(seen)) == plan.total_steps * G   # every sequence of both at most once
    for i in (0, 1):  # each cache drawn in proportion to its size: all of it but the dropped partial batch
        assert n[i] - G <= sum(1 for x in seen if x[0] == i) <= n[i]
    assert [sum(plan.step_sources(s)) for s in range(3)] == [G] * 3


def test_weights_repeat_a_small_cache_in_new_orders_and_subsample_a_large_one(caches):
    cs = opened(caches)
    G = 20
    n = sizes(cs)
    plan = grown(MixPlan(cs, seed=2, global_batch=G, rank=0, world_size=1, weights=[0.25, 0.75], target_epochs=1))
    assert plan.total_steps == sum(n) // G
    seen = stream(plan, range(plan.total_steps))
    small = [x[1:] for x in seen if x[0] == 1]
    big = [x[1:] for x in seen if x[0] == 0]
    assert abs(len(small) - 0.75 * len(seen)) <= 2 and len(small) > 2 * n[1]
    # the small cache: each epoch every sequence once, a new order each epoch
    e0, e1 = small[:n[1]], small[n[1]:2 * n[1]]
    assert sorted(e0) == sorted(e1) and len(set(e0)) == n[1] and e0 != e1
    # the large one: a quarter of the stream, no sequence twice (a subsample of its first epoch)
    assert len(big) == len(set(big)) < n[0]
    # per step: the share of each source follows the weights to within a sequence or two
    for s in range(plan.total_steps):
        k = plan.step_sources(s)
        assert abs(k[1] - 0.75 * G) <= 2 and sum(k) == G


def test_ranks_split_every_global_batch_and_resume_gives_the_same_batches(caches):
    cs = opened(caches)
    G, W = 12, 2
    kw = {"seed": 3, "global_batch": G, "weights": [0.6, 0.4], "target_epochs": 2}
    one = grown(MixPlan(cs, rank=0, world_size=1, **kw))
    ranks = [grown(MixPlan(opened(caches), rank=r, world_size=W, **kw)) for r in range(W)]
    for s in range(0, one.total_steps, 7):
        whole = stream(one, [s])
        parts = [stream(p, [s]) for p in ranks]
        assert parts[0] == whole[0::2] and parts[1] == whole[1::2]
        b = one.get_batch(s)
        rb = ranks[1].get_batch(s)
        assert torch.equal(rb.input_ids, b.input_ids[1::2]) and torch.equal(rb.position_ids, b.position_ids[1::2])
    state = ranks[0].state_dict()
    assert state == ranks[1].state_dict()
    json.dumps(state)
    back = MixPlan(opened(caches), rank=0, world_size=1, **kw)
    back.load_state_dict(state)
    for s in (0, 5, one.total_steps - 1):
        assert stream(back, [s]) == stream(one, [s])
    with pytest.raises(ValueError, match="weights"):
        MixPlan(opened(caches), rank=0, world_size=1, **dict(kw, weights=[0.5, 0.5])).load_state_dict(state)


def test_caches_growing_on_their_own_each_sequence_once_and_the_run_waits_for_the_one_behind(caches):
    """Each cache grows at its own pace; the plan grows when any does. A step that draws positions a cache
    does not hold yet waits (its share never moves to the other); every sequence of epoch 0 once; a plan
    resumed from the state at a step in the middle gives the same batches from there on."""
    cs = opened(caches)
    G = 8
    full = [len(c.chunks) for c in cs]
    rnd = random.Random(5)
    plan = MixPlan(cs, seed=4, global_batch=G, rank=0, world_size=1, weights=[0.5, 0.5])
    known, calls, batches, step, waited = [2, 1], [], [], 0, set()
    states = {}
    def view(i):
        return (known[i], known[i] == full[i], cs[i].manifest.estimated_total_sequences())
    calls.append((0, [view(0), view(1)]))
    plan.grow_sources(0, calls[-1][1])
    while not (plan.finished and step >= plan.total_steps):
        if not plan.ready(step):
            behind = plan.waiting_for(step)
            if step < plan.total_steps:
                assert behind
                waited.update(behind)
            i = rnd.choice(behind or [0, 1])
            if known[i] == full[i]:
                i = 1 - i
            known[i] = min(full[i], known[i] + rnd.randint(1, 3))
            calls.append((step, [view(0), view(1)]))
            plan.grow_sources(step, calls[-1][1])
            continue
        if step == 9:
            states[step] = json.loads(json.dumps(plan.state_dict()))
        batches.append(stream(plan, [step]))
        step += 1
    assert waited == {0, 1}
    seen = [x for b in batches for x in b]
    n = sizes(cs)
    for i in (0, 1):  # each cache's draws: its epochs one after another, every sequence once in each
        mine = [x for x in seen if x[0] == i]
        epochs = [mine[k:k + n[i]] for k in range(0, len(mine), n[i])]
        assert all(len(set(e)) == len(e) for e in epochs)
        assert all(len(e) == n[i] for e in epochs[:-1])
    assert len(epochs) > 2  # the small cache, drawn half the time, went through several epochs
    resumed = MixPlan(opened(caches), seed=4, global_batch=G, rank=0, world_size=1, weights=[0.5, 0.5])
    resumed.load_state_dict(states[9])
    for s in range(9, len(batches)):
        for at, views in calls:
            if at == s and at > 9:
                resumed.grow_sources(s, views)
        assert stream(resumed, [s]) == batches[s]


def test_while_size_weights_move_each_rank_decodes_only_the_rows_it_draws(caches):
    """Size weights while both caches pack: every estimate change that moves a share by more than 1% starts a
    segment, after which each rank's windows hold the rows it draws under the new interleave. At every step
    each rank's batch is the single-rank batch's share, and the ranks' windows split their rows."""
    G, W = 12, 2
    cs = opened(caches)
    full = [len(c.chunks) for c in cs]
    kw = {"seed": 5, "global_batch": G, "shuffle_window": 64}
    one = MixPlan(opened(caches), rank=0, world_size=1, **kw)
    ranks = [MixPlan(opened(caches), rank=r, world_size=W, **kw) for r in range(W)]
    plans = [one, *ranks]
    known, step, compared, rnd = [1, 1], 0, 0, random.Random(7)

    def grow(at):
        views = [(known[i], known[i] == full[i], max(known[i] * 16, sizes(cs)[i] * rnd.choice([1, 2, 3]) // 2))
                 for i in (0, 1)]
        for p in plans:
            p.grow_sources(at, views)
    grow(0)
    while not (one.finished and step >= one.total_steps):
        if not one.ready(step):
            i = rnd.choice([i for i in (0, 1) if known[i] < full[i]] or [0])
            known[i] = min(full[i], known[i] + rnd.randint(1, 2))
            grow(step)
            continue
        b = one.get_batch(step)
        for r, p in enumerate(ranks):
            assert p.ready(step)
            rb = p.get_batch(step)
            assert rb.seq_ids == b.seq_ids[r::W] and torch.equal(rb.input_ids, b.input_ids[r::W])
            assert torch.equal(rb.position_ids, b.position_ids[r::W]) and torch.equal(rb.labels, b.labels[r::W])
        for i in (0, 1):
            wins = [{key[:3]: w for key, w in p.plans[i]._windows.items()} for p in plans]
            for key in set(wins[0]) & set(wins[1]) & set(wins[2]):
                whole, a, c = (len(w[key].tokens) for w in wins)
                assert a + c == whole and max(a, c) < whole
                compared += 1
        step += 1
    assert len(one.segments) > 3 and compared > 20  # the shares moved several times while windows were split


def test_two_ranks_on_growing_caches_with_windows_of_one_chunk_match_one_rank(caches):
    """While caches grow, the newest block of a source's first epoch is laid out again at every grow, so a
    window of the same chunks can come back at another place in the stream: with several ranks it then holds
    other rows (a rank keeps the rows it draws, and those follow the place), and must be built again."""
    G, W = 8, 2
    cs = opened(caches)
    full = [(len(c.chunks), c.manifest.estimated_total_sequences()) for c in cs]
    kw = {"seed": 5, "global_batch": G, "shuffle_window": 16}  # 16 sequences a chunk: one chunk a window
    one = MixPlan(opened(caches), rank=0, world_size=1, **kw)
    ranks = [MixPlan(opened(caches), rank=r, world_size=W, **kw) for r in range(W)]
    frac, step, built = 0.2, 0, 0
    while not (one.finished and step >= one.total_steps):
        views = [(max(1, int(n * frac)) if frac < 1 else n, frac >= 1, est) for n, est in full]
        for p in (one, *ranks):
            p.grow_sources(step, views)
        while step < one.total_steps and one.ready(step) and built < 9:
            b = one.get_batch(step)
            for r, p in enumerate(ranks):
                rb = p.get_batch(step)
                assert rb.seq_ids == b.seq_ids[r::W] and torch.equal(rb.input_ids, b.input_ids[r::W])
            step, built = step + 1, built + 1
        built, frac = 0, min(1.0, frac + 0.05)
    assert step == one.total_steps > 100


def test_size_weights_start_a_segment_only_when_a_share_moves_by_more_than_1_percent(caches):
    cs = opened(caches)
    plan = MixPlan(cs, seed=1, global_batch=8, rank=0, world_size=1)
    n = [len(c.chunks) for c in cs]
    plan.grow_sources(0, [(n[0], False, 100_000), (n[1], False, 100_000)])
    assert len(plan.segments) == 1
    plan.grow_sources(1, [(n[0], False, 100_000), (n[1], False, 101_000)])  # shares 0.5 -> 0.4975: 0.5% moves
    assert len(plan.segments) == 1 and plan.segments[-1][1] == quantize([1, 1])
    plan.grow_sources(2, [(n[0], False, 100_000), (n[1], False, 103_000)])  # 1.5%: a new segment
    assert len(plan.segments) == 2 and plan.segments[-1][1] == quantize([100_000, 103_000])


def test_a_step_found_ready_is_asked_again_after_any_grow(caches):
    """A grow that only raises a cache's estimate can make the newest block wait for more chunks (it needs
    what the estimate says is coming) without changing the totals or the units: a step found ready before
    it must then not be ready, whatever was asked earlier (ranks that asked at different moments agree)."""
    cs = opened(caches)
    have = lambda k: sum(e.sequences for e in cs[0].chunks[:k])  # noqa: E731 -- an estimate of what exists
    small = (len(cs[1].chunks), True, cs[1].manifest.estimated_total_sequences())
    plans = [MixPlan(cs, seed=2, global_batch=8, rank=0, world_size=1, weights=[0.5, 0.5], shuffle_window=64)
             for _ in range(2)]
    for asked, plan in zip((True, False), plans):
        plan.grow_sources(0, [(2, False, have(2)), small])
        plan.grow_sources(1, [(3, False, have(3)), small])
        last = max(s for s in range(plan.total_steps) if plan.ready(s)) if asked else None
        version = plan.version
        plan.grow_sources(1, [(3, False, have(3) + 1), small])  # one more sequence announced: a chunk to come
        assert plan.version == version  # nothing the view holds moved
    ready = [[s for s in range(p.total_steps) if p.ready(s)] for p in plans]
    assert ready[0] == ready[1] and last not in ready[0]  # the newest block now waits for its chunks


def test_a_step_asked_again_after_its_block_released_a_window_is_the_same_batch(caches):
    """A block of planned steps lets go of a source window once its steps have taken all of the window's
    rows; a step asked for again after that (a retry, out of order) is planned again, never built short."""
    kw = {"seed": 4, "global_batch": 8, "rank": 0, "world_size": 1, "weights": [0.5, 0.5], "shuffle_window": 16}
    plan, fresh = grown(MixPlan(opened(caches), **kw)), grown(MixPlan(opened(caches), **kw))
    batches = [plan.get_batch(s) for s in range(40)]  # windows of 16 rows: many released within the block
    assert plan._block.low > 0 and plan._block.first == 0  # some already released, the block still the first
    for s in (0, 13, 39, 27):
        again, other = plan.get_batch(s), fresh.get_batch(s)
        assert again.seq_ids == batches[s].seq_ids == other.seq_ids
        assert torch.equal(again.input_ids, other.input_ids) and torch.equal(again.position_ids, other.position_ids)


# -- the trainer on two caches ----------------------------------------------------------------------------
TINY = ["--model", "tiny", "--hidden-size", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2",
        "--micro-batch-size", "4", "--grad-accum", "2", "--threads", "1", "--deterministic", "--log-every", "1000"]


def test_a_new_segment_while_the_prefetcher_reads_windows_plans_the_step_again(caches, monkeypatch):
    # MixPlan.build reads windows outside its lock; a grow that starts a segment (size weights moved) swaps the
    # ranks' row filters meanwhile, and the windows then lacked rows the step drew: the thread stopped the run
    import threading

    from trainerd import data
    from trainerd.data import Prefetcher
    cs = opened(caches)
    est = [c.manifest.estimated_total_sequences() for c in cs]
    views = [(6, False, est[0]), (3, False, est[1])]
    moved = [(6, False, est[0]), (3, False, est[1] * 3)]
    plan = MixPlan(cs, seed=5, global_batch=12, rank=0, world_size=2, shuffle_window=64)
    plan.grow_sources(0, views)
    reading, go = threading.Event(), threading.Event()
    decode = data.DataPlan._decode

    def held(self, c):  # the prefetch thread's first decode waits until the grow below is done
        if threading.current_thread().name == "trainerd-prefetch" and not go.is_set():
            reading.set()
            go.wait(60)
        return decode(self, c)

    monkeypatch.setattr(data.DataPlan, "_decode", held)
    with Prefetcher(plan, start=0) as pf:
        assert reading.wait(60)
        plan.grow_sources(0, moved)  # the trainer's grow at the step boundary
        go.set()
        got = pf.get(0)
    ref = MixPlan(opened(caches), seed=5, global_batch=12, rank=0, world_size=2, shuffle_window=64)
    ref.grow_sources(0, views)
    ref.grow_sources(0, moved)
    want = ref.get_batch(0)
    assert got.seq_ids == want.seq_ids and torch.equal(got.input_ids, want.input_ids)


@pytest.mark.parametrize("G", [4, 8, 16])
def test_shares_hold_when_size_weights_move_at_almost_every_step(caches, G):
    # packers that run show estimates that move at every commit: a segment then starts at almost every step.
    # Each segment entered its pattern at its beginning, where a source of share w is first drawn after about
    # 1 / (2w) positions: segments shorter than that never drew the small cache, slightly longer ones drew it
    # too often. Over any 1,000 positions each source must stay within 1% (10 sequences) of its weights.
    cs = opened(caches)
    known = [len(c.chunks) for c in cs]
    plan = MixPlan(cs, seed=1, global_batch=G, rank=0, world_size=1)
    rng = np.random.default_rng(0)
    share, drawn = [], []
    for s in range(3000 // G + 200):
        est = [int(16 * (400 + s) * (1 + 0.03 * rng.standard_normal())), 16 * (20 + s // 20)]
        plan.grow_sources(s, [(known[0], False, est[0]), (known[1], False, est[1])])
        units = plan.segments[-1][1]
        share.append(units[1] / sum(units))
        drawn.append(plan.step_sources(s)[1])
    assert len(plan.segments) > len(drawn) // 2
    k = 1000 // G
    off = max(abs(sum(drawn[i:i + k]) - G * sum(share[i:i + k])) for i in range(len(drawn) - k))
    assert off <= 10 * G * k / 1000, f"a window of {G * k} positions is {off:.1f} sequences off its weights"


def test_a_state_saved_before_segments_kept_their_entry_place_is_resumed(caches):
    # a checkpoint of an earlier version holds segments as (first step, units, draws before): each entered its
    # pattern at the beginning, which is what a segment of this version with entry place 0 and no credit does
    plan = grown(MixPlan(opened(caches), seed=4, global_batch=8, rank=0, world_size=1))
    state = json.loads(json.dumps(plan.state_dict()))
    assert [g[3:] for g in state["segments"]] == [[0, [0.0, 0.0]]]
    state["segments"] = [g[:3] for g in state["segments"]]
    old = MixPlan(opened(caches), seed=4, global_batch=8, rank=0, world_size=1)
    old.load_state_dict(state)
    for s in (0, 5, 17):
        assert old.get_batch(s).seq_ids == plan.get_batch(s).seq_ids


def test_a_resume_with_another_target_epochs_takes_the_new_length(caches):
    # the saved total_steps was kept whatever target_epochs the resumed run asked for
    two = grown(MixPlan(opened(caches), seed=4, global_batch=8, rank=0, world_size=1, target_epochs=2))
    for target in (1, 3):
        resumed = MixPlan(opened(caches), seed=4, global_batch=8, rank=0, world_size=1, target_epochs=target)
        resumed.load_state_dict(json.loads(json.dumps(two.state_dict())))
        fresh = grown(MixPlan(opened(caches), seed=4, global_batch=8, rank=0, world_size=1, target_epochs=target))
        assert resumed.total_steps == fresh.total_steps != two.total_steps
        assert resumed.get_batch(3).seq_ids == two.get_batch(3).seq_ids


def trainerd(*args, fault=None, timeout=240) -> subprocess.CompletedProcess:
    return run_trainerd(*TINY, *args, fault=fault, timeout=timeout)


def test_a_run_on_two_weighted_caches_records_each_share_and_resumes_exactly(tmp_path, caches):
    runs = tmp_path / "runs"
    mix = ["--cache-dir", caches[0], "--cache-dir", caches[1], "--weights", "0.75,0.25", "--run-dir", runs,
           "--endpoint", f"ipc://{tmp_path}/a.sock", "--endpoint", f"ipc://{tmp_path}/b.sock", "--max-steps", 10]
    p = trainerd(*mix, "--new", "ref")
    assert p.returncode == 0, p.stderr
    ref = {r["step"]: r for r in records(runs, "ref", 1) if "event" not in r}
    assert sorted(ref) == list(range(1, 11))
    for r in ref.values():
        assert sum(r["source_sequences"]) == 8 and len(r["source_loss"]) == 2
        assert all(isinstance(x, float) for x in r["source_loss"])
    total = np.sum([r["source_sequences"] for r in ref.values()], axis=0)
    assert total.tolist() == [60, 20]  # 0.75 / 0.25 of 80 sequences
    p = trainerd(*mix, "--new", "b", "--checkpoint-every", 4, fault="kill-at-step:6")
    assert p.returncode != 0
    p = trainerd(*mix, "--resume", "b")
    assert p.returncode == 0, p.stderr
    got = {r["step"]: r for r in records(runs, "b", 2) if "event" not in r}
    assert sorted(got) == list(range(5, 11))
    for s in got:
        assert (got[s]["loss"], got[s]["source_loss"], got[s]["source_sequences"]) == \
            (ref[s]["loss"], ref[s]["source_loss"], ref[s]["source_sequences"])
    fin = lambda run, k: next(r for r in records(runs, run, k) if r.get("event") == "finished")
    assert fin("b", 2)["weights_xxh64"] == fin("ref", 1)["weights_xxh64"]
    # one cache's checkpoint cannot go on with two, nor two caches' with other weights
    p = trainerd(*mix[:-2], "--max-steps", 12, "--weights", "0.5,0.5", "--resume", "b")
    assert p.returncode == 1 and p.stderr.count("Error: ") == 1 and "weights" in p.stderr


def test_sources_tables_in_toml_are_the_same_as_the_flags(tmp_path, caches):
    from trainerd.config import load_config
    toml = tmp_path / "run.toml"
    toml.write_text(f'[[data.sources]]\ncache_dir = "{caches[0]}"\nweight = 3\n\n'
                    f'[[data.sources]]\ncache_dir = "{caches[1]}"\nweight = 1\nendpoint = "tcp://127.0.0.1:7001"\n')
    cfg = load_config(str(toml))
    assert cfg.data.cache_dir == [str(caches[0]), str(caches[1])] and cfg.data.weights == [3.0, 1.0]
    assert cfg.data.endpoint == ["", "tcp://127.0.0.1:7001"]
    flags = load_config(None, {"data.cache_dir": (str(caches[0]), str(caches[1])), "data.weights": ("3,1",)})
    assert flags.data.weights == cfg.data.weights and flags.data.cache_dir == cfg.data.cache_dir
    assert load_config(None, {"data.cache_dir": "one"}).data.cache_dir == ["one"]  # a saved one-cache config
    # the endpoint each packer recorded in its manifest, unless the flag names one
    assert resolve_endpoints(cfg.data, opened(caches)) == [(str(caches[0]), load_manifest(caches[0]).endpoint),
                                                           (str(caches[1]), "tcp://127.0.0.1:7001")]


def test_two_ranks_follow_two_growing_caches_by_the_endpoints_their_manifests_record(tmp_path, corpus_texts,
                                                                                      tokenizer_dir):
    """Two packers --follow, each its own source, cache and endpoint (recorded in its manifest); a 2-rank
    `accelerate launch` given only the two folders subscribes to both, grows its plan as either grows,
    draws every global batch from both (by size), and ends once both are finished."""
    from conftest import free_port
    from test_trainer_follow import read_jsonl, stop_group, wait_for
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}
    (tmp_path / "packer.toml").write_text("poll_seconds = 0.2\n")
    names, docs = ("a", "b"), {"a": (0, 12, 30), "b": (40, 50, 70)}
    endpoints = {n: f"ipc://{tmp_path}/{n}.sock" for n in names}  # one each: the trainer must find both

    def packer(n, follow=True):
        return subprocess.Popen([sys.executable, "-m", "packerd", "run", "--config", str(tmp_path / "packer.toml"),
                                 "--cache-dir", str(tmp_path / n), "--source", str(tmp_path / f"src-{n}"),
                                 "--tokenizer", str(tokenizer_dir), "--seq-len", "64", "--chunk-sequences", "16",
                                 "--workers", "1", "--endpoint", endpoints[n], *(["--follow"] if follow else [])],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    def chunks(n):
        m = load_manifest(tmp_path / n) if (tmp_path / n / "manifest.json").exists() else None
        return len(m.chunks) if m else 0
    procs, trainer = {}, None
    try:
        for n in names:
            (tmp_path / f"src-{n}").mkdir()
            write_jsonl(tmp_path / f"src-{n}" / "part-0.jsonl", corpus_texts[docs[n][0]:docs[n][1]])
            procs[n] = packer(n)
        for n in names:
            wait_for(lambda n=n: chunks(n), f"the first chunks of {n}", list(procs.values()))
            assert load_manifest(tmp_path / n).endpoint == endpoints[n]   # the trainer finds its packer here
        runs = tmp_path / "runs"
        trainer = subprocess.Popen(
            [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
             "--main_process_port", str(free_port()), "-m", "trainerd", "--cache-dir", str(tmp_path / "a"),
             "--cache-dir", str(tmp_path / "b"), "--run-dir", str(runs), "--new", "mix", *TINY[:-2],
             "--micro-batch-size", "2", "--log-every", "5", "--checkpoint-every", "0",
             "--set", "log.data_trace=true", "--set", "data.reconcile_seconds=30"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
        log = runs / "training_logs" / "mix_run_1.jsonl"
        events = lambda name: [r for r in read_jsonl(log) if r.get("event") == name]
        wait_for(lambda: events("waiting"), "the trainer to catch up and wait", [trainer, *procs.values()])
        for n in names:  # more data in each: announced on each cache's own endpoint
            write_jsonl(tmp_path / f"src-{n}" / ".part-1.tmp", corpus_texts[docs[n][1]:docs[n][2]])
            os.replace(tmp_path / f"src-{n}" / ".part-1.tmp", tmp_path / f"src-{n}" / "part-1.jsonl")
        wait_for(lambda: {e.get("source") for e in events("notified")} == {0, 1}, "notifications from both packers",
                 [trainer, *procs.values()])
        for n in names:
            procs[n].terminate()
            procs[n].communicate(timeout=60)
            procs[n] = packer(n, follow=False)
            procs[n].communicate(timeout=120)
            assert procs[n].returncode == 0
        out, _ = trainer.communicate(timeout=240)
        assert trainer.returncode == 0, out[-4000:]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.communicate()
        if trainer is not None:
            stop_group(trainer)
    recs = read_jsonl(log)
    steps = [r for r in recs if "event" not in r]
    G = 2 * 2 * 2
    assert steps and all(sum(r["source_sequences"]) == G for r in steps)
    assert all(x > 0 for x in np.sum([r["source_sequences"] for r in steps], axis=0))
    grown = [e for e in recs if e.get("event") == "plan_expanded"]
    assert {e["source"] for e in grown} == {0, 1} and all(e["step"] > 0 for e in grown)
    traces = [{r["step"]: [tuple(x) for x in r["seq_ids"]] for r in
               read_jsonl(runs / "training_logs" / f"mix_run_1.rank{k}.data.jsonl")} for k in (0, 1)]
    for s, ids in traces[0].items():
        assert not set(ids) & set(traces[1][s]) and {x[0] for x in ids + traces[1][s]} <= {0, 1}
    assert all(r["source_sequences"] == [sum(1 for x in traces[0][r["step"] - 1] + traces[1][r["step"] - 1] if x[0] == i)
                                         for i in (0, 1)] for r in steps)
    fin = next(r for r in recs if r.get("event") == "finished")
    assert fin["weights_xxh64"][0] == fin["weights_xxh64"][1]


def test_a_resume_after_a_cache_grew_while_stopped_is_the_same_every_time(tmp_path, caches, corpus_texts,
                                                                           tokenizer_dir):
    """Cache a is half packed (its packer stopped, not finished) when a run on a and the small cache stops at
    step 6; then a is packed to its end. Resuming that checkpoint grows the plan with a's new chunks, and
    doing it twice gives the same steps bitwise (losses, each cache's share and loss, sequences); no
    sequence of a is drawn twice over both processes."""
    a, runs = tmp_path / "a", tmp_path / "runs"
    src = tmp_path / "src"
    src.mkdir()
    half = len(corpus_texts) // 2
    write_jsonl(src / "part-0.jsonl", corpus_texts[:half])
    endpoint = free_endpoint(tmp_path)
    (tmp_path / "packer.toml").write_text("poll_seconds = 0.2\n")
    packer = subprocess.Popen([sys.executable, "-m", "packerd", "run", "--config", str(tmp_path / "packer.toml"),
                               "--cache-dir", str(a), "--source", str(src), "--tokenizer", str(tokenizer_dir),
                               "--seq-len", "64", "--chunk-sequences", "16", "--workers", "1", "--endpoint", endpoint,
                               "--follow"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        from test_trainer_follow import wait_for
        wait_for(lambda: (load_manifest(a).documents if (a / "manifest.json").exists() else 0) >= half - 1,
                 "the packer to pack the first half", [packer])
    finally:
        packer.terminate()
        packer.communicate(timeout=60)
    assert not load_manifest(a).finished
    both = ["--cache-dir", a, "--cache-dir", caches[1], "--run-dir", runs, "--keep", 0, "--set", "log.data_trace=true"]
    p = trainerd(*both, "--new", "g", "--max-steps", 6, "--checkpoint-every", 3)
    assert p.returncode == 0, p.stderr
    chunks_before = len(load_manifest(a).chunks)
    write_jsonl(src / "part-1.jsonl", corpus_texts[half:])
    run_packerd("run", "--cache-dir", a, "--workers", 1, "--endpoint", endpoint)  # packs the rest, finishes
    assert len(load_manifest(a).chunks) > chunks_before
    for _ in range(2):
        p = trainerd(*both, "--resume", "g-step00000006", "--max-steps", 14)
        assert p.returncode == 0, p.stderr
    lines = [records(runs, "g", k) for k in (1, 2, 3)]
    grown = [e for e in lines[1] if e.get("event") in ("plan", "plan_expanded") and e.get("source") == 0]
    assert grown and grown[-1]["chunks"] > chunks_before and grown[-1]["finished"]
    keep = ("loss", "source_loss", "source_sequences")
    per_step = [{r["step"]: tuple(str(r[k]) for k in keep) for r in recs if "event" not in r} for recs in lines[1:]]
    assert sorted(per_step[0]) == list(range(7, 15)) and per_step[0] == per_step[1]
    traces = []
    for k in (1, 2, 3):
        with open(runs / "training_logs" / f"g_run_{k}.rank0.data.jsonl") as f:
            traces.append({r["step"]: [tuple(x) for x in r["seq_ids"]] for r in map(json.loads, f)})
    assert traces[1] == traces[2]
    drawn_a = [x for t in (traces[0], traces[1]) for ids in t.values() for x in ids if x[0] == 0]
    # (a's first half was one shuffle window, sealed at the growth: its new chunks come after it)
    assert len(drawn_a) == len(set(drawn_a))


def test_new_size_weights_change_the_plan_even_when_no_total_moves(caches):
    """Size weights follow the caches' estimates: estimates that move the shares but not their sum start a
    new segment, and the growth says the plan changed, so batches prepared under the old shares are planned
    again (else a resume from the saved segments would give other batches)."""
    cs = opened(caches)
    plan = MixPlan(cs, seed=1, global_batch=8, rank=0, world_size=1)
    assert plan.grow_sources(0, [(2, False, 4000), (1, False, 2000)])
    before = (plan.total_steps, plan.estimated_total_steps, len(plan.segments))
    assert plan.grow_sources(0, [(2, False, 3000), (1, False, 3000)])   # the same sum, other shares
    assert (plan.total_steps, plan.estimated_total_steps) == before[:2] and len(plan.segments) == before[2]
    assert plan.segments[-1][1] != quantize([4000, 2000])
    assert not plan.grow_sources(0, [(2, False, 3000), (1, False, 3000)])  # nothing new: no change


@pytest.mark.parametrize("few", [None, 0], ids=["few-documents", "many-documents"])
@pytest.mark.parametrize("ranks", [1, 2], ids=["one-rank", "rank-1-of-2-while-packing"])
def test_every_row_of_a_mixed_batch_is_its_chunk_row_with_its_documents(caches, few, ranks, monkeypatch):
    """Each row of a mixture's batch holds the tokens of the (cache, chunk, index) it names, positions that
    restart at that row's document starts, labels masked past its real length only, and the batch counts its
    real tokens; with few document starts in a batch (one slice each) and with many (the whole-array path,
    forced here by a threshold of 0); on one rank, and on rank 1 of 2 with size weights while the caches
    still pack (windows of that rank's rows)."""
    if few is not None:
        monkeypatch.setattr("trainerd.mix.FEW_DOCUMENTS", few)
        monkeypatch.setattr("trainerd.data.FEW_DOCUMENTS", few)
    cs = opened(caches)
    G = 24
    plan = MixPlan(cs, seed=3, global_batch=G, rank=ranks - 1, world_size=ranks,
                   weights=[0.5, 0.5] if ranks == 1 else None, shuffle_window=40)
    if ranks == 1:
        grown(plan)
    else:  # not finished: size weights may still move, and each rank's windows still hold only its rows
        plan.grow_sources(0, [(len(c.chunks), False, c.manifest.estimated_total_sequences()) for c in cs])
    chunks: dict = {}
    restarts = short = 0
    for s in range(plan.total_steps):
        b = plan.get_batch(s)
        real = 0
        for r, (i, c, k) in enumerate(b.seq_ids):
            ch = chunks.get((i, c)) or chunks.setdefault((i, c), cs[i].read_chunk(c))
            n = int(ch.lengths[k])
            assert torch.equal(b.input_ids[r, :n], torch.from_numpy(ch.padded(cs[i].pad_id)[k, :n].astype(np.int32)))
            want = np.arange(64)
            for start in ch.doc_starts_of(k):
                if start > 0:
                    want[start:] = np.arange(64 - start)
                    restarts += 1
            assert b.position_ids[r].tolist() == want.tolist(), f"step {s} row {r}"
            assert (b.labels[r, n:] == -100).all() and torch.equal(b.labels[r, :n], b.input_ids[r, :n])
            short += n < 64
            real += n
        assert b.num_tokens == real and b.empty_rows == 0
    assert restarts > 50 // ranks and short >= 1  # documents ending mid-row, and a cache's short last row, were seen
    if ranks == 2:  # rank 1's windows held only its rows, though the size weights could still move
        assert all(p.row_filter for p in plan.plans)
        kept = [w.kept for p in plan.plans for w in p._windows.values()]
        assert kept and all(len(k) <= 0.75 * (k[-1] + 1) for k in kept)  # about every other row, not all


def test_the_state_of_a_size_weighted_mixture_stays_small_as_estimates_move(caches):
    """Each estimate change of a size-weighted mixture starts a segment; the state keeps those still in use,
    so it does not grow with the run, and a resume from it gives the same batches."""
    cs = opened(caches)
    G = 8
    plan = MixPlan(cs, seed=2, global_batch=G, rank=0, world_size=1)
    full = [(len(c.chunks), False, c.manifest.estimated_total_sequences()) for c in cs]
    sizes_seen = []
    for k in range(40):
        views = [(n, f, est + 16 * ((k * (i + 3)) % 7)) for i, (n, f, est) in enumerate(full)]
        plan.grow_sources(k, views)
        sizes_seen.append(len(json.dumps(plan.state_dict())))
    assert len(plan.segments) > 20                      # the shares did move, one segment each time
    assert max(sizes_seen[10:]) - min(sizes_seen[10:]) < 200
    resumed = MixPlan(cs, seed=2, global_batch=G, rank=0, world_size=1)
    resumed.load_state_dict(plan.state_dict())
    ready = [s for s in range(39, min(plan.total_steps, 60)) if plan.ready(s)]
    assert len(ready) > 5
    for s in ready:
        assert resumed.get_batch(s).seq_ids == plan.get_batch(s).seq_ids


def test_with_a_final_interleave_each_rank_decodes_only_the_rows_it_draws(caches):
    """Fixed weights: the interleave never changes, so each rank's windows of a source hold only the rows that
    rank draws (their rows split between the ranks), and every batch is still the single-rank batch's share."""
    G, W = 12, 2
    kw = {"seed": 3, "global_batch": G, "weights": [0.6, 0.4], "target_epochs": 2, "shuffle_window": 64}
    one = grown(MixPlan(opened(caches), rank=0, world_size=1, **kw))
    ranks = [grown(MixPlan(opened(caches), rank=r, world_size=W, **kw)) for r in range(W)]
    compared = 0
    for s in range(one.total_steps):
        b = one.get_batch(s)
        for r, p in enumerate(ranks):
            rb = p.get_batch(s)
            assert rb.seq_ids == b.seq_ids[r::W] and torch.equal(rb.input_ids, b.input_ids[r::W])
            assert torch.equal(rb.position_ids, b.position_ids[r::W]) and torch.equal(rb.labels, b.labels[r::W])
        for i in (0, 1):
            wins = [{key[:3]: w for key, w in p.plans[i]._windows.items()} for p in (one, *ranks)]  # key[3]: filter
            for key in set(wins[0]) & set(wins[1]) & set(wins[2]):
                whole, a, c = (len(w[key].tokens) for w in wins)
                assert a + c == whole and max(a, c) < whole
                compared += 1
    assert compared > 20
