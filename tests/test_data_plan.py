"""trainerd.data on a cache packed by the real packerd: order, growth, ranks, resume, batches, corruption."""
from __future__ import annotations

import io
import json
import logging
import math
import random
import shutil
import time

import numpy as np
import pytest
import torch

from conftest import free_endpoint, run_packerd
from shared.cache import CacheError, open_cache
import trainerd.data as data_mod
from trainerd.config import SHUFFLE_WINDOW
from trainerd.data import Prefetcher, _positions

OLD_WINDOW = 4 * 16  # the window before data.shuffle_window (4 chunks of this module's 16 sequences)


def DataPlan(*args, **kw):
    """The tests below were written for the 4-chunk window: they keep it (the new default makes one window
    of this whole small cache, which would leave their window and sealing cases untested)."""
    kw.setdefault("shuffle_window", OLD_WINDOW)
    return data_mod.DataPlan(*args, **kw)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, corpus_jsonl, tokenizer_dir):
    """One real cache for the module (seq_len 64, 16 sequences a chunk, the last sequence short)."""
    tmp = tmp_path_factory.mktemp("plan")
    cache = tmp / "cache"
    run_packerd("run", "--cache-dir", cache, "--source", corpus_jsonl, "--tokenizer", tokenizer_dir,
                "--seq-len", 64, "--chunk-sequences", 16, "--workers", 1, "--endpoint", free_endpoint(tmp))
    return cache


@pytest.fixture(scope="module")
def cache(cache_dir):
    c = open_cache(cache_dir)
    assert c.manifest.finished and len(c.chunks) >= 60
    return c


def all_seqs(cache) -> set[tuple[int, int]]:
    return {(e.id, i) for e in cache.chunks for i in range(e.sequences)}


def seqs_of(cache, known: int) -> set[tuple[int, int]]:
    return {(e.id, i) for e in cache.chunks[:known] for i in range(e.sequences)}


def simulate(plan: DataPlan, arrivals: list[int], seed: int = 0):
    """A trainer loop over a growing cache: chunks arrive (known counts in `arrivals`, then finished) at
    random steps and whenever the plan runs dry. Returns per-step seq_ids and the grow calls made."""
    rnd = random.Random(seed)
    pending = list(arrivals)
    total = len(plan.cache.chunks)
    steps, grows, step = [], [], 0
    while not (plan.finished and step >= plan.total_steps):
        early = pending and rnd.random() < 0.15
        if early or not plan.ready(step):
            if pending:
                call = (pending.pop(0), False, step)
            else:
                assert not plan.finished, "the plan ran dry with nothing left to arrive"
                call = (total, True, step)
            plan.grow(*call)
            grows.append(call)
            continue
        steps.append(plan.get_batch(step).seq_ids)
        step += 1
    return steps, grows


def replay(plan: DataPlan, grows, start: int, stop: int, apply_before=True):
    """Batches start..stop-1 of `plan`, applying the recorded grow calls at their steps."""
    out = []
    for s in range(start, stop):
        for call in grows:
            if call[2] == s:
                plan.grow(*call)
        out.append(plan.get_batch(s))
    return out


def test_one_epoch_every_sequence_once_in_a_deterministic_local_order(cache):
    G = 24
    a = DataPlan(cache, seed=7, global_batch=G, rank=0, world_size=1)
    b = DataPlan(cache, seed=7, global_batch=G, rank=0, world_size=1)
    c = DataPlan(cache, seed=8, global_batch=G, rank=0, world_size=1)
    n = sum(e.sequences for e in cache.chunks)
    assert a.total_steps == n // G and a.finished  # the last partial global batch is dropped
    order_a = [s for step in range(a.total_steps) for s in a.get_batch(step).seq_ids]
    order_b = [s for step in range(b.total_steps) for s in b.get_batch(step).seq_ids]
    order_c = [s for step in range(c.total_steps) for s in c.get_batch(step).seq_ids]
    assert order_a == order_b and order_a != order_c
    assert len(order_a) == len(set(order_a)) == n - n % G
    assert set(order_a) <= all_seqs(cache)
    # shuffled, not the cache order; but local: each chunk decompressed once, few chunks per step
    assert order_a != sorted(order_a)
    assert a.chunks_decoded <= len(cache.chunks)
    assert max(len({c for c, _ in a.get_batch(s).seq_ids}) for s in range(a.total_steps)) <= 2 * a.window_chunks
    # the sequences of one chunk are spread over its window, not read in file order
    first = [s for s in order_a if s[0] == order_a[0][0]]
    assert [i for _, i in first] != sorted(i for _, i in first)


def test_epochs_and_epoch_fraction(cache):
    n = sum(e.sequences for e in cache.chunks)
    G = 16
    plan = DataPlan(cache, seed=1, global_batch=G, rank=0, world_size=1, target_epochs=2.5)
    assert plan.total_steps == int(2.5 * n) // G
    stream = [s for step in range(plan.total_steps) for s in plan.get_batch(step).seq_ids]
    e0, e1, e2 = stream[:n], stream[n:2 * n], stream[2 * n:]
    assert set(e0) == set(e1) == all_seqs(cache) and len(set(e2)) == len(e2)
    assert e0 != e1
    assert plan.epoch_of(0) == 0 and plan.epoch_of(plan.total_steps - 1) == 2

    half = DataPlan(cache, seed=1, global_batch=G, rank=0, world_size=1, target_epochs=2, epoch_fraction=0.5)
    m = n // 2
    assert half.total_steps == 2 * m // G
    stream = [s for step in range(half.total_steps) for s in half.get_batch(step).seq_ids]
    assert len(set(stream[:m])) == m and len(set(stream[m:])) == len(stream) - m
    assert set(stream[:m]) != set(stream[m:])  # each epoch takes another random half


