"""trainerd.follow against a real packerd in follow mode and a raw ZeroMQ PUB socket."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import msgpack
import zmq

from conftest import ROOT, free_endpoint, run_packerd, write_jsonl
from shared.manifest import ChunkEntry, Manifest, load_manifest
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
