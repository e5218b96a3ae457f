"""trainerd.follow against a real packerd in follow mode and a raw ZeroMQ PUB socket."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from conftest import ROOT, free_endpoint, run_packerd, write_jsonl
from shared.manifest import ChunkEntry, Manifest, ManifestWriter, load_manifest
from shared.protocol import PROTOCOL_VERSION, encode
from trainerd.follow import CacheFollower, FollowState


def poll_until(followers, pred, what, timeout=90.0):
    """Poll every follower until pred(states) holds; returns the events each one produced."""
    events = [[] for _ in followers]
    states = [None] * len(followers)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for k, f in enumerate(followers):
            states[k] = f.poll(50)
            events[k] += states[k].events
        if pred(states):
            return states, events
    raise AssertionError(f"timed out waiting for {what}: {states}")


def add_file(folder, name, texts):
    # written elsewhere and renamed in, so the packer never sees half a file
    tmp = write_jsonl(folder.parent / f".{name}", texts)
    os.replace(tmp, folder / name)


def test_followers_see_a_following_packerd_grow(tmp_path, corpus_texts, tokenizer_dir):
    src = tmp_path / "src"
    src.mkdir()
    add_file(src, "a.jsonl", corpus_texts[:20])
    cache = tmp_path / "cache"
    endpoint = free_endpoint(tmp_path)
    # one follower hears the packer (its timer is off: only notifications and gaps make it read);
    # one listens where nobody publishes and keeps up by its reconcile timer alone
    heard = CacheFollower(cache, endpoint, reconcile_seconds=1e6)
    deaf = CacheFollower(cache, f"ipc://{tmp_path}/nobody.sock", reconcile_seconds=0.3)
    assert heard.poll().known_chunks == 0  # no manifest yet: nothing known, no error
    proc = subprocess.Popen([sys.executable, "-m", "packerd", "run", "--cache-dir", str(cache), "--source", str(src),
                             "--tokenizer", str(tokenizer_dir), "--seq-len", "64", "--chunk-sequences", "16",
                             "--workers", "1", "--follow", "--endpoint", endpoint],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        def settled(states):
            m = load_manifest(cache) if (cache / "manifest.json").exists() else None
            return m is not None and m.documents >= 19 and all(s.known_chunks == len(m.chunks) for s in states)
        states, events = poll_until([heard, deaf], settled, "the first file")
        first = states[0].known_chunks
        assert first > 0 and not states[0].finished and states[0].est_total_sequences > 0
        seen, offset = heard.manifest, heard.cache.log.offset
        # a follower that joins now knows every committed chunk from its first read, without any message
        late = CacheFollower(cache, endpoint, reconcile_seconds=1e6)
        assert late.poll().known_chunks == first
        late.close()

        add_file(src, "b.jsonl", corpus_texts[20:40])

        heard_of: set[int] = set()

        def grew(states):
            # chunks committed back to back can be known from the manifest read that the first one's message
            # prompted before the next message is taken: wait for every message too, not only the count
            heard_of.update(e["chunk_id"] for e in states[0].events if e["event"] == "notified")
            m = load_manifest(cache)
            return (m.documents >= 39 and all(s.known_chunks == len(m.chunks) for s in states)
                    and heard_of >= set(range(first, len(m.chunks))))
        states, later = poll_until([heard, deaf], grew, "the second file")
        final = states[0].known_chunks
        assert states[1].known_chunks == final > first
        # the growth was read from the commit log's new records into the same manifest, not by reading the
        # whole manifest again (whose cost grows with the cache)
        assert heard.manifest is seen and heard.cache.log.offset > offset
        # the growth reached `heard` through notifications of the new chunks, each with its latency
        notified = [e for e in later[0] if e["event"] == "notified"]
        assert {e["chunk_id"] for e in notified} >= set(range(first, final))
        assert all(e["latency_ms"] >= 0 for e in notified)
        assert not [e for e in events[0] + later[0] if e.get("reason") == "timer"]
        # `deaf` never heard a message and still lost nothing
        assert not [e for e in events[1] + later[1] if e["event"] == "notified"]
        assert [e for e in later[1] if e["event"] == "reconciled" and e["reason"] == "timer"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        heard.close()
        deaf.close()


def write_manifest(folder, chunks: int, finished: bool = False) -> None:
    m = Manifest(seq_len=64, chunk_sequences=16, dtype="uint16",
                 tokenizer={"name": "t", "vocab_hash": "0", "vocab_size": 512, "eos_id": 0, "pad_id": 0},
                 sources=["x"], finished=finished, estimate={"tokens": 64 * 16 * 100, "sequences": 1600, "method": "test"})
    m.chunks = [ChunkEntry(id=i, sequences=16, tokens=1024, bytes=100, checksum="0" * 16, start=[i, 0],
                           end=[i + 1, 0], documents=1, committed_at=time.time()) for i in range(chunks)]
    m.save(folder)


def test_garbage_and_gaps_on_the_socket(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    write_manifest(cache, 3)
    endpoint = free_endpoint(tmp_path)
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(endpoint)
    follower = CacheFollower(cache, endpoint, reconcile_seconds=1e6)
    try:
        start = follower.poll()
        assert isinstance(start, FollowState) and start.known_chunks == 3 and start.est_total_sequences == 1600
        assert [e["reason"] for e in start.events if e["event"] == "reconciled"] == ["start"]

        garbage = [b"\x00\xffnot msgpack", msgpack.packb([1, 2, 3]), msgpack.packb({"v": 1, "type": "chunk", "chunk_id": "x"}),
                   msgpack.packb({"v": 99, "type": "heartbeat"}), b""]
        seq = 0

        def send(kind, **fields):
            nonlocal seq
            pub.send(encode({"v": PROTOCOL_VERSION, "type": kind, "run": "r1", "seq": seq, **fields}))
            seq += 1

        # the slow joiner: repeat until the subscriber has clearly connected (it counted garbage, heard a heartbeat)
        deadline = time.monotonic() + 30
        while not (follower.sub.ignored >= len(garbage) and follower.sub.last_heard) and time.monotonic() < deadline:
            for g in garbage:
                pub.send(g)
            send("heartbeat", sent_at=time.time())
            s = follower.poll(50)
            assert s.known_chunks == 3 and not s.finished
        assert follower.sub.ignored >= len(garbage) and follower.sub.last_heard

        # a chunk notification triggers a manifest read: the manifest, not the message, is the truth
        write_manifest(cache, 5)
        send("chunk", chunk_id=4, sequences=16, tokens=1024, total_sequences=80, total_tokens=5120,
             est_total_sequences=1600, committed_at=time.time())
        s, ev = poll_until([follower], lambda st: st[0].known_chunks == 5, "the notified chunk")
        assert [(e["event"], e["chunk_id"]) for e in ev[0] if e["event"] == "notified"] == [("notified", 4)]

        # a lost message (seq jumps) makes it read the manifest: chunks 5..7 arrive without their notifications
        write_manifest(cache, 8)
        seq += 3
        send("heartbeat", sent_at=time.time())
        s, ev = poll_until([follower], lambda st: st[0].known_chunks == 8, "the gap reconcile")
        assert any(e["event"] == "reconciled" and e["reason"] == "gap" for e in ev[0])

        write_manifest(cache, 8, finished=True)
        send("finished", total_sequences=128, total_tokens=8192)
        s, ev = poll_until([follower], lambda st: st[0].finished, "finished")
        assert s[0].known_chunks == 8 and s[0].est_total_sequences == 128
        assert any(e["event"] == "finished" for e in ev[0])
    finally:
        follower.close()
        pub.close(0)


def test_a_curve_endpoint_speaks_only_to_key_holders(tmp_path, corpus_texts, tokenizer_dir):
    """packerd --curve-dir publishes encrypted: a follower with the keys is notified of each new chunk; one
    without keys hears nothing there and still knows every chunk, by its manifest reconcile timer."""
    keys = tmp_path / "keys"
    run_packerd("keys", keys)
    src = tmp_path / "src"
    src.mkdir()
    add_file(src, "a.jsonl", corpus_texts[:5])
    cache, endpoint = tmp_path / "cache", free_endpoint(tmp_path)
    keyed = CacheFollower(cache, endpoint, reconcile_seconds=1e6, curve_dir=keys)
    plain = CacheFollower(cache, endpoint, reconcile_seconds=0.3)
    proc = subprocess.Popen([sys.executable, "-m", "packerd", "run", "--cache-dir", str(cache), "--source", str(src),
                             "--tokenizer", str(tokenizer_dir), "--seq-len", "64", "--chunk-sequences", "16",
                             "--workers", "1", "--follow", "--endpoint", endpoint, "--curve-dir", str(keys)],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        def settled(docs):
            def pred(states):
                m = load_manifest(cache) if (cache / "manifest.json").exists() else None
                return m is not None and m.documents >= docs and all(s.known_chunks == len(m.chunks) for s in states)
            return pred
        # in follow mode the last document waits for more input: one fewer than written is consumed
        states, _ = poll_until([keyed, plain], settled(4), "the first file")
        first = states[0].known_chunks
        add_file(src, "b.jsonl", corpus_texts[5:10])
        states, events = poll_until([keyed, plain], settled(9), "the second file")
        final = states[0].known_chunks
        assert final > first and states[1].known_chunks == final
        assert {e["chunk_id"] for e in events[0] if e["event"] == "notified"} >= set(range(first, final))
        assert keyed.sub.last_heard and plain.sub.last_heard is None and plain.sub.ignored == 0
        assert not [e for e in events[1] if e["event"] == "notified"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        keyed.close()
        plain.close()


def test_curve_dir_without_keys_is_a_one_line_error(tmp_path):
    from click.testing import CliRunner

    from trainerd.__main__ import main
    r = CliRunner().invoke(main, ["--cache-dir", str(tmp_path), "--curve-dir", str(tmp_path / "nokeys")])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert r.output.startswith("Error: data.curve_dir: the CURVE key folder") and "packerd keys" in r.output


# ---- PlanSync: rank 0 follows in a background thread; agree() only takes its latest state -------------------------
def commit_chunks(writer: ManifestWriter, m: Manifest, n: int) -> None:
    """Commit n more chunk entries (no chunk files: nothing here reads a chunk) through the packer's writer."""
    for _ in range(n):
        i = len(m.chunks)
        m.chunks.append(ChunkEntry(id=i, sequences=16, tokens=1024, bytes=100, checksum=f"{i:016x}", start=[i, 0],
                                   end=[i + 1, 0], documents=1, committed_at=time.time()))
        writer.commit(m)