def test_growth_mid_epoch_every_sequence_once_and_waits_for_fresh_data(cache):
    G = 16
    plan = DataPlan(cache, seed=3, global_batch=G, rank=0, world_size=1, target_epochs=2, known_chunks=6)
    assert not plan.finished
    first_total = plan.total_steps
    # epoch 0 of an unfinished cache: ready only while its sequences exist, never a second epoch yet
    dry = sum(e.sequences for e in cache.chunks[:6]) // G
    assert plan.ready(dry - 1) and not plan.ready(dry) and dry < plan.total_steps
    arrivals = list(range(8, len(cache.chunks), 5))
    totals = []
    steps, grows = simulate(plan, arrivals, seed=1)
    assert len([g for g in grows if g[2] > 0]) >= 5  # chunks did arrive mid-epoch
    n = sum(e.sequences for e in cache.chunks)
    stream = [s for ids in steps for s in ids]
    assert len(stream) == (2 * n) // G * G
    assert set(stream[:n]) == all_seqs(cache) and len(set(stream[:n])) == n  # epoch 0: each exactly once
    assert set(stream[n:]) <= all_seqs(cache) and len(set(stream[n:])) == len(stream) - n
    # every step of epoch 0 only used chunks known when it ran
    known_at = 6
    for step, ids in enumerate(steps):
        for g in grows:
            if g[2] == step:
                known_at = max(known_at, g[0])
        if step * G < n:
            assert all(c < known_at for c, _ in ids), f"step {step} used a chunk not yet known"
    # total_steps never shrank along the way
    replay_plan = DataPlan(cache, seed=3, global_batch=G, rank=0, world_size=1, target_epochs=2, known_chunks=6)
    for call in grows:
        before = replay_plan.total_steps
        replay_plan.grow(*call)
        totals.append(replay_plan.total_steps)
        assert replay_plan.total_steps >= before
    assert first_total <= totals[0] and totals[-1] == (2 * n) // G


def test_a_plan_grown_at_step_0_equals_one_built_with_that_many_chunks(cache):
    # ranks that opened the cache at different moments agree once they grow to the broadcast count
    small = DataPlan(cache, seed=5, global_batch=8, rank=0, world_size=1, known_chunks=5)
    big = DataPlan(cache, seed=5, global_batch=8, rank=0, world_size=1, known_chunks=12)
    assert small.grow(8, False, 0) and small.grow(12, False, 0)
    assert not big.grow(12, False, 0)
    assert small.total_steps == big.total_steps
    for s in range(big.total_steps):
        assert small.get_batch(s).seq_ids == big.get_batch(s).seq_ids


def test_ranks_take_disjoint_interleaved_shares_of_the_global_batch(cache):
    G, W = 12, 2
    single = DataPlan(cache, seed=9, global_batch=G, rank=0, world_size=1, known_chunks=10)
    steps, grows = simulate(single, list(range(14, len(cache.chunks), 9)), seed=2)
    ranks = [DataPlan(cache, seed=9, global_batch=G, rank=r, world_size=W, known_chunks=10) for r in range(W)]
    per_rank = [replay(p, grows, 0, len(steps)) for p in ranks]
    for s, ids in enumerate(steps):
        r0, r1 = per_rank[0][s].seq_ids, per_rank[1][s].seq_ids
        assert len(r0) == len(r1) == G // W
        assert r0 == ids[0::2] and r1 == ids[1::2]
        assert not set(r0) & set(r1) and set(r0) | set(r1) == set(ids)
    assert ranks[0].state_dict() == ranks[1].state_dict()  # one global plan: the state is rank-independent
    with pytest.raises(ValueError, match="multiple of world_size"):
        DataPlan(cache, seed=9, global_batch=13, rank=0, world_size=2)


@pytest.mark.parametrize("k", [9, 40])
def test_resume_from_state_gives_the_same_batches_across_growth(cache, k):
    G = 8
    a = DataPlan(cache, seed=11, global_batch=G, rank=0, world_size=1, target_epochs=1.5, known_chunks=4)
    steps, grows = simulate(a, list(range(7, len(cache.chunks), 6)), seed=3)
    assert any(g[2] < k for g in grows) and any(g[2] >= k for g in grows)
    # the state a checkpoint after step k-1 holds: the grows before step k applied
    a2 = DataPlan(cache, seed=11, global_batch=G, rank=0, world_size=1, target_epochs=1.5, known_chunks=4)
    for call in grows:
        if call[2] < k:
            a2.grow(*call)
    state = a2.state_dict()
    # small: no list of sequences nor of chunks, and loadable without pickle
    assert len(json.dumps(state)) < 1000
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    # resumed on a cache that is already complete: the state, not the cache, decides the plan
    b = DataPlan(cache, seed=11, global_batch=G, rank=0, world_size=1, target_epochs=1.5)
    b.load_state_dict(state)
    assert b.chunks_decoded == 0  # nothing read to find its place
    resumed = replay(b, grows, k, len(steps))
    reference = replay(a2, grows, k, len(steps))
    for s, (x, y) in enumerate(zip(resumed, reference), start=k):
        assert x.seq_ids == steps[s]
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.position_ids, y.position_ids)
        assert torch.equal(x.labels, y.labels) and x.num_tokens == y.num_tokens
    assert b.total_steps == a.total_steps and b.finished


