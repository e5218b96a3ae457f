"""The `packerd` command: run, status, verify."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import uuid
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import click

from shared.builtin import BUILTIN_SOURCE, BUILTIN_TOKENIZER
from shared.cache import Cache, CorruptChunk, open_cache, QUARANTINE_DIR
from shared.chunk import DEFAULT_LZ4_LEVEL, FORMAT_VERSION, dtype_for_vocab
from shared.config import ConfigError, build, load_toml, merge, opt
from shared.fsutil import TMP_PREFIX, FolderLock, LockHeld, fsync_dir, remove_temporaries
from shared.manifest import HOLDOUT_DIR, LOG_NAME, MANIFEST_NAME, Manifest, ManifestError, load_manifest
from shared.protocol import DEFAULT_ENDPOINT, Publisher
from shared.tokenizer import TokenizerError, load_tokenizer

from .holdout import HOLDOUT_HASH, MAX_FRACTION, holdout_record
from .pack import Packer, PackError, Progress
from .shard import FILE_HASH, Shard, ShardError
from .source import DEFAULT_HF, Source, SourceError, keep_torch_out
from .tokenizer import ENGINES, EngineError, choose_engine

log = logging.getLogger("packerd")


@dataclass
class PackerConfig:
    cache_dir: str = opt("", "Folder of the chunk cache (created if missing).")
    source: list[str] = opt([], "Sources: hf:NAME[:CONFIG[:SPLIT]], builtin:pydoc, builtin:stdlib, or local files/folders/globs "
                                "(none: FineWeb-Edu sample-10BT, or builtin:pydoc with the builtin:bpe tokenizer).")
    tokenizer: str = opt("", "Hugging Face tokenizer: hub name, local folder, tokenizer.json, or builtin:bpe.")
    tokenizer_engine: str = opt("auto", "What encodes: tiktoken (the tokenizer converted, where that is exact), hf "
                                        "(tokenizers), or auto (tiktoken where exact, else hf). The same ids either way.",
                                choices=ENGINES)
    eos: str | None = opt(None, "EOS token to append after each document when the tokenizer names none.")
    text_field: str = opt("text", "Field of each record that holds the document text.")
    seq_len: int = opt(512, "Tokens per packed sequence.")
    chunk_sequences: int = opt(1024, "Sequences per chunk file.")
    workers: int = opt(0, "Tokenizer threads; 0 means one per core.")
    lz4_level: int = opt(DEFAULT_LZ4_LEVEL, "LZ4 level: 1-12 high compression, 0 the fast default mode.")
    chunk_format: int = opt(FORMAT_VERSION, "Chunk file format of a new cache: 3 (token ids coded through a "
                                            "per-chunk table, about 6% smaller) or 2 (fixed-width ids, decoded "
                                            "4 to 20 times faster).")
    endpoint: str = opt(DEFAULT_ENDPOINT, "ZeroMQ endpoint the notifications are published on (tcp:// or ipc://).")
    mode: str = opt("forward", "forward: continue after the last committed chunk; inverse: regenerate missing chunks.")
    follow: bool = opt(False, "Keep running and pack files that appear in source folders.")
    estimate_tokens: int | None = opt(None, "Size of the full dataset in tokens, when metadata cannot tell.")
    poll_seconds: float = opt(2.0, "Follow mode: how often to look for new files.")
    max_tokens_per_s: int = opt(0, "Pace the packing to at most this many tokens per second (0: as fast as it "
                                   "goes), as a dataset streamed over a network arrives; leaves the CPU to a trainer.")
    curve_dir: str | None = opt(None, "Folder of CURVE keys (`packerd keys`): encrypt and authenticate the endpoint.")
    holdout: float | None = opt(None, f"Share of documents (0 < F <= {MAX_FRACTION}) packed into the held-out cache "
                                      f"CACHE_DIR/{HOLDOUT_DIR}/ instead, chosen by a hash of each document's index.")
    shard: str | None = opt(None, "I/N: pack shard I of N (0 <= I < N) of the sources into this cache, for N packers "
                                  "on N machines that together pack every document once (packerd/shard.py).")

    def validate(self) -> None:
        if not self.cache_dir:
            raise ConfigError("cache_dir is required (--cache-dir)")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be at least 2 (got {self.seq_len})")
        if self.chunk_sequences < 1:
            raise ConfigError(f"chunk_sequences must be at least 1 (got {self.chunk_sequences})")
        if self.workers < 0:
            raise ConfigError(f"workers must be 0 or more (got {self.workers})")
        if self.max_tokens_per_s < 0:
            raise ConfigError(f"max_tokens_per_s must be 0 or more (got {self.max_tokens_per_s})")
        if self.chunk_format not in (2, 3):
            raise ConfigError(f"chunk_format must be 2 or 3 (got {self.chunk_format})")
        if not 0 <= self.lz4_level <= 12:
            raise ConfigError(f"lz4_level must be between 0 and 12 (got {self.lz4_level})")
        if self.mode not in ("forward", "inverse"):
            raise ConfigError(f"mode must be forward or inverse (got {self.mode!r})")
        if not self.endpoint.startswith(("tcp://", "ipc://")):
            raise ConfigError(f"endpoint must start with tcp:// or ipc:// (got {self.endpoint!r})")
        if self.holdout is not None and not 0 < self.holdout <= MAX_FRACTION:
            raise ConfigError(f"holdout must be in (0, {MAX_FRACTION}] (got {self.holdout})")
        try:
            self.parsed_shard  # parsed here so that a bad spec is a config error, before anything is touched
        except ShardError as e:
            raise ConfigError(str(e)) from None
        if self.curve_dir and not (Path(self.curve_dir) / "server.key_secret").exists():
            raise ConfigError(f"curve_dir {self.curve_dir} has no server.key_secret (create one with `packerd keys DIR`)")

    @cached_property
    def parsed_shard(self) -> Shard | None:
        """`shard` parsed, or None. How local files are split is left undecided: _shard() adds it per cache."""
        return None if self.shard is None else Shard.parse(self.shard)


def _fail(msg: str) -> click.ClickException:
    return click.ClickException(msg)


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log debug detail.")
def main(verbose: bool) -> None:
    """packerd: tokenize a text dataset into a packed, LZ4-compressed chunk cache and announce each chunk."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s packerd %(levelname)s %(message)s",
                        datefmt="%Y-%m-%dT%H:%M:%S")


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML file with these options; flags win.")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Folder of the chunk cache.")
@click.option("--source", multiple=True, help="hf:NAME[:CONFIG[:SPLIT]], builtin:pydoc, builtin:stdlib, or a local file/folder/glob. "
              f"Repeatable. Default: {DEFAULT_HF} (builtin:pydoc with --tokenizer builtin:bpe).")
