"""Notifications from packer to trainer: ZeroMQ PUB/SUB, one msgpack map per message.

Messages are hints that wake the trainer sooner; the manifest alone rebuilds the picture. Every message of
one packer run carries the run's id and a `seq` that grows by one, so a subscriber sees what it missed.

    {"v": 1, "type": "chunk", "run": str, "seq": int, "chunk_id": int, "sequences": int, "tokens": int,
     "total_sequences": int, "total_tokens": int, "est_total_sequences": int, "committed_at": float}
    {"v": 1, "type": "heartbeat", "run": str, "seq": int, "sent_at": float}
    {"v": 1, "type": "finished", "run": str, "seq": int, "total_sequences": int, "total_tokens": int}

Optional fields (OPTIONAL), checked when present: `"cache": str` on `chunk` and `finished` names the cache the
message is about when it is not the main one: "holdout" for the held-out cache in CACHE/holdout/
(`packerd run --holdout`). The main cache's messages carry no such field; a subscriber that follows the main
cache ignores messages that name another (trainerd's CacheFollower does). `"sent_at": float` on `chunk` is the
time the publisher sent it, which splits a notification's latency into the packer's share (committed_at to
sent_at: the durable manifest write and the hand-over to the socket) and the transport's and subscriber's
(sent_at to received).
"""
from __future__ import annotations

import logging
import math
import threading
import time

import msgpack
import zmq

PROTOCOL_VERSION = 1
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5557"
HEARTBEAT_SECONDS = 1.0

log = logging.getLogger(__name__)

_INT, _FLOAT, _STR = (int,), (int, float), (str,)
SCHEMA = {
    "chunk": {"run": _STR, "seq": _INT, "chunk_id": _INT, "sequences": _INT, "tokens": _INT,
              "total_sequences": _INT, "total_tokens": _INT, "est_total_sequences": _INT,
              "committed_at": _FLOAT},
    "heartbeat": {"run": _STR, "seq": _INT, "sent_at": _FLOAT},
    "finished": {"run": _STR, "seq": _INT, "total_sequences": _INT, "total_tokens": _INT},
}
OPTIONAL = {"chunk": {"cache": _STR, "sent_at": _FLOAT}, "finished": {"cache": _STR}}  # may be absent; checked when present


class ProtocolError(ValueError):
    pass


def encode(msg: dict) -> bytes:
    validate(msg)
    return msgpack.packb(msg, use_bin_type=True)


def validate(msg) -> dict:
    if not isinstance(msg, dict):
        raise ProtocolError(f"message is a {type(msg).__name__}, not a map")
    v = msg.get("v")
    if v != PROTOCOL_VERSION or isinstance(v, bool):  # True == 1
        raise ProtocolError(f"protocol version {v!r} is not {PROTOCOL_VERSION}")
    kind = msg.get("type")
    if not isinstance(kind, str) or kind not in SCHEMA:  # a list or map would not even hash
        raise ProtocolError(f"unknown message type {kind!r}")
    optional = OPTIONAL.get(kind, {})
    for key, types in {**SCHEMA[kind], **optional}.items():
        if key in optional and key not in msg:
            continue
        value = msg.get(key)
        if not isinstance(value, types) or isinstance(value, bool):
            raise ProtocolError(f"{kind} message field {key!r} is {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ProtocolError(f"{kind} message field {key!r} is not a finite number")
    return msg


def decode(data: bytes) -> dict:
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"not msgpack: {type(e).__name__}") from None
    return validate(msg)


def endpoint_is_local(endpoint: str) -> bool:
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host = endpoint.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


# ---- CURVE: encryption and client authentication for an endpoint other machines can reach ------------
# A key folder made by `packerd keys DIR` holds:
#   server.key, server.key_secret     the publisher's key pair (the secret stays with packerd)
#   client.key, client.key_secret     a subscriber's key pair (copy these and server.key to the trainer)
#   authorized/*.key                  public keys of the subscribers the publisher accepts

def make_curve_keys(folder) -> None:
    import os
    import shutil
    from pathlib import Path

    import zmq.auth
    folder = Path(folder)
    (folder / "authorized").mkdir(parents=True, exist_ok=True)
    zmq.auth.create_certificates(str(folder), "server")
    zmq.auth.create_certificates(str(folder), "client")
    shutil.copy(folder / "client.key", folder / "authorized" / "client.key")
    for secret in folder.glob("*.key_secret"):
        os.chmod(secret, 0o600)


def _curve_server(sock, ctx, folder):
    from pathlib import Path

    import zmq.auth
    from zmq.auth.thread import ThreadAuthenticator
    folder = Path(folder)
    public, secret = zmq.auth.load_certificate(str(folder / "server.key_secret"))
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(folder / "authorized"))
    sock.curve_secretkey, sock.curve_publickey, sock.curve_server = secret, public, True
    return auth


