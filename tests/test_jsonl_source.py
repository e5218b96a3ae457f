"""packerd's own .jsonl reader (pyarrow a block at a time, Python's json for a block pyarrow refuses) gives
the records datasets' json loader gave, and names what is wrong in one line."""
from __future__ import annotations

import json

import pytest

from packerd import source as source_mod
from packerd.source import Source, SourceError


def texts_of(path, **kw) -> list:
    return [t for _, t, _ in Source([str(path)], **kw).documents(0)]


def datasets_texts(path) -> list:
    import datasets
    ds = datasets.load_dataset("json", data_files=[str(path)], split="train", streaming=True)
    return [t or None for b in ds.iter(batch_size=64) for t in b["text"]]


def test_records_match_datasets_across_blocks_and_mixed_fields(tmp_path, monkeypatch):
    monkeypatch.setattr(source_mod, "JSONL_BLOCK", 300)  # many blocks from a small file
    lines = []
    for i in range(200):
        meta = {"a": i} if i % 3 else str(i)  # a field of mixed types: pyarrow refuses those blocks
        text = "" if i % 17 == 0 else None if i % 19 == 0 else f"doc {i} \u00e9\U0001F600 " + "x" * (i % 50)
        lines.append(json.dumps({"meta": meta, "text": text}))
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    got = texts_of(path)
    assert len(got) == 200
    assert got == datasets_texts(path)


def test_blank_lines_are_not_records(tmp_path, monkeypatch):
    monkeypatch.setattr(source_mod, "JSONL_BLOCK", 20)
    path = tmp_path / "blank.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b", "n": 1}\n   \n{"text": "c", "n": "x"}\n\n')
    assert texts_of(path) == ["a", "b", "c"]


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\nnot json\n', "is not valid JSON"),
    ('{"text": 5}\n', "is a int, not text"),
    ('{"body": "x"}\n', "has no field 'text'"),
    ('["text"]\n', "has no field 'text'"),
    ('{"text": "lone \\udc00 here"}\n', "lone surrogate"),
])
def test_bad_records_are_one_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(SourceError, match=message):
        texts_of(path)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(SourceError, match="not UTF-8"):
        texts_of(path)