@click.option("--tokenizer", help="Hub name, local folder, tokenizer.json, or builtin:bpe.")
@click.option("--tokenizer-engine", type=click.Choice(ENGINES), help="auto (default): tiktoken where it encodes exactly "
              "like the tokenizer, else hf (tokenizers); or force one. The cache is the same bytes either way.")
@click.option("--eos", help="EOS token, for tokenizers that name none.")
@click.option("--text-field", help="Record field holding the text (default text).")
@click.option("--seq-len", type=int, help="Tokens per sequence (default 512).")
@click.option("--chunk-sequences", type=int, help="Sequences per chunk (default 1024).")
@click.option("--workers", type=int, help="Tokenizer threads (default: one per core).")
@click.option("--lz4-level", type=int, help="LZ4 high-compression level (default 9).")
@click.option("--chunk-format", type=int, help=f"Chunk format of a new cache, 3 or 2 (default {FORMAT_VERSION}).")
@click.option("--endpoint", help=f"ZeroMQ PUB endpoint (default {DEFAULT_ENDPOINT}).")
@click.option("--mode", type=click.Choice(["forward", "inverse"]), help="forward (default) or inverse.")
@click.option("--follow/--no-follow", default=None, help="Keep running and pack new files in source folders.")
@click.option("--max-tokens-per-s", type=int, help="Pace packing to at most this many tokens/s (default 0: no limit).")
@click.option("--estimate-tokens", type=int, help="Full dataset size in tokens, when metadata cannot tell.")
@click.option("--curve-dir", type=click.Path(file_okay=False), help="CURVE key folder from `packerd keys`: encrypt and authenticate subscribers.")
@click.option("--holdout", type=float, help=f"Share of documents (0 < F <= {MAX_FRACTION}) packed into CACHE_DIR/{HOLDOUT_DIR}/ "
              "instead, for held-out loss; chosen for the life of the cache.")
@click.option("--shard", help="I/N: pack shard I of N (counted from 0) of the sources, one of N packers that together "
              "pack every document once; fixed for the life of the cache.")