def test_ranks_match_one_rank_row_for_row_across_epochs(cache):
    # each rank copies only its own rows of a window; an epoch length that is not a multiple of W moves
    # the rows a rank takes at every epoch boundary
    G, W = 12, 3
    n = sum(e.sequences for e in cache.chunks)
    frac = next(f for f in (0.9, 0.8, 0.7) if int(f * n) % W)
    kw = dict(seed=13, target_epochs=2.5, epoch_fraction=frac)
    one = DataPlan(cache, global_batch=G, rank=0, world_size=1, **kw)
    ranks = [DataPlan(cache, global_batch=G, rank=r, world_size=W, **kw) for r in range(W)]
    assert one.epoch_of(one.total_steps - 1) == 2
    for s in range(one.total_steps):
        b = one.get_batch(s)
        parts = [p.get_batch(s) for p in ranks]
        for r, x in enumerate(parts):
            assert x.seq_ids == b.seq_ids[r::W], f"step {s} rank {r}"
            assert torch.equal(x.input_ids, b.input_ids[r::W]) and torch.equal(x.labels, b.labels[r::W])
            assert torch.equal(x.position_ids, b.position_ids[r::W])
        assert sum(x.num_tokens for x in parts) == b.num_tokens


def test_resume_refuses_another_layout(cache):
    state = DataPlan(cache, seed=1, global_batch=8, rank=0, world_size=2).state_dict()
    for kw, word in [(dict(global_batch=16, world_size=2, rank=1), "global batch 8 sequences"),
                     (dict(global_batch=8, world_size=2, rank=0, seed=2), "seed")]:
        kw.setdefault("seed", 1)
        with pytest.raises(ValueError, match=word):
            DataPlan(cache, **kw).load_state_dict(state)


def test_resume_with_another_number_of_ranks_and_the_same_global_batch(cache):
    # saved by 2 ranks mid-growth at step 9; resumed by 1 and by 4 ranks (micro-batch x accumulation changed
    # to keep 8 sequences a step): the same sequences at every step, disjoint across the new ranks
    G = 8
    two = [DataPlan(cache, seed=6, global_batch=G, rank=r, world_size=2, known_chunks=5) for r in (0, 1)]
    for p in two:
        p.grow(9, False, 3)
    state = two[0].state_dict()
    assert state == two[1].state_dict()
    one = DataPlan(cache, seed=6, global_batch=G, rank=0, world_size=1)
    one.load_state_dict(state)
    four = [DataPlan(cache, seed=6, global_batch=G, rank=r, world_size=4) for r in range(4)]
    for p in four:
        p.load_state_dict(state)
    for step in range(9, 9 + 6):
        ref = sorted(two[0].get_batch(step).seq_ids + two[1].get_batch(step).seq_ids)
        assert sorted(one.get_batch(step).seq_ids) == ref
        parts = [p.get_batch(step).seq_ids for p in four]
        assert sorted(x for part in parts for x in part) == ref and len(set().union(*map(set, parts))) == G


