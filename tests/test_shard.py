"""`packerd run --shard I/N` through the real CLI: N packer processes running at once, each into its own cache,
pack every source document exactly once between them (many files, one file, an `hf:` dataset split by its
own shards or record by record, with --holdout); the shard spec is fixed for the life of a cache; the manifest
records the endpoint a subscriber connects to; launch/cluster/pack-shard.sh (the Kubernetes and SLURM examples'
command) does the same with the scheduler's index variable."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import xxhash

from conftest import ROOT, free_endpoint, free_port, run_packerd, write_jsonl
from packerd.cli import connect_address
from packerd.shard import DOCUMENTS, FILE_HASH, SHARD_SEED, WHOLE, Shard
from packerd.source import Source
from shared.cache import open_cache
from shared.manifest import HOLDOUT_DIR, load_manifest
from shared.protocol import Subscriber
from test_bad_inputs import check_error, snapshot, written
from test_packerd import reference_documents

PACK = ["--seq-len", "64", "--chunk-sequences", "16", "--workers", "1"]


def documents(caches: list[Path]) -> Counter:
    """Every document of the caches (and of their held-out caches), as token tuples, counted."""
    out = Counter()
    for cache in caches:
        for folder in (cache, cache / HOLDOUT_DIR):
            if folder.is_dir():
                out.update(tuple(d.tolist()) for d in open_cache(folder).iter_documents())
    return out


def source_documents(texts: list[str], tokenizer_dir) -> Counter:
    return Counter(tuple(d.tolist()) for d in reference_documents(texts, tokenizer_dir))


def pack_shards(tmp: Path, n: int, source: str, tokenizer_dir, extra=()) -> list[Path]:
    """n real packers, shards 0/n .. n-1/n of `source`, started together; their cache folders."""
    caches = [tmp / f"cache-{i}" for i in range(n)]
    procs = [subprocess.Popen([sys.executable, "-m", "packerd", "run", "--cache-dir", str(caches[i]), "--source", source,
                               "--tokenizer", str(tokenizer_dir), *PACK, "--endpoint", f"ipc://{tmp}/p{i}.sock",
                               "--shard", f"{i}/{n}", *extra], cwd=ROOT, stderr=subprocess.PIPE, text=True)
             for i in range(n)]
    for i, p in enumerate(procs):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, f"shard {i}/{n} exited {p.returncode}:\n{err}"
    return caches


def spread(texts: list[str], parts: int) -> list[list[str]]:
    return [texts[k::parts] for k in range(parts)]


@pytest.fixture(scope="module")
def tree(tmp_path_factory, corpus_texts) -> Path:
    """Ten files in nested folders (some with the same name in different folders), the corpus spread over them."""
    root = tmp_path_factory.mktemp("tree")
    for k, part in enumerate(spread(corpus_texts, 10)):
        folder = root / ("a" if k % 2 else "b") / ("deep" if k % 3 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        write_jsonl(folder / f"part{k // 2}.jsonl", part)
    return root


def test_many_files_go_whole_to_the_shard_their_path_hash_names(tmp_path, tree, corpus_texts, tokenizer_dir):
    n = 3
    caches = pack_shards(tmp_path, n, str(tree), tokenizer_dir)
    assert documents(caches) == source_documents(corpus_texts, tokenizer_dir)
    every = sorted(p for p in tree.rglob("*.jsonl"))
    for i, cache in enumerate(caches):
        m = load_manifest(cache)
        assert m.shard == {"spec": f"{i}/{n}", "files": "whole", "hash": FILE_HASH} and m.finished
        assert m.endpoint == f"ipc://{tmp_path}/p{i}.sock"  # not a wildcard bind: recorded as given
        # the rule, computed here from its definition: xxh64 of the path relative to the source folder
        want = [str(p) for p in every
                if xxhash.xxh64_intdigest(p.relative_to(tree).as_posix().encode(), seed=SHARD_SEED) % n == i]
        assert sorted(f["path"] for f in m.source_files) == want


def test_one_file_is_split_record_by_record_and_combines_with_holdout(tmp_path, corpus_jsonl, corpus_texts,
                                                                      tokenizer_dir):
    n = 3
    caches = pack_shards(tmp_path, n, str(corpus_jsonl), tokenizer_dir, ["--holdout", "0.2"])
    assert documents(caches) == source_documents(corpus_texts, tokenizer_dir)
    for i, cache in enumerate(caches):
        main, held = load_manifest(cache), load_manifest(cache / HOLDOUT_DIR)
        assert main.shard == held.shard == {"spec": f"{i}/{n}", "files": "documents", "hash": FILE_HASH}
        assert main.documents == len(corpus_texts[i::n]) == held.documents  # both count the shard's records
        assert held.total_tokens > 0  # the holdout took some of each shard's documents
        shard_docs = source_documents(corpus_texts[i::n], tokenizer_dir)
        assert documents([cache]) == shard_docs  # record j of the file went to shard j mod n


@pytest.mark.parametrize("files,n", [(4, 2), (2, 3)], ids=["dataset-shards", "record-by-record"])
def test_hf_dataset_is_split_by_its_own_shards_or_by_record(tmp_path, corpus_texts, tokenizer_dir, files, n):
    """An `hf:` source read through datasets.load_dataset(..., streaming=True): a local dataset folder, as
    the hub is out of reach here; the same code path as a hub name."""
    data = tmp_path / "dataset" / "data"
    data.mkdir(parents=True)
    for k, part in enumerate(spread(corpus_texts, files)):
        write_jsonl(data / f"train-{k:05d}.jsonl", part)
    caches = pack_shards(tmp_path, n, f"hf:{data.parent}", tokenizer_dir)
    assert documents(caches) == source_documents(corpus_texts, tokenizer_dir)
    per_cache = [documents([c]) for c in caches]
    if files >= n:  # datasets' shard(): contiguous blocks of its files, each read by one packer
        whole = [source_documents(p, tokenizer_dir) for p in spread(corpus_texts, files)]
        assert per_cache == [whole[0] + whole[1], whole[2] + whole[3]]


def test_a_restart_with_another_shard_is_refused(tmp_path, corpus_texts, tokenizer_dir):
    src = write_jsonl(tmp_path / "docs.jsonl", corpus_texts[:8])
    cache, endpoint = tmp_path / "cache", free_endpoint(tmp_path)
    args = ["run", "--cache-dir", cache, "--endpoint", endpoint, *PACK]
    run_packerd(*args, "--source", src, "--tokenizer", tokenizer_dir, "--shard", "0/2")
    before = snapshot(tmp_path)
    for spec in ("1/2", "0/3"):
        proc = run_packerd(*args, "--shard", spec, check=False)
        line = check_error(proc.stderr, proc.returncode, "error")
        assert f"shard '0/2' (now '{spec}')" in line
    assert written(before, snapshot(tmp_path)) == ([], [], [])
    # without --shard the restart continues as the manifest's shard (here: nothing left to do)
    proc = run_packerd(*args)
    assert "is finished" in proc.stderr and load_manifest(cache).shard["spec"] == "0/2"


def test_the_file_rule_is_decided_once_and_kept(tmp_path, corpus_texts):
    """Fewer files than shards: split by record; the rule a manifest recorded stays when more files appear."""
    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "a.jsonl", corpus_texts[:10])
    first = Source([str(src)], shard=Shard.parse("1/2"))
    assert first.shard.files == DOCUMENTS and len(first.files) == 1
    for name in ("b", "c"):
        write_jsonl(src / f"{name}.jsonl", corpus_texts[10:20])
    again = Source([str(src)], shard=Shard.parse("1/2", first.shard.record()["files"]))
    assert again.shard.files == DOCUMENTS and len(again.files) == 3  # every file, split by record
    fresh = Source([str(src)], shard=Shard.parse("1/2"))  # a new cache: whole files, by the path hash
    mine = [f"{n}.jsonl" for n in "abc" if xxhash.xxh64_intdigest(f"{n}.jsonl".encode(), seed=SHARD_SEED) % 2 == 1]
    assert fresh.shard.files == WHOLE and [Path(f.path).name for f in fresh.files] == mine


def test_a_wildcard_bind_is_recorded_with_the_host_name(tmp_path, corpus_texts, tokenizer_dir):
    """tcp://*:PORT binds every interface; the manifest says where to connect, and a subscriber there hears."""
    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "a.jsonl", corpus_texts[:4])
    cache, port = tmp_path / "cache", free_port()
    proc = subprocess.Popen([sys.executable, "-m", "packerd", "run", "--cache-dir", str(cache), "--source", str(src),
                             "--tokenizer", str(tokenizer_dir), *PACK, "--endpoint", f"tcp://*:{port}", "--follow"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (cache / "manifest.json").exists():  # the first commit writes it
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, f"no {cache / 'manifest.json'} within 60 s (the packer's first commit)"
            time.sleep(0.1)
        endpoint = load_manifest(cache).endpoint
        host = endpoint[len("tcp://"):].rpartition(":")[0]
        assert endpoint.endswith(f":{port}") and host in (socket.getfqdn(), socket.gethostname()), endpoint
        sub = Subscriber(endpoint)
        try:
            heard, deadline = [], time.monotonic() + 60
            while not heard:  # a heartbeat comes every second
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, f"no message heard on {endpoint} within 60 s"
                heard = sub.poll(1000)
        finally:
            sub.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0


@pytest.mark.parametrize("variable", ["JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID"])
def test_the_launch_script_packs_each_document_once(tmp_path, tree, corpus_texts, tokenizer_dir, variable):
    """launch/cluster/pack-shard.sh, the command of launch/cluster/k8s-packers.yaml and slurm-pack.sbatch, for N=2
    processes at once with the scheduler's index variable set; a wildcard bind on a port of each's own."""
    n, ports = 2, [free_port(), free_port()]
    env = {k: v for k, v in os.environ.items() if k not in ("JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID")}
    env.update(SHARDS=str(n), CACHE_ROOT=str(tmp_path), SOURCE=str(tree), TOKENIZER=str(tokenizer_dir),
               PYTHON=sys.executable)
    procs = [subprocess.Popen(["sh", "launch/cluster/pack-shard.sh", *PACK], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                              env={**env, variable: str(i), "PORT": str(ports[i])}) for i in range(n)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    caches = [tmp_path / f"cache-{i}" for i in range(n)]
    assert documents(caches) == source_documents(corpus_texts, tokenizer_dir)
    for i, cache in enumerate(caches):
        m = load_manifest(cache)
        assert m.shard["spec"] == f"{i}/{n}" and m.endpoint.endswith(f":{ports[i]}") and "*" not in m.endpoint


@pytest.mark.parametrize("bind,connect", [
    ("tcp://127.0.0.1:5557", "tcp://127.0.0.1:5557"), ("tcp://10.1.2.3:6000", "tcp://10.1.2.3:6000"),
    ("tcp://*:5557", "tcp://HOST:5557"), ("tcp://0.0.0.0:5557", "tcp://HOST:5557"), ("tcp://[::]:7", "tcp://HOST:7"),
    ("ipc:///run/p.sock", "ipc:///run/p.sock"), ("ipc://p.sock", "ipc://CWD/p.sock"), ("ipc://@p", "ipc://@p")])
def test_the_recorded_endpoint_is_where_a_subscriber_connects(bind, connect):
    host = connect_address("tcp://*:1")[len("tcp://"):-len(":1")]
    assert host in (socket.getfqdn(), socket.gethostname()) and host not in ("*", "")
    assert connect_address(bind) == connect.replace("HOST", host).replace("CWD", os.getcwd())


def test_manifest_shard_and_endpoint_are_optional(tmp_path, make_cache):
    cache = make_cache()
    raw = json.loads((cache / "manifest.json").read_text())
    assert "shard" not in raw  # an unsharded cache has no shard field
    assert raw["endpoint"] == free_endpoint(tmp_path)
    old = load_manifest(cache).to_json()
    del old["endpoint"]  # a manifest written before the field: read as no endpoint, no shard
    for name in ("manifest.json", "manifest.log"):
        (cache / name).unlink()
    (cache / "manifest.json").write_text(json.dumps(old))
    m = load_manifest(cache)
    assert m.endpoint is None and m.shard is None and len(m.chunks) == len(old["chunks"]["id"]) > 0