@click.option("--force-rebuild", is_flag=True, help="Delete the cache and pack from scratch.")
@click.option("--yes", is_flag=True, help="Do not ask before --force-rebuild.")
def run(config_file, force_rebuild, yes, **flags) -> None:
    """Pack SOURCE into the cache at CACHE_DIR, continuing where the last run stopped."""
    try:
        data = load_toml(config_file) if config_file else {}
        data = {k.replace("-", "_"): v for k, v in data.items()}
        flags["source"] = list(flags["source"]) or None
        cache_dir = flags.get("cache_dir") or data.get("cache_dir")
        # a rebuild deletes the manifest: one that cannot be read must not stop it
        existing = _existing_manifest(cache_dir, damaged_ok=force_rebuild) if cache_dir else None
        if existing is not None and existing.holdout_of:
            raise ConfigError(f"{cache_dir} is the held-out cache of {Path(cache_dir).resolve().parent}: "
                              f"run packerd on that folder (with its --holdout)")
        if existing is not None:  # settings of an existing cache are the defaults of a restart
            data = merge({"seq_len": existing.seq_len, "chunk_sequences": existing.chunk_sequences,
                          "source": existing.sources, "tokenizer": existing.tokenizer["name"],
                          "text_field": existing.text_field, "lz4_level": existing.lz4_level,
                          "chunk_format": existing.chunk_format,
                          "shard": (existing.shard or {}).get("spec")}, data)
        cfg = build(PackerConfig, merge(data, flags))
    except ConfigError as e:
        raise _fail(str(e))
    if not cfg.tokenizer:
        raise _fail("no tokenizer given (use --tokenizer: a hub name such as gpt2, a local folder, or builtin:bpe)")
    if not cfg.source:
        # the embedded corpus goes with the embedded tokenizer (offline); otherwise FineWeb-Edu from the hub
        cfg.source = [BUILTIN_SOURCE] if cfg.tokenizer == BUILTIN_TOKENIZER else [DEFAULT_HF]
        log.info("no --source given: packing %s", cfg.source[0])
    _pack(cfg, force_rebuild, yes)


def _existing_manifest(cache_dir, damaged_ok: bool = False) -> Manifest | None:
    try:
        return load_manifest(cache_dir) if Path(cache_dir).is_dir() else None
    except ManifestError as e:
        if damaged_ok:
            log.warning("%s; --force-rebuild replaces it", e)
            return None
        raise _fail(str(e))
    except OSError as e:
        raise _fail(f"cannot read the manifest in {cache_dir}: {e.strerror or e}")


def _pack(cfg: PackerConfig, force_rebuild: bool, yes: bool) -> None:
    cache_dir = Path(cfg.cache_dir)
    keep_torch_out()
    # check the tokenizer and the sources before touching the folder: a typo must neither create a cache
    # folder nor, with --force-rebuild, delete an existing cache
    try:
        tok = load_tokenizer(cfg.tokenizer, cfg.eos)
    except TokenizerError as e:
        raise _fail(str(e))
    try:
        engine, why = choose_engine(tok, cfg.tokenizer_engine)
    except EngineError as e:
        raise _fail(str(e))
    log.info("tokenizer engine %s (%s)", engine.name, why)
    known = [] if force_rebuild else [_existing_manifest(cache_dir), _existing_manifest(cache_dir / HOLDOUT_DIR)]
    try:
        Source(cfg.source, cfg.text_field, _known_files(*known), _shard(cfg, *known))
    except SourceError as e:
        raise _fail(str(e))
    created = not cache_dir.exists()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        if created:
            fsync_dir(cache_dir.resolve().parent)  # the folder's entry is durable before its first chunk
    except OSError as e:
        raise _fail(f"cannot create cache folder {cache_dir}: {e.strerror}")
    lock = FolderLock(cache_dir)  # held for both caches: the held-out one lives inside this folder
    try:
        lock.acquire()
    except LockHeld as e:
        raise _fail(f"another packer is running on this cache: {e}")
    try:
        _pack_locked(cfg, cache_dir, tok, engine, force_rebuild, yes)
    finally:
        # a failed first run leaves no folder behind; removed under the lock, so no packer that took the lock
        # after this one loses the folder (on Windows the open lock file and its folder stay until released)
        leave = created and not any((d / MANIFEST_NAME).exists() for d in (cache_dir, cache_dir / HOLDOUT_DIR))
        if leave:
            shutil.rmtree(cache_dir, ignore_errors=True)
        lock.release()
        if leave and cache_dir.exists():
            shutil.rmtree(cache_dir, ignore_errors=True)


