"""Source documents in a fixed order, each with a global index.

A source spec is `hf:NAME[:CONFIG[:SPLIT]]`, `builtin:pydoc`, `builtin:stdlib`, or a local file, folder or glob of
.jsonl/.json/.parquet/.txt files. Local files are read through datasets' own loaders (streaming), .jsonl
through pyarrow directly (Source._jsonl_records), in the order: the files the manifest already lists, then
new ones sorted by path. A `.txt` file is one document. Records are numbered across all specs; the packer's
restart point is such a number. With a shard (`--shard I/N`, packerd/shard.py) only the shard's own files and
records are read and numbered.

Bad input policy (documented in the README):
- a missing or unreadable source, invalid JSON, non-UTF-8 bytes, a missing text field: SourceError,
  which the CLI turns into a one-line error and a non-zero exit; what was committed stays committed.
- an empty document (text "" or null): skipped and counted in the manifest (`skipped.empty`), with a
  warning; it has no tokens to lose.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import os
import sys
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterator

from shared.builtin import BUILTIN_SOURCES

from .shard import WHOLE, Shard

log = logging.getLogger("packerd")

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
DEFAULT_HF = "hf:HuggingFaceFW/fineweb-edu:sample-10BT:train"
READ_BATCH = 256  # records per datasets batch
JSONL_BLOCK = 4 << 20  # bytes of a .jsonl file parsed at once (then to the end of the line)


class SourceError(ValueError):
    pass


@dataclass
class SourceFile:
    path: str
    size: int            # bytes on disk
    units: float         # the size in the unit progress is measured in (bytes; rows for parquet)
    docs: int | None = None  # records in the file, once fully read

    def to_json(self) -> dict:
        return {"path": self.path, "size": self.size, "units": self.units, "docs": self.docs}


def _quiet_datasets():
    import datasets
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    datasets.disable_progress_bars()
    # load_dataset pings the hub (timeout 3 s) to count downloads of the "json"/"parquet" loader itself:
    # a network round trip per local file, and a 3 s stall per file where packets are dropped
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    return datasets


def keep_torch_out() -> None:
    """Stop datasets from importing torch, which the packer never uses.

    Every streaming IterableDataset imports torch when it is installed (to share its epoch counter with
    DataLoader workers): 1.6 s of start-up and about 170 MB of resident memory in the packer process.
    Called by the packerd command only, so a library user that does use torch keeps datasets' default."""
    if "torch" not in sys.modules:
        os.environ["USE_TORCH"] = "0"  # read when datasets is first imported
        if "datasets" in sys.modules:
            sys.modules["datasets"].config.TORCH_AVAILABLE = False


def parse_hf(spec: str) -> tuple[str, str | None, str]:
    parts = spec[3:].split(":")
    if not parts[0]:
        raise SourceError(f"source {spec!r}: expected hf:NAME[:CONFIG[:SPLIT]]")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return name, config, split


def expand_local(spec: str, must_exist: bool = True) -> list[tuple[str, str]]:
    """The spec's files, sorted: each as (resolved path, path relative to the spec's root folder)."""
    p = Path(spec)
    if any(ch in spec for ch in "*?["):
        files = sorted(glob.glob(spec, recursive=True))
    elif p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.is_file())
    elif p.exists():
        files = [str(p)]
    else:
        raise SourceError(f"source {spec!r} does not exist")
    files = [f for f in files if Path(f).suffix.lower() in LOCAL_FORMATS and not Path(f).name.startswith(".")]
    if p.is_file() and not files:
        raise SourceError(f"source {spec!r}: unsupported file type (use .jsonl, .json, .parquet or .txt)")
    if not files and must_exist:
        raise SourceError(f"source {spec!r} has no .jsonl, .json, .parquet or .txt files")
    for f in files:
        if not os.access(f, os.R_OK):
            raise SourceError(f"source file {f} is not readable")
    root = os.path.abspath(_root(spec))
    return [(str(Path(f).resolve()), Path(os.path.relpath(os.path.abspath(f), root)).as_posix()) for f in files]


