"""Stores on fsspec URLs (memory:// and file://): the pipeline through the CLI gives what a local path gives; the
lock, creation and indices on an object store; the checkpoints and training data a store records, relocated."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest

from projidx.models.checkpoints import MANIFEST
from projidx.store.feature_store import FeatureStore, WriterLock
from tests.conftest import save_npz
from tests.test_cli import assert_clean_error, run
from tests.test_reliability import arrays_of

FEATURIZE = ["--train-timesteps", "grid", "--timesteps", 2, "--proj-dim", 32, "--chunk-rows", 8]
MEMORY = fsspec.filesystem("memory")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """24 digits (ids 500..523), 3 queries, checkpoints, and a store at a local path with its retrac index and
    query results (``local.json``)."""
    from projidx.data.datasets import load_dataset

    d = tmp_path_factory.mktemp("built")
    digits = load_dataset("digits").subset(slice(0, 27))
    images = ((digits.images.numpy()[:, 0] + 1) * 127.5).round().astype(np.uint8)
    save_npz(d / "train.npz", images[:24], np.arange(500, 524))
    save_npz(d / "queries.npz", images[24:])
    run("train", "--data", d / "train.npz", "--out", d / "ck", "--epochs", 2, "--checkpoints", 2, "--width", 8)
    pipeline(d, d / "s.zarr", d / "local.json")
    return d


def pipeline(d: Path, store: str | Path, out: Path) -> None:
    """featurize, featurize again (a resume with nothing to do), index retrac, query with the index into ``out``."""
    featurize = ["featurize", "--checkpoints", d / "ck", "--data", d / "train.npz", "--store", store, *FEATURIZE]
    run(*featurize)
    run(*featurize)
    run("index", "--store", store, "--method", "retrac")
    run("query", "--store", store, "--data", d / "queries.npz", "--method", "retrac", "--top-k", 5, "--out", out)


def results(path: Path) -> list:
    return [(q["ids"], q["scores"]) for q in json.loads(path.read_text())["queries"]]


def memory_url() -> str:
    return f"memory://projidx-test-{uuid.uuid4().hex}/s.zarr"


def forget(url: str) -> None:
    """Remove a memory:// store and what lives next to it (the memory file system lasts as long as the process)."""
    root = "/" + url.removeprefix("memory://").split("/")[0]
    if MEMORY.exists(root):
        MEMORY.rm(root, recursive=True)


def path_of(url: str) -> str:
    """The memory file system's path of a memory:// URL."""
    return "/" + url.removeprefix("memory://")


@pytest.fixture(scope="module")
def on_memory(built):
    """The pipeline on a memory:// store (results in ``memory.json``)."""
    url = memory_url()
    pipeline(built, url, built / "memory.json")
    yield url
    forget(url)


@pytest.fixture()
def copy(on_memory):
    """A private copy of the memory:// store and its index."""
    url = memory_url()
    for suffix in ("", ".index"):
        MEMORY.copy(path_of(on_memory) + suffix, path_of(url) + suffix, recursive=True)
    yield url
    forget(url)


def store_files(store: Path) -> dict[str, bytes]:
    """Every file of a store by relative name; the root metadata without the store's uuid and digest."""
    files = {str(f.relative_to(store)): f.read_bytes() for f in sorted(store.rglob("*")) if f.is_file()}
    doc = json.loads(files["zarr.json"])
    for key in ("uuid", "digest"):
        del doc["attributes"]["projidx"][key]
    return {**files, "zarr.json": json.dumps(doc).encode()}


def test_the_cli_pipeline_on_a_memory_url_equals_a_local_path(built, on_memory):
    assert results(built / "memory.json") == results(built / "local.json")
    assert arrays_of(on_memory) == arrays_of(built / "s.zarr")
    info = json.loads(run("info", on_memory).output)
    assert info["chunks_done"] == {"ckpt-000": "3/3", "ckpt-001": "3/3"}
    assert info["bytes_on_disk"] == FeatureStore.open(built / "s.zarr").nbytes_on_disk()
    assert info["indices"]["retrac"]["recall"]["recall_at_10"] == 1.0
    assert MEMORY.exists(path_of(on_memory) + ".index/retrac.json")  # the index lives under the store's URL


def test_the_cli_pipeline_on_a_file_url_writes_what_a_local_path_gets(built, tmp_path):
    pipeline(built, f"file://{tmp_path}/s.zarr", tmp_path / "file.json")
    assert results(tmp_path / "file.json") == results(built / "local.json")
    assert store_files(tmp_path / "s.zarr") == store_files(built / "s.zarr")  # but for the uuid and digest
    sidecar = json.loads((tmp_path / "s.zarr.index" / "retrac.json").read_text())
    assert (tmp_path / "s.zarr.index" / sidecar["file"]).is_file() and (tmp_path / "s.zarr.lock").is_file()