def _known_files(*manifests: Manifest | None) -> list[dict] | None:
    """The local files packed so far, in their order: the longest list any of the manifests recorded (each
    cache records the list as it was at its last commit, so the one saved last knows the most)."""
    lists = [m.source_files for m in manifests if m is not None]
    return max(lists, key=len) if lists else None


def _shard(cfg: PackerConfig, *manifests: Manifest | None) -> Shard | None:
    """cfg's shard, with how the cache splits local files as its manifests recorded (None on a first run:
    Source decides)."""
    if cfg.parsed_shard is None:
        return None
    recorded = next((m.shard for m in manifests if m is not None and m.shard), {})
    # a copy: Source decides the split on its own Shard, and the config's stays undecided for the next cache
    return replace(cfg.parsed_shard, files=recorded.get("files"))


def _pack_locked(cfg: PackerConfig, cache_dir: Path, tok, engine, force_rebuild: bool, yes: bool) -> None:
    if force_rebuild:
        _clear(cache_dir, yes)
    manifest = _check_or_create(load_manifest(cache_dir), cfg, tok, cache_dir)
    _clean_uncommitted(cache_dir, manifest)
    held = _holdout(cfg, cache_dir, tok)
    try:
        source = Source(cfg.source, cfg.text_field, _known_files(manifest, held and held[1]),
                        _shard(cfg, manifest, held and held[1]))
    except SourceError as e:
        raise _fail(str(e))
    manifests = [manifest] + ([held[1]] if held else [])
    for m in manifests:
        m.shard = source.shard.record() if source.shard else None
    if cfg.mode == "forward" and manifest.finished and (held is None or held[1].finished):
        click.echo(f"cache {cache_dir} is finished: {manifest.total_sequences:,} sequences; nothing to do "
                   f"(--force-rebuild packs it again)", err=True)
        return
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    workers = cfg.workers or os.cpu_count() or 1
    try:
        publisher = (Publisher(cfg.endpoint, uuid.uuid4().hex[:12], curve_dir=cfg.curve_dir)
                     if cfg.mode == "forward" else None)
    except OSError as e:
        raise _fail(str(e))
    for m in manifests:
        if publisher:  # saved with the next commit
            m.endpoint = connect_address(cfg.endpoint)
        _record_engine(m, engine.name)
    progress = Progress(engine=engine.name)
    packer = Packer(cache_dir, manifest, source, tok, workers, manifest.lz4_level, publisher, stop,
                    cfg.estimate_tokens, progress, holdout=held, max_tokens_per_s=cfg.max_tokens_per_s,
                    engine=engine)
    try:
        if cfg.mode == "inverse":
            _regenerate(packer)
        else:
            packer.forward(follow=cfg.follow, poll_seconds=cfg.poll_seconds)
    except (SourceError, PackError) as e:
        raise _fail(f"{e} (committed chunks are intact; {_committed(packer)} in the manifest)")
    except OSError as e:
        what = "disk full" if e.errno == 28 else (e.strerror or str(e))
        raise _fail(f"{what} while writing to {cache_dir} (committed chunks are intact; {_committed(packer)} in the manifest)")
    finally:
        progress.close()
        packer.close()
        if publisher:
            publisher.close()
    _summary(packer)


def connect_address(endpoint: str) -> str:
    """The address a subscriber connects to for the bind address `endpoint`: a wildcard host (tcp://*:5557,
    tcp://0.0.0.0:5557, tcp://[::]:5557) becomes this machine's name, the fully qualified one where the
    resolver knows one (SLURM nodes, a pod in a headless service), else the plain host name; a relative ipc://
    path becomes absolute (a subscriber runs in another folder); any other endpoint is kept as given."""
    if endpoint.startswith("ipc://") and not endpoint.startswith(("ipc:///", "ipc://@")):  # @: abstract socket
        return "ipc://" + os.path.abspath(endpoint[len("ipc://"):])
    if not endpoint.startswith("tcp://"):
        return endpoint
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    if host not in ("*", "0.0.0.0", "::", "[::]"):
        return endpoint
    name = socket.getfqdn()
    if "." not in name or name.startswith("localhost"):
        name = socket.gethostname()
    return f"tcp://{name}:{port}"