def _root(spec: str) -> str:
    """The folder a spec's paths are taken relative to (the shard hash reads them): the folder itself, a
    glob's leading folders before its first wildcard, or a single file's folder. Unresolved, so a data
    folder that is a link on one machine and not on another gives the same relative paths."""
    wild = next((i for i, ch in enumerate(spec) if ch in "*?["), None)
    if wild is not None:
        return os.path.dirname(spec[:wild]) or "."
    return spec if Path(spec).is_dir() else (os.path.dirname(spec) or ".")


def _size_units(path: str) -> tuple[int, float]:
    size = os.path.getsize(path)
    if path.lower().endswith(".parquet"):
        import pyarrow.parquet as pq
        try:
            return size, float(pq.ParquetFile(path).metadata.num_rows)
        except Exception as e:
            raise SourceError(f"source file {path} is not a readable parquet file: {e}") from None
    return size, float(size)


class Source:
    """All documents of the given specs, in order; knows its files and how to estimate its size."""

    def __init__(self, specs: list[str], text_field: str = "text", known_files: list[dict] | None = None,
                 shard: Shard | None = None):
        if not specs:
            raise SourceError("no source given (use --source)")
        self.specs = list(specs)
        self.text_field = text_field
        self.shard = shard
        self.files: list[SourceFile] = [SourceFile(**f) for f in (known_files or [])]
        self._paths = {f.path for f in self.files}
        self._file_units = sum(f.units for f in self.files)  # kept as files come: asked at every commit
        # indexes of self.files added or given their record count, in order: each manifest that lists the
        # files copies the entries it has not seen yet (a commit costs the files that changed, not all)
        self.changed: list[int] = []
        self.hf_rows: dict[str, int | None] = {}
        self.builtin_units: dict[str, int] = {}
        for spec in self.specs:
            if spec.startswith("hf:"):
                parse_hf(spec)
        local = self._local_files(must_exist=True)
        if shard is not None:
            shard.decide(len(local))  # a cache's first run decides; later runs bring the manifest's choice
        for path, rel in local:
            if self._mine(rel):
                self._add_file(path)
        if shard is not None and shard.files == WHOLE and local and not self.files:
            log.warning("shard %s packs none of the %d local files: whole files go to shards by a hash of "
                        "their path, and none of these falls in this shard", shard, len(local))
        for f in self.files:
            if not os.path.exists(f.path):
                raise SourceError(f"source file {f.path} was packed before and is now missing")

    def _local_files(self, must_exist: bool) -> list[tuple[str, str]]:
        """(path, relative path) of every local file of the specs, each once: a file two specs match keeps
        the relative path of the first, so every shard hashes the same path for it."""
        seen: dict[str, str] = {}
        for spec in self.specs:
            if not spec.startswith("hf:") and spec not in BUILTIN_SOURCES:
                for path, rel in expand_local(spec, must_exist):
                    seen.setdefault(path, rel)
        return list(seen.items())

    def _mine(self, rel: str) -> bool:
        """Whether this packer reads the local file at `rel`: always, unless whole files are sharded."""
        return self.shard is None or self.shard.files != WHOLE or self.shard.owns_file(rel)

    def _add_file(self, path: str) -> bool:
        if path in self._paths:
            return False
        size, units = _size_units(path)
        self.files.append(SourceFile(path=path, size=size, units=units))
        self._paths.add(path)
        self._file_units += units
        self.changed.append(len(self.files) - 1)
        return True

    def rescan(self) -> int:
        """Pick up files that appeared in source folders (follow mode); returns how many are new."""
        return sum(self._add_file(path) for path, rel in self._local_files(must_exist=False) if self._mine(rel))

    def _every_nth(self, records: Iterator) -> Iterator:
        """The shard's share of a stream whose records are split one by one: record j goes to shard j mod N.
        The records of other shards are still read (and checked): that is the cost of having too few files."""
        return islice(records, self.shard.index, None, self.shard.count) if self.shard else records

    @property
    def has_hf(self) -> bool:
        return any(s.startswith("hf:") for s in self.specs)

    # -- documents -----------------------------------------------------------------------------
    def documents(self, start: int = 0) -> Iterator[tuple[int, str | None, float]]:
        """(index, text, progress units) from record `start` on; text None marks an empty record.

        Local files are read in the order of self.files, which may grow while iterating (follow mode)."""
        index = 0
        for spec in self.specs:
            if spec.startswith("hf:"):
                it = self._hf_records(spec)
                index = yield from self._numbered(it, index, start, lambda text: 1.0)
            elif spec in BUILTIN_SOURCES:
                it = self._every_nth(iter(BUILTIN_SOURCES[spec]()))
                index = yield from self._numbered(it, index, start, lambda text: float(len(text.encode())))
        i = 0
        while i < len(self.files):
            f = self.files[i]
            if f.docs is not None and index + f.docs <= start:
                index += f.docs  # the whole file lies before the restart point: skip without reading
            else:
                first = index
                unit = (lambda text: 1.0) if f.path.endswith(".parquet") else (lambda text: float(len(text.encode())) if text else 0.0)
                records = self._file_records(f.path)
                if self.shard and self.shard.files != WHOLE:
                    records = self._every_nth(records)
                index = yield from self._numbered(records, index, start, unit)
                f.docs = index - first
                self.changed.append(i)
            i += 1

    def _numbered(self, records, index: int, start: int, unit):
        for text in records:
            if index >= start:
                yield index, text, unit(text) if text else 0.0
            index += 1
        return index

    def _check(self, text, where: str):
        if text is None or text == "":
            return None
        if not isinstance(text, str):
            raise SourceError(f"{where}: field {self.text_field!r} is a {type(text).__name__}, not text")
        return text

    def _file_records(self, path: str) -> Iterator[str | None]:
        if os.path.getsize(path) == 0:
            raise SourceError(f"source file {path} is empty")
        fmt = LOCAL_FORMATS[Path(path).suffix.lower()]
        if path.lower().endswith(".jsonl"):
            yield from self._jsonl_records(path)
            return
        datasets = _quiet_datasets()
        kwargs = {"sample_by": "document"} if fmt == "text" else {}
        field = "text" if fmt == "text" else self.text_field
        where = f"source file {path}"
        try:
            ds = datasets.load_dataset(fmt, data_files=[path], split="train", streaming=True, **kwargs)
            # column batches: converting row by row to dicts cost the packer a fifth of a core
            for batch in ds.iter(batch_size=READ_BATCH):
                if field not in batch:
                    raise SourceError(f"{where}: record has no field {field!r} (fields: {', '.join(sorted(batch))}); use --text-field")
                for text in batch[field]:
                    yield self._check(text, where)
        except SourceError:
            raise
        except UnicodeDecodeError as e:
            raise SourceError(f"{where} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SourceError(f"{where} cannot be read: {msg}") from None

    def _jsonl_records(self, path: str) -> Iterator[str | None]:
        """The text field of each record of a .jsonl file, parsed a block at a time by pyarrow's JSON reader.

        datasets' json loader parses every record twice (ujson, for its mixed-type check, then pyarrow) and
        hands rows through several Python layers: 20 times the CPU of this, and at tiktoken's speed it was
        most of packerd's main thread. The records are the same (blank lines skipped, as pyarrow does). A
        block pyarrow refuses (a field of mixed types, bad JSON or UTF-8, a lone surrogate) is read again
        line by line by Python's json, which either reads it or names what is wrong."""
        import pyarrow as pa
        import pyarrow.json as paj
        where = f"source file {path}"
        try:
            with open(path, "rb") as f:
                while block := f.read(JSONL_BLOCK):
                    block += f.readline()
                    try:
                        table = paj.read_json(io.BytesIO(block), read_options=paj.ReadOptions(
                            use_threads=False, block_size=len(block) + 1))  # threads would take the tokenizers' cores
                        column = table.column(self.text_field) if self.text_field in table.column_names else None
                    except pa.ArrowInvalid:
                        column = None
                    if column is not None and (pa.types.is_string(column.type) or pa.types.is_null(column.type)):
                        yield from (self._check(t, where) for t in column.to_pylist())
                    else:
                        yield from self._json_lines(block, where)
        except UnicodeDecodeError as e:
            raise SourceError(f"{where} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise SourceError(f"{where} cannot be read: {e.strerror}") from None

    def _json_lines(self, block: bytes, where: str) -> Iterator[str | None]:
        for line in block.splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SourceError(f"{where} is not valid JSON ({e.msg}: {line[:60]!r})") from None
            if not isinstance(record, dict) or self.text_field not in record:
                fields = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
                raise SourceError(f"{where}: record has no field {self.text_field!r} (fields: {fields}); use --text-field")
            text = self._check(record[self.text_field], where)
            if text is not None:
                try:
                    text.encode()
                except UnicodeEncodeError:
                    raise SourceError(f"{where}: a record's text has a lone surrogate ({text[:40]!r}...), "
                                      f"which is not Unicode text") from None
            yield text

    def _hf_records(self, spec: str) -> Iterator[str | None]:
        datasets = _quiet_datasets()
        name, config, split = parse_hf(spec)
        try:
            ds = datasets.load_dataset(name, config, split=split, streaming=True)
            ds, by_record = self._hf_shard(ds, spec)
            texts = self._hf_texts(ds, spec)
            yield from self._every_nth(texts) if by_record else texts
        except SourceError:
            raise
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SourceError(f"source {spec} cannot be loaded: {msg}") from None

    def _hf_shard(self, ds, spec: str):
        """(dataset, split by record): the shard's part of a streaming dataset. Its own shards (blocks of
        its files, each read by one packer only) when it has at least N; otherwise all of it, to be split
        record by record."""
        if self.shard is None:
            return ds, False
        n = ds.num_shards
        if n < self.shard.count:
            log.info("shard %s of %s: split record by record (the dataset has %d file shard(s), fewer than %d)",
                     self.shard, spec, n, self.shard.count)
            return ds, True
        log.info("shard %s of %s: the dataset's own shards (%d files in all)", self.shard, spec, n)
        return ds.shard(num_shards=self.shard.count, index=self.shard.index), False

    def _hf_texts(self, ds, spec: str) -> Iterator[str | None]:
        for batch in ds.iter(batch_size=READ_BATCH):
            if self.text_field not in batch:
                raise SourceError(f"source {spec}: record has no field {self.text_field!r} (fields: {', '.join(sorted(batch))}); use --text-field")
            for text in batch[self.text_field]:
                yield self._check(text, f"source {spec}")

    # -- size estimate -------------------------------------------------------------------------
    def total_units(self) -> tuple[float | None, str]:
        """The whole source's size in progress units (the shard's share of it), and where that came from."""
        # a shard reads about 1/N of every source it splits by record or by the dataset's shards
        share = 1.0 / self.shard.count if self.shard else 1.0
        total = 0.0
        for spec in self.specs:
            if spec.startswith("hf:"):
                rows = self._hf_num_rows(spec)
                if rows is None:
                    return None, "unknown"
                total += rows * share
            elif spec in BUILTIN_SOURCES:
                if spec not in self.builtin_units:  # read once: the estimate is asked at every commit
                    self.builtin_units[spec] = sum(len(t.encode()) for t in BUILTIN_SOURCES[spec]())
                total += self.builtin_units[spec] * share
        whole = self.shard is None or self.shard.files == WHOLE  # files listed are then read in full
        total += self._file_units * (1.0 if whole else share)
        method = "dataset-metadata" if self.has_hf else "file-sizes"
        return total, method

    def _hf_num_rows(self, spec: str) -> int | None:
        if spec not in self.hf_rows:
            datasets = _quiet_datasets()
            name, config, split = parse_hf(spec)
            rows = None
            try:
                info = datasets.load_dataset_builder(name, config).info
                if info.splits and split in info.splits:
                    rows = info.splits[split].num_examples or None
            except Exception as e:  # metadata is optional; the estimate falls back
                log.warning("no size metadata for %s: %s", spec, str(e).splitlines()[0] if str(e) else e)
            self.hf_rows[spec] = rows
        return self.hf_rows[spec]