def packed(tmp_path, chunks: int) -> tuple[Path, Manifest, ManifestWriter]:
    """A cache folder whose manifest lists `chunks` chunk entries, committed through a packer's writer (still
    open, for more)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    write_manifest(cache, 0)
    m = load_manifest(cache)
    writer = ManifestWriter(cache)
    commit_chunks(writer, m, chunks)
    return cache, m, writer


def rank0_sync(cache, endpoint, log_path, reconcile_seconds):
    """A one-rank PlanSync over `cache`, with a real DataPlan, training log and failure path."""
    from shared.cache import open_cache
    from trainerd.config import DataConfig
    from trainerd.data import DataPlan
    from trainerd.follow import PlanSync
    from trainerd.output import JsonlLog
    from trainerd.rundir import TrainError

    def fail(msg, alone=False):
        raise TrainError(msg)
    plan = DataPlan(open_cache(cache), seed=0, global_batch=16, rank=0, world_size=1, known_chunks=0)
    return PlanSync(plan, DataConfig(reconcile_seconds=reconcile_seconds), [(str(cache), endpoint)], rank=0, world=1,
                    device="cpu", log=JsonlLog(log_path), fail=fail)


def agree_in_thread(sync, step, waiting):
    """sync.agree() run in another thread, so a call that blocks fails the test instead of hanging it; what it
    raised is raised here."""
    import threading
    out = []

    def call():
        try:
            out.append(sync.agree(step, False, waiting=waiting))
        except BaseException as e:
            out.append(e)
    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive(), "agree() blocked"
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def test_a_blocked_manifest_read_does_not_hold_up_agree(tmp_path):
    """The manifest is swapped for a FIFO whose reader blocks (a read stuck on a slow or dead file system): the
    follow thread waits in it, and every agree() still returns, with the last state; once the read goes on, the
    chunks committed meanwhile reach the plan."""
    cache, m, writer = packed(tmp_path, 3)
    log_path = tmp_path / "train.jsonl"
    # nobody publishes: the thread reads on its 0.1 s timer
    sync = rank0_sync(cache, f"ipc://{tmp_path}/nobody.sock", log_path, reconcile_seconds=0.1)
    try:
        agree_in_thread(sync, 0, waiting=False)
        assert sync.known == 3
        snapshot = (cache / "manifest.json").read_bytes()
        os.mkfifo(tmp_path / "fifo")
        os.link(tmp_path / "fifo", tmp_path / "fifo-writer")     # a name of the FIFO that stays ours
        os.replace(tmp_path / "fifo", cache / "manifest.json")
        # this open returns once the follow thread has opened the FIFO to read it: it is then blocked in the read
        fd = os.open(tmp_path / "fifo-writer", os.O_WRONLY)
        try:
            commit_chunks(writer, m, 2)
            for step in range(20):
                agree_in_thread(sync, step, waiting=step % 2 == 0)
                assert sync.known == 3                           # the last state; nothing was read here
            (tmp_path / "real").write_bytes(snapshot)
            os.replace(tmp_path / "real", cache / "manifest.json")
            os.write(fd, snapshot)
        finally:
            os.close(fd)                                         # the read goes on
        deadline = time.monotonic() + 30
        while sync.known < 5 and time.monotonic() < deadline:
            agree_in_thread(sync, 20, waiting=True)
        assert sync.known == 5
    finally:
        sync.close()
        writer.close()
    grown = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [e["chunks"] for e in grown if e["event"] in ("plan", "plan_expanded")] == [3, 5]
    assert any(e["event"] == "reconciled" and e["reason"] == "timer" and e["known_chunks"] == 5 for e in grown)


def test_an_error_in_the_follow_thread_fails_the_next_agree(tmp_path):
    """The cache is rebuilt with another seq_len under the run: the follow thread meets CacheReplaced, and the
    training thread's next agree() fails the run with the one-line error; close() then returns."""
    from trainerd.rundir import TrainError
    cache, m, writer = packed(tmp_path, 2)
    writer.close()
    sync = rank0_sync(cache, f"ipc://{tmp_path}/nobody.sock", tmp_path / "train.jsonl", reconcile_seconds=0.1)
    try:
        agree_in_thread(sync, 0, waiting=False)
        assert sync.known == 2
        (cache / "manifest.log").unlink()
        other = Manifest.from_json({**m.to_json(), "seq_len": 32})
        other.save(cache)
        deadline = time.monotonic() + 30
        with pytest.raises(TrainError, match=r"^cannot follow the cache: .* holds another cache now: seq_len is 32, was 64"):
            while time.monotonic() < deadline:
                agree_in_thread(sync, 1, waiting=True)
        assert not sync.follow._thread.is_alive()
        with pytest.raises(TrainError, match="holds another cache now"):   # and at every later boundary
            sync.agree(2, False, waiting=False)
    finally:
        sync.close()