def _record_engine(m: Manifest, engine: str) -> None:
    """Note this session's engine in the manifest (saved with its next commit) from the next chunk on."""
    sessions = [s for s in m.tokenizer_engines or [] if s["from_chunk"] < m.next_chunk_id()]
    if not sessions or sessions[-1]["engine"] != engine:
        sessions.append({"engine": engine, "from_chunk": m.next_chunk_id()})
    m.tokenizer_engines = sessions


def _holdout(cfg: PackerConfig, cache_dir: Path, tok) -> tuple[Path, Manifest] | None:
    """The held-out cache's folder and manifest (checked against cfg like the main one, or new), ready to
    pack into; None without --holdout. A held-out cache that a run without --holdout would leave behind,
    or one packed with another fraction, is refused by _check_or_create."""
    folder = cache_dir / HOLDOUT_DIR
    existing = _existing_manifest(folder)
    if existing is not None and not existing.holdout_of:
        raise _fail(f"{folder} holds a cache that is not a held-out one: move it away, or use --force-rebuild")
    if existing is None and cfg.holdout is None:
        return None
    if folder.exists() and not folder.is_dir():
        raise _fail(f"{folder} is a file: the held-out cache needs that name for a folder; move it away")
    if existing is None and (other := _not_cache_files(folder)):
        raise _fail(f"{folder} holds files that are not a cache's ({', '.join(other[:3])}): move them away")
    manifest = _check_or_create(existing, cfg, tok, folder)
    manifest.holdout_of = manifest.holdout_of or cache_dir.resolve().name
    if not folder.is_dir():
        folder.mkdir()
        fsync_dir(cache_dir)  # the new folder's entry is durable before any chunk is committed in it
    _clean_uncommitted(folder, manifest)
    return folder, manifest


def _regenerate(packer: Packer) -> None:
    """Inverse mode: the missing chunk files of each cache, written again byte for byte."""
    missing = [(w, Cache(w.dir, w.m).missing_chunks()) for w in packer.writers]
    if not any(ids for _, ids in missing):
        click.echo("no chunk is missing", err=True)
        return
    for w, ids in missing:
        where = " of the held-out cache" if w.held_out else ""
        if ids:
            click.echo(f"regenerating {len(ids)} missing chunk(s){where}: {_ranges(ids)}", err=True)
            done = packer.regenerate(w, ids)
            click.echo(f"regenerated {len(done)} chunk(s){where}", err=True)


def _committed(packer: Packer) -> str:
    n = f"{len(packer.main.m.chunks)}"
    return n + (f" and {len(packer.held.m.chunks)} held out" if packer.held else "")


def _summary(packer: Packer) -> None:
    m = packer.main.m
    t = m.totals()
    state = "finished" if m.finished else "stopped"
    line = (f"{state}: {t['chunks']:,} chunks, {t['sequences']:,} sequences, {t['tokens']:,} tokens, "
            f"{t['bytes_per_token'] or 0:.3f} bytes/token, utilization {t['utilization'] or 0:.4f}"
            + (f", {sum(m.skipped.values())} empty records skipped" if m.skipped else ""))
    if packer.held:
        h = packer.held.m.totals()
        line += f"; held out: {h['chunks']:,} chunks, {h['sequences']:,} sequences, {h['tokens']:,} tokens"
    click.echo(line, err=True)


def _ranges(ids: list[int]) -> str:
    out, i = [], 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(out)


def _not_cache_files(folder: Path) -> list[str]:
    """Names in `folder` that packerd and the trainer do not write there (sorted; none when it is absent)."""
    if not folder.is_dir():
        return []
    ours = {MANIFEST_NAME, LOG_NAME, ".lock", QUARANTINE_DIR, HOLDOUT_DIR}
    return sorted(p.name for p in folder.iterdir()
                  if p.name not in ours and not p.name.startswith((TMP_PREFIX, "chunk-")))