def _curve_client(sock, folder):
    from pathlib import Path

    import zmq.auth
    folder = Path(folder)
    server_public, _ = zmq.auth.load_certificate(str(folder / "server.key"))
    public, secret = zmq.auth.load_certificate(str(folder / "client.key_secret"))
    sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_public, public, secret


class Publisher:
    """A PUB socket: each message goes out at once from the thread that announces it, and a thread of its own
    sends a heartbeat after a second without a message.

    Announcing from the caller's thread, rather than queueing for the heartbeat thread, saves a hand-over that
    waited for that thread to get a core and the interpreter lock behind the packer's tokenizer threads: the
    packer's share of the latency fell from 18 to 3.5 ms at p99 with 4 packers on 2 cores (bench/bench_notify.py
    on tmpfs, the two publishers in runs minutes apart). ZeroMQ sockets are not thread-safe; every
    use of this one holds self._lock, whose acquire and release are the full memory barrier ZeroMQ asks for
    when a socket moves between threads."""

    def __init__(self, endpoint: str, run_id: str, context: zmq.Context | None = None, curve_dir=None):
        self.endpoint = endpoint
        self.run_id = run_id
        self.curve_dir = curve_dir
        if not curve_dir and not endpoint_is_local(endpoint):
            log.warning("%s is reachable from other machines without encryption; use --curve-dir", endpoint)
        self._ctx = context or zmq.Context.instance()
        self._lock = threading.Lock()
        self._sock = None  # set by the thread once bound; None again after close()
        self._seq = 0
        self._next_beat = time.monotonic()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="publisher", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _loop(self) -> None:
        sock = self._ctx.socket(zmq.PUB)
        sock.setsockopt(zmq.LINGER, 500)
        sock.setsockopt(zmq.SNDHWM, 10000)
        auth = None
        try:
            if self.curve_dir:
                auth = _curve_server(sock, self._ctx, self.curve_dir)
            sock.bind(self.endpoint)
        except (zmq.ZMQError, OSError, ValueError) as e:
            self._error = OSError(f"cannot bind {self.endpoint}: {e}")
            sock.close(0)
            if auth:
                auth.stop()
            self._ready.set()
            return
        with self._lock:
            self._sock = sock
        self._ready.set()
        while not self._stop.wait(max(0.0, self._next_beat - time.monotonic())):
            with self._lock:
                if time.monotonic() >= self._next_beat:
                    self._send({"type": "heartbeat", "sent_at": time.time()})
        with self._lock:
            self._sock = None
            sock.close()  # LINGER: what is still queued goes out for up to 0.5 s
        if auth:
            auth.stop()

    def _send(self, msg: dict) -> None:
        """Send one message; the caller holds self._lock. Messages are hints: one that cannot go is logged."""
        if self._sock is None:
            return  # closed
        msg = {"v": PROTOCOL_VERSION, "run": self.run_id, "seq": self._seq, **msg}
        if msg["type"] == "chunk":
            msg["sent_at"] = time.time()
        self._seq += 1
        self._next_beat = time.monotonic() + HEARTBEAT_SECONDS
        try:
            self._sock.send(encode(msg))
        except zmq.ZMQError as e:
            log.warning("could not announce on %s: %s", self.endpoint, e)

    def chunk(self, **fields) -> None:
        with self._lock:
            self._send({"type": "chunk", **fields})

    def finished(self, **fields) -> None:
        with self._lock:
            self._send({"type": "finished", **fields})

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class Subscriber:
    """A SUB socket that yields valid messages, ignores foreign ones with a warning, and notices gaps.

    `gap` turns True when a message of the current packer run was missed (or the run changed); the
    caller then re-reads the manifest and calls `clear_gap()`.
    """

    def __init__(self, endpoint: str, context: zmq.Context | None = None, curve_dir=None):
        self.endpoint = endpoint
        self._ctx = context or zmq.Context.instance()
        self.sock = self._ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve_dir:
            _curve_client(self.sock, curve_dir)
        self.sock.setsockopt(zmq.RCVHWM, 100000)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)
        self._last: tuple[str, int] | None = None
        self.gap = False
        self.ignored = 0
        self.last_heard: float | None = None

    def poll(self, timeout_ms: int = 0) -> list[dict]:
        """All messages waiting now (waiting up to timeout_ms for the first one)."""
        out = []
        if not self.sock.poll(timeout_ms):
            return out
        while True:
            try:
                data = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return out
            try:
                msg = decode(data)
            except ProtocolError as e:
                self.ignored += 1
                log.warning("ignored a message on %s: %s", self.endpoint, e)
                continue
            run, seq = msg["run"], msg["seq"]
            if self._last is None or self._last[0] != run or seq != self._last[1] + 1:
                self.gap = True
            self._last = (run, seq)
            self.last_heard = time.time()
            out.append(msg)

    def clear_gap(self) -> None:
        self.gap = False

    def close(self) -> None:
        self.sock.close(0)