def test_an_index_on_an_object_store_is_checked_and_on_disk_lists_are_refused(built, copy):
    index = path_of(copy) + ".index/" + json.loads(MEMORY.cat_file(path_of(copy) + ".index/retrac.json"))["file"]
    MEMORY.pipe_file(index, MEMORY.cat_file(index)[:100])
    r = run("query", "--store", copy, "--data", built / "queries.npz", "--method", "retrac", "--out",
            built / "r.json", ok=False)
    assert_clean_error(r, "is not the one its sidecar records", "projidx index")
    assert "is not the one" in json.loads(run("info", copy).output)["indices"]["retrac"]["error"]
    r = run("index", "--store", copy, "--method", "retrac", "--factory", "IVF2,Flat", "--on-disk", ok=False)
    assert_clean_error(r, "--on-disk needs a store on the local file system")


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_writer_lock_on_an_object_store(copy):
    index = ["index", "--store", copy, "--method", "retrac"]
    lock = path_of(copy) + ".lock"
    with WriterLock(copy):
        assert MEMORY.exists(lock)
        assert_clean_error(run(*index, ok=False), "is being written by pid", f"delete {copy}.lock")
    assert not MEMORY.exists(lock)  # released
    holder = {"pid": _dead_pid(), "host": socket.gethostname(), "since": "then", "command": "projidx featurize"}
    MEMORY.pipe_file(lock, json.dumps(holder).encode())
    run(*index)  # its process is gone from this host: taken over
    assert not MEMORY.exists(lock)
    MEMORY.pipe_file(lock, json.dumps({**holder, "host": "elsewhere"}).encode())
    assert_clean_error(run(*index, ok=False), "is being written by pid", "on elsewhere", f"delete {copy}.lock")


def test_an_interrupted_creation_on_an_object_store_is_replaced(on_memory, monkeypatch):
    import projidx.store.feature_store as store_module

    source = FeatureStore.open(on_memory)
    url = memory_url()
    real, calls = store_module.Location.write_bytes, []

    def dying(self, data):  # the upload dies before the root metadata, the last object
        calls.append(self.name)
        if self.name == "zarr.json":
            raise OSError(28, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(store_module.Location, "write_bytes", dying)
    with pytest.raises(OSError, match="No space"):
        FeatureStore.create(url, source.meta, source.ids())
    monkeypatch.undo()
    assert calls == [".projidx-creating", "zarr.json"]
    assert MEMORY.exists(path_of(url) + "/ids/zarr.json") and MEMORY.exists(path_of(url) + "/.projidx-creating")
    assert_clean_error(run("info", url, ok=False), "not a projidx store (no zarr.json)")
    created = FeatureStore.create(url, source.meta, source.ids())  # replaces the leftovers
    assert not created.is_complete() and created.damaged_arrays() == {} and created.uuid != source.uuid
    assert not MEMORY.exists(path_of(url) + "/.projidx-creating")
    forget(url)


def test_objects_projidx_did_not_write_are_not_taken_for_a_store(built):
    url = memory_url()
    MEMORY.pipe_file(path_of(url) + "/notes.txt", b"mine")
    r = run("featurize", "--checkpoints", built / "ck", "--data", built / "train.npz", "--store", url, ok=False)
    assert_clean_error(r, "holds objects but no zarr.json", "--store")
    assert MEMORY.cat_file(path_of(url) + "/notes.txt") == b"mine"
    forget(url)


@pytest.mark.parametrize(("url", "needle"), [("nosuch://bucket/s.zarr", "fsspec cannot open it"),
                                             ("memory://", "not its root")])
def test_urls_fsspec_cannot_use_are_one_line(url, needle):
    assert_clean_error(run("info", url, ok=False), needle)


def test_moved_checkpoints_and_training_data_are_given_at_query_time(built, tmp_path):
    """A store records where its checkpoints and training data were; --checkpoints and --train-data say where they
    are now, and are refused unless they are the store's."""
    url = memory_url()
    shutil.copytree(built / "ck", tmp_path / "ck")
    shutil.copy(built / "train.npz", tmp_path / "train.npz")
    run("featurize", "--checkpoints", tmp_path / "ck", "--data", tmp_path / "train.npz", "--store", url, *FEATURIZE)
    run("index", "--store", url, "--method", "retrac")
    (tmp_path / "ck").rename(tmp_path / "moved-ck")
    (tmp_path / "train.npz").rename(tmp_path / "moved.npz")
    query = ["query", "--store", url, "--data", built / "queries.npz", "--method", "retrac", "--top-k", 5,
             "--out", tmp_path / "r.json", "--png", tmp_path / "r.png"]
    assert_clean_error(run(*query, ok=False), "no manifest.json", "--checkpoints")
    shutil.copytree(tmp_path / "moved-ck", tmp_path / "other-ck")  # checkpoints that are not the store's
    manifest = json.loads((tmp_path / "other-ck" / MANIFEST).read_text())
    manifest["checkpoints"][1]["weight"] *= 2
    (tmp_path / "other-ck" / MANIFEST).write_text(json.dumps(manifest))
    assert_clean_error(run(*query, "--checkpoints", tmp_path / "other-ck", ok=False), "--checkpoints",
                       "are not the ones store")
    for command in (["validate", "--data", tmp_path / "moved.npz"], ["serve", "--port", 0],
                    ["analyze", "influence", "--data", built / "queries.npz", "--out", tmp_path / "a"],
                    ["analyze", "self-influence", "--out", tmp_path / "a"]):
        r = run(*command, "--store", url, "--checkpoints", tmp_path / "other-ck", ok=False)
        assert_clean_error(r, "--checkpoints", "are not the ones store")
    query += ["--checkpoints", tmp_path / "moved-ck"]
    assert_clean_error(run(*query, ok=False), "no such file", "--train-data")
    assert_clean_error(run(*query, "--train-data", built / "queries.npz", ok=False), "--train-data",
                       "is not the training data")
    assert not (tmp_path / "r.json").exists()
    run(*query, "--train-data", tmp_path / "moved.npz")
    assert results(tmp_path / "r.json") == results(built / "local.json")
    assert (tmp_path / "r.png").stat().st_size > 1000
    forget(url)