def _clear(cache_dir: Path, yes: bool) -> None:
    """Delete what packerd and the trainer wrote in the cache folder and its held-out cache; anything else
    there stays (a rebuild asked of the wrong folder must not take its other files with it)."""
    if not yes and sys.stdin.isatty():
        click.confirm(f"Delete every chunk and the manifest in {cache_dir}?", abort=True)
    held = cache_dir / HOLDOUT_DIR
    folders = [cache_dir] + ([held] if held.is_dir() else [])
    # the manifests go first: from then on no reader trusts the chunk files that follow them; each snapshot
    # before its commit log, so no reader finds a snapshot whose log is gone (it would wait for it)
    for d in folders:
        (d / MANIFEST_NAME).unlink(missing_ok=True)
        (d / LOG_NAME).unlink(missing_ok=True)
    for d in reversed(folders):
        for p in [*d.glob("chunk-*.lz4"), *d.glob(f"{QUARANTINE_DIR}/chunk-*.lz4.*")]:
            p.unlink()
        remove_temporaries(d)
        for empty in (d / QUARANTINE_DIR, held):  # a rebuild chooses its holdout anew
            if empty.is_dir() and not any(empty.iterdir()):
                empty.rmdir()


def _check_or_create(manifest: Manifest | None, cfg: PackerConfig, tok, folder: Path) -> Manifest:
    """`folder`'s manifest, refused when it was packed with other settings than cfg's; a new one when None."""
    if manifest is None:
        return Manifest(seq_len=cfg.seq_len, chunk_sequences=cfg.chunk_sequences,
                        dtype=dtype_for_vocab(tok.vocab_size).name, tokenizer=tok.identity(),
                        sources=list(cfg.source), text_field=cfg.text_field, lz4_level=cfg.lz4_level,
                        chunk_format=cfg.chunk_format,
                        holdout=holdout_record(cfg.holdout) if cfg.holdout else None)
    held = manifest.holdout or {}
    both = bool(held) and cfg.holdout is not None  # the hash matters only where both choose documents
    mismatches = []
    for name, have, want in [("seq_len", manifest.seq_len, cfg.seq_len),
                             ("chunk_sequences", manifest.chunk_sequences, cfg.chunk_sequences),
                             ("source", manifest.sources, list(cfg.source)),
                             ("text_field", manifest.text_field, cfg.text_field),
                             ("lz4_level", manifest.lz4_level, cfg.lz4_level),
                             ("chunk_format", manifest.chunk_format, cfg.chunk_format),
                             ("tokenizer vocabulary", manifest.tokenizer["vocab_hash"], tok.vocab_hash),
                             ("eos", manifest.tokenizer["eos_id"], tok.eos_id),
                             ("holdout", held.get("fraction"), cfg.holdout),
                             ("shard", (manifest.shard or {}).get("spec"), cfg.parsed_shard and str(cfg.parsed_shard)),
                             ("shard hash", (manifest.shard or {}).get("hash", FILE_HASH), FILE_HASH),
                             ("holdout hash", held.get("hash") if both else None, HOLDOUT_HASH if both else None)]:
        if have != want:
            mismatches.append(f"{name} {have!r} (now {want!r})")
    if mismatches:
        raise _fail(f"the cache in {folder} was packed with {'; '.join(mismatches)}: "
                    f"use the same settings, another --cache-dir, or --force-rebuild")
    return manifest


def _clean_uncommitted(cache_dir: Path, manifest: Manifest) -> None:
    """Remove what a crash left: temporaries, and chunk files written after the last manifest."""
    remove_temporaries(cache_dir)
    nxt = manifest.next_chunk_id()
    for p in cache_dir.glob("chunk-*.lz4"):
        try:
            cid = int(p.stem.split("-")[1])
        except (IndexError, ValueError):
            continue
        if cid >= nxt:
            p.unlink()
            log.info("removed %s: written but never committed to the manifest", p.name)


@main.command()
@click.argument("folder", type=click.Path(file_okay=False))
def keys(folder) -> None:
    """Create CURVE keys in FOLDER for an endpoint that other machines reach.

    packerd uses FOLDER with `--curve-dir FOLDER`; copy server.key, client.key and client.key_secret to the
    trainer's machine and give it that folder with `--curve-dir`. Add more subscribers by putting their
    public keys in FOLDER/authorized/.
    """
    from shared.protocol import make_curve_keys
    if Path(folder).exists() and any(Path(folder).iterdir()):
        raise _fail(f"{folder} is not empty; keys are never overwritten")
    make_curve_keys(folder)
    click.echo(f"wrote server and client key pairs to {folder}")