def test_resume_refuses_a_cache_rebuilt_from_other_data(cache, cache_dir, tmp_path):
    # the same sizes (seq_len, chunk sizes, sequence counts) but other contents: only the checksums tell
    import json
    import shutil
    state = DataPlan(cache, seed=1, global_batch=8, rank=0, world_size=1).state_dict()
    other = tmp_path / "cache"
    shutil.copytree(cache_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["chunks"]["checksum"][3] = "0123456789abcdef"  # (the manifest stores its chunk list by column)
    (other / "manifest.json").write_text(json.dumps(manifest))
    plan = DataPlan(open_cache(other), seed=1, global_batch=8, rank=0, world_size=1)
    with pytest.raises(ValueError, match="are not the ones this run trained on"):
        plan.load_state_dict(state)
    del state["chunks_digest"]  # a checkpoint from before the digest: the sizes are all it can check
    plan.load_state_dict(state)
    DataPlan(cache, seed=1, global_batch=8, rank=0, world_size=1).load_state_dict(
        DataPlan(cache, seed=1, global_batch=8, rank=0, world_size=1).state_dict())


@pytest.mark.parametrize("few", [128, 0])  # 0: every batch takes the vectorised path for many documents
def test_batch_positions_labels_and_padding(cache, few, monkeypatch):
    monkeypatch.setattr(data_mod, "FEW_DOCUMENTS", few)
    eos = cache.eos_id
    assert cache.pad_id == eos == 0  # the case where masking by token id would be wrong
    plan = DataPlan(cache, seed=2, global_batch=4, rank=0, world_size=1, target_epochs=2)
    last = (len(cache.chunks) - 1, cache.chunks[-1].sequences - 1)
    chunks = {e.id: cache.read_chunk(e.id) for e in cache.chunks}
    assert len(chunks[last[0]].sequence(last[1])) < cache.seq_len
    saw_short = saw_doc_start = False
    for step in range(plan.total_steps // 2):
        b = plan.get_batch(step)
        assert b.input_ids.dtype == b.position_ids.dtype == b.labels.dtype == torch.int32  # half the bytes
        assert b.input_ids.shape == (4, cache.seq_len)
        real = 0
        for row, (c, i) in enumerate(b.seq_ids):
            seq = chunks[c].sequence(i)
            n = len(seq)
            real += n
            assert b.input_ids[row, :n].tolist() == seq.tolist()
            assert b.labels[row, :n].tolist() == seq.tolist()       # EOS (id 0) keeps its label
            assert (b.labels[row, n:] == -100).all() and (b.input_ids[row, n:] == cache.pad_id).all()
            expect = np.arange(cache.seq_len)
            for s in chunks[c].doc_starts_of(i):
                expect[s:] = np.arange(cache.seq_len - s)
            assert b.position_ids[row].tolist() == expect.tolist()
            saw_short |= n < cache.seq_len
            saw_doc_start |= len(chunks[c].doc_starts_of(i)) > 0 and chunks[c].doc_starts_of(i)[0] > 0
        assert b.num_tokens == real
        assert b.num_targets == int((b.labels[:, 1:] != -100).sum())
        # a batch without padding shares one tensor for ids and labels; a padded one has its own labels
        short = any(len(chunks[c].sequence(i)) < cache.seq_len for c, i in b.seq_ids)
        assert (b.labels is b.input_ids) == (not short)
        ids, pos, labels = b.to("cpu")               # widened to what embedding and cross-entropy take
        assert ids.dtype == pos.dtype == labels.dtype == torch.long
        assert (labels is ids) == (not short) and torch.equal(labels, b.labels.long())
        assert torch.equal(ids, b.input_ids.long()) and torch.equal(pos, b.position_ids.long())
    assert saw_short and saw_doc_start


def test_positions_with_many_short_documents(cache):
    # both ways of computing positions (few documents: per stretch; many: running max) against a loop
    rng = np.random.default_rng(0)
    L = cache.seq_len
    for ndocs in (3, 40, 2000):
        rows = rng.integers(0, 64, ndocs)
        starts = rng.integers(0, L, ndocs)
        out = np.empty((64, L), dtype=np.uint16)
        _positions(out, rows, starts)
        for r in range(64):
            expect = np.arange(L)
            for s in sorted(set(starts[rows == r].tolist())):
                expect[s:] = np.arange(L - s)
            assert out[r].tolist() == expect.tolist(), (ndocs, r)


def test_a_corrupt_chunk_is_skipped_loudly_and_never_trained_on(tmp_path, cache_dir, caplog):
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    c = open_cache(copy)
    bad = 5
    p = copy / c.chunks[bad].file
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x10
    p.write_bytes(bytes(data))
    G, W = 8, 2
    plans = [DataPlan(open_cache(copy), seed=4, global_batch=G, rank=r, world_size=W) for r in range(W)]
    with caplog.at_level(logging.WARNING, logger="trainerd.data"):
        batches = [[pl.get_batch(s) for s in range(pl.total_steps)] for pl in plans]
    assert len(batches[0]) == len(batches[1]) == plans[0].total_steps  # ranks stay in step
    used = [s for rank in batches for b in rank for s in b.seq_ids]
    assert all(b.input_ids.shape == (G // W, c.seq_len) for rank in batches for b in rank)
    assert not any(ch == bad for ch, _ in used), "a row of the corrupt chunk was trained on"
    assert not p.exists() and list((copy / "quarantine").glob(p.name + ".*"))
    assert any("chunk 5 is corrupt" in r.getMessage() for r in caplog.records)
    events = plans[0].take_events() + plans[1].take_events()
    assert events and all(e["event"] == "corrupt_chunk" and e["chunk_id"] == bad for e in events)
    assert plans[0].take_events() == []
    # its rows became padding rows: no real token, ignored by the loss and the token count; nothing else
    # was trained twice to fill in, and every other sequence exactly once
    n_bad = c.chunks[bad].sequences
    assert used.count((-1, -1)) == n_bad
    real = [x for x in used if x != (-1, -1)]
    assert len(real) == len(set(real)) == plans[0].total_steps * G - n_bad
    L = c.seq_len
    for rank in batches:
        for b in rank:
            pads = [row for row, x in enumerate(b.seq_ids) if x == (-1, -1)]
            assert b.empty_rows == len(pads)
            lengths = [int((b.labels[row] != -100).sum()) for row in range(len(b.seq_ids))]
            assert b.num_tokens == sum(lengths)
            assert b.num_targets == int((b.labels[:, 1:] != -100).sum())
            for row in pads:
                assert lengths[row] == 0 and b.input_ids[row].eq(c.pad_id).all()
                assert b.position_ids[row].tolist() == list(range(L))


def test_prefetcher_returns_the_plan_batches_and_leaves_global_rng_alone(cache):
    G = 8
    ref = DataPlan(cache, seed=6, global_batch=G, rank=0, world_size=1, known_chunks=10)
    steps, grows = simulate(ref, list(range(12, len(cache.chunks), 7)), seed=4)
    expected = replay(DataPlan(cache, seed=6, global_batch=G, rank=0, world_size=1, known_chunks=10), grows, 0, len(steps))

    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    rng_before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    plan = DataPlan(cache, seed=6, global_batch=G, rank=0, world_size=1, known_chunks=10)
    with Prefetcher(plan, depth=3, start=0) as pf:
        got = []
        for s in range(len(steps)):
            if s % 10 == 0:  # let the thread build ahead, so that a grow must void prepared batches
                deadline = time.monotonic() + 5
                while len(pf._ready) < sum(plan.ready(s + j) for j in range(3)) and time.monotonic() < deadline:
                    time.sleep(0.005)
            for call in grows:
                if call[2] == s:
                    plan.grow(*call)
            got.append(pf.get(s))
        assert pf.waited_seconds >= 0.0
        with pytest.raises(ValueError, match="not in the plan"):
            pf.get(len(steps) + 5)
    for s, (x, y) in enumerate(zip(got, expected)):
        assert x.seq_ids == y.seq_ids, f"step {s}"
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.position_ids, y.position_ids)
        assert torch.equal(x.labels, y.labels)
    assert random.getstate() == rng_before[0]
    assert np.array_equal(np.random.get_state()[1], rng_before[1])
    assert torch.equal(torch.get_rng_state(), rng_before[2])


def test_prefetcher_waits_again_when_a_grow_lands_between_its_ready_check_and_its_build(cache):
    # The trainer grows the plan on its own thread. A grow that raises the estimate alone asks the newest block
    # for more chunks, so a step found ready can wait again; when that grow lands between the prefetch
    # thread's ready() and its build(), the thread must go back to waiting, not hand the trainer an error.
    G, W = 8, 8 * 16
    seqs = lambda k: sum(e.sequences for e in cache.chunks[:k])

    class GrowsBeforeBuild(data_mod.DataPlan):
        flip = None

        def build(self, step):
            if step == 2 and self.flip is not None:
                flip, self.flip = self.flip, None
                flip()  # the trainer's grow, just after the thread found step 2 ready
            return super().build(step)

    kw = dict(seed=0, global_batch=G, rank=0, world_size=1, shuffle_window=W, known_chunks=0, finished=False)
    plan = GrowsBeforeBuild(cache, **kw)
    plan.grow(1, False, 0, est_total_sequences=seqs(1))
    with Prefetcher(plan, depth=1, start=0) as pf:
        pf.get(0)
        pf.get(1)
        plan.flip = lambda: plan.grow(2, False, 2, est_total_sequences=seqs(2) + 10_000)
        plan.grow(2, False, 2, est_total_sequences=seqs(2))  # a chunk arrives: step 2 is ready
        deadline = time.monotonic() + 60  # ends a hung wait only
        while plan.flip is not None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert plan.flip is None and not plan.ready(2)  # the estimate rose: step 2 waits for another chunk
        plan.grow(3, False, 2, est_total_sequences=seqs(3) + 10_000)
        assert plan.ready(2)
        got = pf.get(2)
        assert pf._thread.is_alive()
    ref = data_mod.DataPlan(cache, **kw)
    ref.grow(1, False, 0, est_total_sequences=seqs(1))
    ref.get_batch(0), ref.get_batch(1)
    for known, est in ((2, seqs(2)), (2, seqs(2) + 10_000), (3, seqs(3) + 10_000)):
        ref.grow(known, False, 2, est_total_sequences=est)
    want = ref.get_batch(2)
    assert got.seq_ids == want.seq_ids and torch.equal(got.input_ids, want.input_ids)


def test_prefetcher_after_a_resume_starts_at_the_resumed_step(cache):
    # a resumed run asks for step k first: nothing of steps 0..k-1 may be decoded or assembled
    G, k = 8, 30
    ref = DataPlan(cache, seed=12, global_batch=G, rank=0, world_size=1)
    state = ref.state_dict()
    expected = [ref.get_batch(s) for s in range(k, k + 3)]
    assert {c for c, _ in expected[0].seq_ids}.isdisjoint(c for c, _ in ref.get_batch(0).seq_ids)

    resumed = DataPlan(cache, seed=12, global_batch=G, rank=0, world_size=1)
    resumed.load_state_dict(state)
    with Prefetcher(resumed, depth=3) as pf:  # not told the step: it must want nothing before the first get()
        with pf._cv:                          # (holding its lock also keeps its thread from building meanwhile)
            assert pf._wanted() is None and pf.batches_built == 0
        got = [pf.get(s) for s in range(k, k + 3)]
        assert pf.first_step_built == k and resumed.chunks_decoded > 0
    told = DataPlan(cache, seed=12, global_batch=G, rank=0, world_size=1)
    told.load_state_dict(state)
    with Prefetcher(told, depth=3, start=k) as pf:  # told the resumed step: the first it builds is that one
        got_told = [pf.get(s) for s in range(k, k + 3)]
        assert pf.first_step_built == k
    for x, y, z in zip(got, got_told, expected):
        assert x.seq_ids == y.seq_ids == z.seq_ids
        assert torch.equal(x.input_ids, z.input_ids) and torch.equal(y.position_ids, z.position_ids)


def test_estimated_total_steps_from_the_full_dataset_estimate(cache):
    n = sum(e.sequences for e in cache.chunks)
    plan = DataPlan(cache, seed=1, global_batch=8, rank=0, world_size=1, target_epochs=2, epoch_fraction=0.5,
                    known_chunks=10)
    assert plan.estimated_total_steps == int(2 * (n // 2)) // 8 > plan.total_steps
    assert plan.grow(10, False, 0, est_total_sequences=3 * n)  # rank 0's broadcast estimate wins
    assert plan.estimated_total_steps == int(2 * (3 * n // 2)) // 8
    plan.grow(len(cache.chunks), True, 0)
    assert plan.estimated_total_steps == plan.total_steps == (2 * (n // 2)) // 8


def test_batches_stay_intact_while_referenced(cache):
    # batch arrays are recycled only once nothing refers to them: a kept view must not change
    plan = DataPlan(cache, seed=3, global_batch=8, rank=0, world_size=1)
    first = plan.get_batch(0)
    view = first.input_ids[:, 1:]        # only a view of the tensor is kept
    saved = view.clone()
    del first
    for s in range(1, 40):
        plan.get_batch(s)                # dropped at once: these recycle their arrays
    assert torch.equal(view, saved)
    again = DataPlan(cache, seed=3, global_batch=8, rank=0, world_size=1).get_batch(0)
    assert torch.equal(again.input_ids[:, 1:], saved)


@pytest.mark.parametrize("fractions", [dict(epoch_fraction=0.5), dict(target_epochs=0.5)], ids=["epoch_fraction", "target_epochs"])
def test_a_fraction_of_a_growing_cache_samples_every_chunk_alike(cache, fractions):
    """Half an epoch over a cache whose chunks arrive one at a time: every chunk gives its share (half its
    rows, give or take one), however late it arrived. Taking the first half of an order that each arrival
    reshuffles trained 216 of the first quarter's 240 sequences and 27 of the last quarter's."""
    G, total = 8, len(cache.chunks)
    sizes = [e.sequences for e in cache.chunks]
    plan = DataPlan(cache, seed=4, global_batch=G, rank=0, world_size=1, known_chunks=1, **fractions)
    steps, grows = simulate(plan, list(range(2, total)), seed=2)
    assert len([g for g in grows if g[2] > 0]) > total // 2          # most chunks arrived mid-epoch
    stream = [s for ids in steps for s in ids]
    n = sum(sizes)
    assert len(stream) == (n // 2) // G * G and len(set(stream)) == len(stream)
    per_chunk = [0] * total
    for c, _ in stream:
        per_chunk[c] += 1
    # the dropped last partial batch (fewer than G rows) is the only shortfall from each chunk's share
    shares = [math.floor(0.5 * sum(sizes[:c + 1])) - math.floor(0.5 * sum(sizes[:c])) for c in range(total)]
    assert sum(shares) - len(stream) < G and all(0 <= shares[c] - per_chunk[c] for c in range(total))
    quarter = total // 4
    first, last = sum(per_chunk[:quarter]), sum(per_chunk[-quarter:])
    assert abs(first - last) <= G + 2, (first, last)
    # two ranks over the same arrivals: disjoint, and together the one-rank stream
    ranks = [DataPlan(cache, seed=4, global_batch=G, rank=r, world_size=2, known_chunks=1, **fractions) for r in (0, 1)]
    both = [replay(p, grows, 0, len(steps)) for p in ranks]
    for s in range(len(steps)):
        got = both[0][s].seq_ids + both[1][s].seq_ids
        assert sorted(got) == sorted(steps[s]) and not set(both[0][s].seq_ids) & set(both[1][s].seq_ids)


def test_resume_keeps_a_fraction_below_one_epoch(cache):
    state = DataPlan(cache, seed=1, global_batch=8, rank=0, world_size=1, target_epochs=0.5).state_dict()
    with pytest.raises(ValueError, match="target_epochs 0.5, this run has 1.0"):
        DataPlan(cache, seed=1, global_batch=8, rank=0, world_size=1, target_epochs=1).load_state_dict(state)
    again = DataPlan(cache, seed=1, global_batch=8, rank=0, world_size=1, target_epochs=0.5)
    again.load_state_dict(state)
    # target_epochs may grow past 1 (a longer run) only when it was not below 1
    state = DataPlan(cache, seed=1, global_batch=8, rank=0, world_size=1, target_epochs=1).state_dict()
    DataPlan(cache, seed=1, global_batch=8, rank=0, world_size=1, target_epochs=3).load_state_dict(state)
    # a state from before per-chunk sampling resumes only where it did not sample (fraction 1)
    old = DataPlan(cache, seed=1, global_batch=8, rank=0, world_size=1, epoch_fraction=0.5).state_dict()
    del old["sample_format"]
    with pytest.raises(ValueError, match="older trainerd"):
        DataPlan(cache, seed=1, global_batch=8, rank=0, world_size=1, epoch_fraction=0.5).load_state_dict(old)


def test_a_cache_of_corrupt_chunks_only_is_one_error(tmp_path, cache_dir):
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    c = open_cache(copy)
    for e in c.chunks[:6]:
        p = copy / e.file
        data = bytearray(p.read_bytes())
        data[-1] ^= 0x01
        p.write_bytes(bytes(data))
    plan = DataPlan(open_cache(copy), seed=4, global_batch=8, rank=0, world_size=1, known_chunks=6)
    with pytest.raises(CacheError, match="every chunk of .* is corrupt; nothing to train on"):
        plan.get_batch(0)


def test_a_chunk_quarantined_by_another_rank_reports_where_it_went(tmp_path, cache_dir):
    # two ranks meet the same corrupt chunk: the second finds the file moved already, and its event must
    # still say where it went (the run log keeps whichever rank's event came first)
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    rank0, rank1 = open_cache(copy), open_cache(copy)
    where = rank0.quarantine(3)
    assert where is not None and where.parent.name == "quarantine" and where.exists()
    assert rank1.quarantine(3) == where


def test_the_shuffle_window_is_a_number_of_sequences_in_whole_chunks(cache):
    """data.shuffle_window counts sequences; an epoch's order is cut into windows of whole chunks holding at
    least that many (and fewer than twice), so a batch draws from about that many sequences' chunks."""
    G = 32
    n = sum(e.sequences for e in cache.chunks)
    for window, chunks in ((1, 1), (16, 1), (17, 2), (40, 3), (OLD_WINDOW, 4)):
        plan = DataPlan(cache, seed=2, global_batch=G, rank=0, world_size=1, shuffle_window=window)
        assert plan.window_chunks == chunks
        per_step = [{c for c, _ in plan.get_batch(s).seq_ids} for s in range(plan.total_steps)]
        spans = -(-G // (16 * chunks)) + 1  # the windows a batch can span
        lay = plan._layout(0, 0)
        sizes = [b - a for a, b in zip(lay.bounds, lay.bounds[1:])]  # chunks of each window
        assert min(sizes) >= chunks and max(sizes) < 2 * chunks  # at least the window, fewer than twice it
        assert max(len(x) for x in per_step) <= spans * (2 * chunks - 1)
    # the default: this whole small cache is one window; a batch of 32 draws from many chunks, every
    # sequence still once and every chunk still decoded once in the epoch
    plan = data_mod.DataPlan(cache, seed=2, global_batch=G, rank=0, world_size=1)
    assert plan.shuffle_window == SHUFFLE_WINDOW and plan.window_chunks == SHUFFLE_WINDOW // 16
    batches = [plan.get_batch(s).seq_ids for s in range(plan.total_steps)]
    stream = [x for b in batches for x in b]
    assert len(stream) == len(set(stream)) == n - n % G
    assert min(len({c for c, _ in b}) for b in batches) >= 16
    assert plan.chunks_decoded == len(cache.chunks)
    with pytest.raises(ValueError, match="shuffle_window"):
        DataPlan(cache, seed=2, global_batch=G, rank=0, world_size=1, shuffle_window=0)


def test_a_window_larger_than_the_cache_still_trains_while_the_cache_grows(cache):
    """The default window is far larger than the first chunks: training starts on what exists (the window
    in use is sealed as it is at each growth), every sequence of epoch 0 once, in step with 2 ranks."""
    G = 16
    plan = data_mod.DataPlan(cache, seed=21, global_batch=G, rank=0, world_size=1, known_chunks=3)
    assert plan.ready(0) and plan.window_chunks > len(cache.chunks)
    steps, grows = simulate(plan, list(range(5, len(cache.chunks), 7)), seed=4)
    stream = [x for b in steps for x in b]
    n = sum(e.sequences for e in cache.chunks)
    assert len(stream) == len(set(stream)) == n - n % G
    ranks = [data_mod.DataPlan(cache, seed=21, global_batch=G, rank=r, world_size=2, known_chunks=3) for r in (0, 1)]
    per_rank = [replay(p, grows, 0, len(steps)) for p in ranks]
    for s, ids in enumerate(steps):
        assert per_rank[0][s].seq_ids == ids[0::2] and per_rank[1][s].seq_ids == ids[1::2]


def test_resume_keeps_the_shuffle_window(cache):
    """The window decides the order of the epoch in progress: a resume with another one is refused, naming
    the flag and the value to give; a value that makes the same whole chunks is the same order."""
    a = DataPlan(cache, seed=3, global_batch=8, rank=0, world_size=1, known_chunks=9)
    a.grow(20, False, 5)
    state = a.state_dict()
    assert state["shuffle_window"] == OLD_WINDOW and state["window_chunks"] == 4
    with pytest.raises(ValueError, match=f"--shuffle-window {OLD_WINDOW} "):
        data_mod.DataPlan(cache, seed=3, global_batch=8, rank=0, world_size=1).load_state_dict(state)
    same = DataPlan(cache, seed=3, global_batch=8, rank=0, world_size=1, shuffle_window=OLD_WINDOW - 5)
    same.load_state_dict(state)
    for s in range(5, 12):
        assert same.get_batch(s).seq_ids == a.get_batch(s).seq_ids


def keep_up(plan: DataPlan, total: int) -> list[list[tuple]]:
    """A trainer as fast as its packer: one chunk arrives each time the plan has nothing to train on."""
    steps, step, known = [], 0, plan.known_chunks
    while not (plan.finished and step >= plan.total_steps):
        if not plan.ready(step):
            known = min(total, known + 1)
            plan.grow(known, known == total, step)
            continue
        steps.append(plan.get_batch(step).seq_ids)
        step += 1
    return steps


def chunks_per_batch(steps) -> float:
    return sum(len({c for c, _ in ids}) for ids in steps) / len(steps)


def test_a_trainer_that_keeps_up_still_draws_each_batch_from_a_whole_window(cache):
    """Chunks arriving one at a time, each as the trainer runs dry: batches still come from a whole window
    of chunks (past the first small blocks), as on the finished cache, and every sequence once."""
    G, n_chunks = 16, len(cache.chunks)
    finished = DataPlan(cache, seed=4, global_batch=G, rank=0, world_size=1)
    reference = chunks_per_batch([finished.get_batch(s).seq_ids for s in range(finished.total_steps)])
    plan = DataPlan(cache, seed=4, global_batch=G, rank=0, world_size=1, known_chunks=1, finished=False)
    steps = keep_up(plan, n_chunks)
    stream = [x for ids in steps for x in ids]
    n = sum(e.sequences for e in cache.chunks)
    assert len(stream) == len(set(stream)) == n - n % G
    # blocks of 1, 2 and 4 chunks start it; from the 8th chunk on every block holds a whole window
    later = steps[8 * 16 // G:]
    assert reference > 3.5 and chunks_per_batch(later) >= 0.9 * min(reference, plan.window_chunks)
    assert chunks_per_batch(steps[:1]) == 1  # training started on the first chunk


def test_the_newest_block_waits_for_the_chunks_it_needs_unless_no_more_are_coming(cache):
    G = 16  # one chunk of 16 sequences a step
    plan = DataPlan(cache, seed=4, global_batch=G, rank=0, world_size=1, known_chunks=1, finished=False)
    assert plan.ready(0) and not plan.ready(1)
    plan.grow(2, False, 1)           # block 1 ([1, 2)) needs 2 chunks: its sequences exist, but not yet
    assert plan.known_sequences >= 2 * G and not plan.ready(1)
    plan.grow(3, False, 1)           # not begun: it takes the new chunk in
    assert plan.ready(1) and plan.ready(2) and not plan.ready(3)
    plan.grow(4, False, 3)           # block 2 ([3, 4)) needs 4 chunks ...
    assert not plan.ready(3)
    known = sum(e.sequences for e in cache.chunks[:4])
    plan.grow(4, False, 3, est_total_sequences=known)  # ... unless the estimate says none is coming
    assert plan.ready(3)
    plan.grow(4, True, 3)
    assert plan.ready(3) and plan.finished


def test_the_data_state_stays_small_however_often_the_cache_grew(cache):
    G = 16
    plan = DataPlan(cache, seed=4, global_batch=G, rank=0, world_size=1, known_chunks=1, finished=False)
    sizes, grows, resumed = [], [], None
    step, known = 0, 1
    while known < len(cache.chunks):
        if plan.ready(step):
            step += 1
            continue
        known += 1
        plan.grow(known, False, step)
        sizes.append(len(json.dumps(plan.state_dict())))
        if resumed is not None:
            grows.append((known, False, step))
        elif known == len(cache.chunks) // 2:  # a checkpoint half way, resumed
            resumed, at = DataPlan(cache, seed=4, global_batch=G, rank=0, world_size=1), step
            resumed.load_state_dict(plan.state_dict())
    assert len(sizes) > 50 and max(sizes) < 1000 and max(sizes) - min(sizes) < 100
    plan.grow(known, True, step)
    grows.append((known, True, step))
    # the resumed plan, given the same grows at the same steps, gives the batches the plan gave
    assert plan.total_steps - at > 10
    for s in range(at, plan.total_steps):
        for g in grows:
            if g[2] == s:
                resumed.grow(*g)
        assert resumed.get_batch(s).seq_ids == plan.get_batch(s).seq_ids


def legacy_position(cache, seed, order0, bounds, o, epoch=0):
    """(chunk, index) at offset o of `epoch` under a format-1 state: `order0` cut at `bounds`, each window's
    rows permuted by (seed, epoch, window kind, its first chunk): written out here as that format defined it."""
    sizes = [cache.chunks[c].sequences for c in order0]
    win_pos = [sum(sizes[:b]) for b in bounds]
    w = max(i for i, p in enumerate(win_pos[:-1]) if p <= o)
    perm = data_mod._rng(seed, epoch, data_mod._WINDOW, int(order0[bounds[w]])).permutation(win_pos[w + 1] - win_pos[w])
    r = int(perm[o - win_pos[w]])
    for c in order0[bounds[w]:bounds[w + 1]]:
        if r < cache.chunks[c].sequences:
            return (int(c), r)
        r -= cache.chunks[c].sequences


def test_a_format_1_state_resumes_in_its_own_order(cache):
    """A checkpoint written before epoch 0 was kept in blocks (its state holds the whole chunk order and
    its seal points) resumes in the order it had, and chunks that arrive after it follow it."""
    G, seed, known = 8, 5, 20
    order0 = np.random.default_rng(0).permutation(known)
    seals0 = [0, 6]
    seqs = sum(e.sequences for e in cache.chunks[:known])
    state = {"format": 1, "seed": seed, "global_batch": G, "world_size": 1, "window_chunks": 3,
             "shuffle_window": 48, "target_epochs": 1.0, "epoch_fraction": 1.0, "sample_format": 2,
             "known_chunks": known, "known_sequences": seqs, "finished": False,
             "est_total_sequences": sum(e.sequences for e in cache.chunks), "total_steps": seqs // G, "step": 5,
             "order0": order0.tolist(), "seals0": seals0, "events": [{"step": 5, "known_chunks": known}]}
    plan = DataPlan(cache, seed=seed, global_batch=G, rank=0, world_size=1, shuffle_window=48)
    plan.load_state_dict(state)
    bounds = [0, 3, 6, 9, 12, 15, 18, 20]  # 3 chunks from each seal point
    k = 7
    got = [x for s in range(k, seqs // G) for x in plan.get_batch(s).seq_ids]
    assert got == [legacy_position(cache, seed, order0, bounds, o) for o in range(k * G, seqs // G * G)]
    # the rest of the cache arrives: epoch 0 ends with it, every sequence once
    plan.grow(len(cache.chunks), True, seqs // G)
    before = [legacy_position(cache, seed, order0, bounds, o) for o in range(k * G)]
    stream = before + got + [x for s in range(seqs // G, plan.total_steps) for x in plan.get_batch(s).seq_ids]
    n = sum(e.sequences for e in cache.chunks)
    assert len(stream) == len(set(stream)) == n - n % G
    assert len(json.dumps(plan.state_dict())) < len(json.dumps(state))  # the old order is gone once trained
    # a later epoch is cut as format 1 cut it: windows of 3 chunks from the start of its order, the last short
    two = DataPlan(cache, seed=seed, global_batch=G, rank=0, world_size=1, target_epochs=2, shuffle_window=48)
    two.load_state_dict({**state, "target_epochs": 2.0})
    two.grow(len(cache.chunks), True, seqs // G)
    N = len(cache.chunks)
    order1 = data_mod._rng(seed, 1, data_mod._ORDER, 0).permutation(N)
    assert N % 3  # else even windows would be these too
    bounds1 = [*range(0, N, 3), N]
    first = -(-n // G)  # the first step wholly in epoch 1
    got1 = [x for s in range(first, two.total_steps) for x in two.get_batch(s).seq_ids]
    assert got1 == [legacy_position(cache, seed, order1, bounds1, o - n, epoch=1) for o in range(first * G, two.total_steps * G)]
    # saved again in epoch 1 (format 2, the old order no longer in use) and resumed: still format 1's cut
    two.grow(len(cache.chunks), True, first)
    again = two.state_dict()
    assert "legacy_order" not in again and again["cut"] == "legacy"
    three = DataPlan(cache, seed=seed, global_batch=G, rank=0, world_size=1, target_epochs=2, shuffle_window=48)
    three.load_state_dict(again)
    assert [x for s in range(first, two.total_steps) for x in three.get_batch(s).seq_ids] == got1