@main.command()
@click.option("--cache-dir", required=True, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(cache_dir, as_json) -> None:
    """Chunks, sequences, tokens, bytes per token, estimate, finished."""
    m = _existing_manifest(cache_dir)
    if m is None:
        raise _fail(f"{cache_dir} has no manifest (nothing packed there yet)")
    t = m.totals()
    info = {**t, "seq_len": m.seq_len, "dtype": m.dtype, "tokenizer": m.tokenizer["name"],
            "documents": m.documents, "skipped": m.skipped, "estimate": m.estimate, "finished": m.finished,
            "sources": m.sources, "tokenizer_engines": m.tokenizer_engines}
    held = _holdout_status(Path(cache_dir), m)
    if held is not None:
        info["holdout"] = held
    if m.holdout_of:
        info["holdout_of"] = m.holdout_of
    if m.shard:
        info["shard"] = m.shard
    if m.endpoint:
        info["endpoint"] = m.endpoint
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    est = m.estimate.get("tokens")
    click.echo(f"cache        {cache_dir}")
    click.echo(f"chunks       {t['chunks']:,}")
    click.echo(f"sequences    {t['sequences']:,} of {m.seq_len} tokens ({m.dtype})")
    click.echo(f"tokens       {t['tokens']:,} (utilization {t['utilization'] or 0:.4f})")
    click.echo(f"documents    {m.documents:,}" + (f" ({sum(m.skipped.values())} empty skipped)" if m.skipped else ""))
    click.echo(f"bytes/token  {t['bytes_per_token'] or 0:.3f} ({t['bytes']:,} bytes)")
    click.echo("estimate     " + (f"{est:,} tokens ({m.estimate.get('method')})" if est else "unknown"))
    click.echo(f"tokenizer    {m.tokenizer['name']} (vocab {m.tokenizer['vocab_size']:,}, eos {m.tokenizer['eos_id']})")
    if m.tokenizer_engines:
        click.echo("engines      " + ", ".join(f"{s['engine']} from chunk {s['from_chunk']}" for s in m.tokenizer_engines))
    click.echo(f"finished     {'yes' if m.finished else 'no'}")
    if m.shard:
        click.echo(f"shard        {m.shard['spec']} of the sources (local files split: {m.shard['files']})")
    if m.endpoint:
        click.echo(f"endpoint     {m.endpoint}")
    if held is not None:
        click.echo(f"held out     {held['chunks']:,} chunks, {held['sequences']:,} sequences, {held['tokens']:,} tokens "
                   f"({held['fraction']} of the documents, in {held['cache_dir']}; finished "
                   f"{'yes' if held['finished'] else 'no'})")
    if m.holdout_of:
        click.echo(f"holdout of   {m.holdout_of} ({m.holdout['fraction']} of its documents)")


def _holdout_status(cache_dir: Path, m: Manifest) -> dict | None:
    """The held-out cache of the cache at cache_dir in a few figures; None when it has none."""
    if not m.holdout or m.holdout_of:
        return None
    folder = cache_dir / HOLDOUT_DIR
    h = _existing_manifest(folder)
    t = h.totals() if h else {"chunks": 0, "sequences": 0, "tokens": 0}
    return {"fraction": m.holdout["fraction"], "cache_dir": str(folder), "chunks": t["chunks"],
            "sequences": t["sequences"], "tokens": t["tokens"], "finished": bool(h and h.finished)}


@main.command()
@click.option("--cache-dir", required=True, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--quarantine", is_flag=True, help="Move bad chunk files aside so `run --mode inverse` regenerates them.")
def verify(cache_dir, as_json, quarantine) -> None:
    """Check every chunk against the manifest and its checksum; exit 1 naming each bad chunk."""
    m = _existing_manifest(cache_dir)
    if m is None:
        raise _fail(f"{cache_dir} has no manifest (nothing packed there yet)")
    cache = open_cache(cache_dir)
    bad = []
    for entry in m.chunks:
        try:
            cache.read_chunk(entry.id)
        except CorruptChunk as e:
            bad.append({"chunk_id": entry.id, "file": entry.file, "reason": e.reason})
            if quarantine:
                cache.quarantine(entry.id)
    if as_json:
        click.echo(json.dumps({"chunks": len(m.chunks), "bad": bad, "ok": not bad}, indent=2))
    else:
        for b in bad:
            click.echo(f"bad chunk {b['chunk_id']} ({b['file']}): {b['reason']}")
        click.echo(f"{len(m.chunks) - len(bad)} of {len(m.chunks)} chunks ok")
    if bad:
        sys.exit(1)
