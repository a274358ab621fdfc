"""Issue 'Reliability': every probe of the battery either repairs by the command its error names or is one
line and a non-zero exit; no silent wrong answer, no traceback, no partial file."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from projidx.files import file_sha256
from projidx.models.checkpoints import MANIFEST
from projidx.store.feature_store import FeatureStore, WriterLock
from tests.conftest import save_npz
from tests.test_cli import assert_clean_error, run, tree_digest


def arrays_of(store: Path) -> dict[str, bytes]:
    """Every array's contents (decoded), to compare stores whatever the chunk files' bytes."""
    fs = FeatureStore.open(store)
    names = ["ids"] + [f"{a}/{c}" for c in fs.meta.checkpoint_ids
                       for a in ("features", "norms", "mean_norms", "timesteps", "losses", "done")]
    return {name: np.asarray(fs.group[name][:]).tobytes() for name in names}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """24 digits as a uint8 .npz with ids 500..523."""
    from projidx.data.datasets import load_dataset

    d = load_dataset("digits").subset(slice(0, 24))
    images = ((d.images.numpy()[:, 0] + 1) * 127.5).round().astype(np.uint8)
    return save_npz(tmp_path_factory.mktemp("data") / "train.npz", images, np.arange(500, 524))


@pytest.fixture(scope="module")
def built(tmp_path_factory, digits) -> Path:
    """train -> featurize (replay, 3 chunks) -> index retrac and tracin, once."""
    d = tmp_path_factory.mktemp("built")
    run("train", "--data", digits, "--out", d / "ck", "--epochs", 2, "--checkpoints", 2, "--width", 8)
    run("featurize", "--checkpoints", d / "ck", "--data", digits, "--store", d / "s.zarr",
        "--train-timesteps", "replay", "--proj-dim", 32, "--chunk-rows", 8)
    for method in ("retrac", "tracin"):
        run("index", "--store", d / "s.zarr", "--method", method)
    return d


@pytest.fixture()
def copy(tmp_path, built) -> Path:
    """A private copy of the built store, index and checkpoints."""
    for name in ("ck", "s.zarr", "s.zarr.index"):
        shutil.copytree(built / name, tmp_path / name)
    return tmp_path


def featurize_args(d: Path, data: Path, *extra) -> list:
    return ["featurize", "--checkpoints", d / "ck", "--data", data, "--store", d / "s.zarr", "--train-timesteps",
            "replay", "--proj-dim", 32, "--chunk-rows", 8, *extra]


def query(d: Path, data: Path, method: str = "retrac", ok: bool = False, *extra):
    return run("query", "--store", d / "s.zarr", "--data", data, "--method", method, "--limit", 3,
               "--out", d / "r.json", *extra, ok=ok)


# ---- repair by re-running ------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["half-written", "bit-flip"])
def test_a_damaged_done_record_is_repaired_by_featurize(copy, digits, damage):
    before = arrays_of(copy / "s.zarr")
    record = copy / "s.zarr" / "done" / "ckpt-001" / "c" / "1"
    raw = bytearray(record.read_bytes())
    if damage == "half-written":
        raw = raw[: len(raw) // 2]
    else:
        raw[0] ^= 0x10
    record.write_bytes(bytes(raw))
    assert_clean_error(query(copy, digits, "retrac", False, "--exact"), "done record", "re-run 'projidx featurize'")
    run(*featurize_args(copy, digits))
    assert arrays_of(copy / "s.zarr") == before
    query(copy, digits, "retrac", True, "--exact")


def test_a_bit_flip_in_ids_is_repaired_by_featurize(copy, digits):
    before = arrays_of(copy / "s.zarr")
    chunk = copy / "s.zarr" / "ids" / "c" / "1"
    raw = bytearray(chunk.read_bytes())
    raw[3] ^= 0x01
    chunk.write_bytes(bytes(raw))
    assert_clean_error(query(copy, digits, "retrac", False, "--exact"), "ids array", "re-run 'projidx featurize'")
    run(*featurize_args(copy, digits))
    assert arrays_of(copy / "s.zarr") == before


def test_tampered_array_metadata_is_rebuilt_by_featurize(copy, digits):
    before = arrays_of(copy / "s.zarr")
    meta = copy / "s.zarr" / "norms" / "ckpt-000" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["shape"] = [7, 1]
    meta.write_text(json.dumps(doc))
    assert_clean_error(query(copy, digits, "retrac", False, "--exact"), "norms/ckpt-000", "damaged",
                       "re-run 'projidx featurize'")
    (copy / "s.zarr" / "features" / "ckpt-001" / "zarr.json").write_text("{not json")
    run(*featurize_args(copy, digits))
    assert arrays_of(copy / "s.zarr") == before


@pytest.mark.parametrize("fail_at", [1, 6, 13])  # 13 arrays: ids + 6 per checkpoint
def test_an_interrupted_creation_leaves_nothing_behind(tmp_path, built, digits, monkeypatch, fail_at):
    import projidx.store.feature_store as store_module

    calls, real = [], store_module._array

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(store_module, "_array", dying)
    store = tmp_path / "new.zarr"
    args = ["featurize", "--checkpoints", built / "ck", "--data", digits, "--store", store, "--proj-dim", 16,
            "--timesteps", 2]
    assert_clean_error(run(*args, ok=False), "no space left on device", "re-run the same command")
    assert not store.exists()
    monkeypatch.undo()
    run(*args)
    assert FeatureStore.open(store).is_complete()
    assert not list(tmp_path.glob(".new.zarr.creating-*"))


# ---- content bound to its place --------------------------------------------------------------------------

def test_a_chunk_object_copied_into_another_row_chunk_is_caught_and_recomputed(copy, digits):
    before = arrays_of(copy / "s.zarr")
    for array in ("features", "norms", "mean_norms", "timesteps", "losses"):
        folder = copy / "s.zarr" / array / "ckpt-000" / "c"
        src = next(folder.glob("0*")) if (folder / "0").is_file() else folder / "0"
        dst = folder / "2"
        if src.is_dir():
            shutil.rmtree(dst)
            shutil.copytree(src, dst)
        else:
            shutil.copy(src, dst)
    assert_clean_error(query(copy, digits, "retrac", False, "--exact"), "chunk 2", "does not match its done record")
    run(*featurize_args(copy, digits))
    assert arrays_of(copy / "s.zarr") == before


def test_edited_losses_are_caught_by_the_done_record_and_recomputed(copy, digits):
    """DAS's residuals are part of a chunk's content: losses rewritten with valid checksums fail the done record."""
    before = arrays_of(copy / "s.zarr")
    store = FeatureStore.open(copy / "s.zarr", mode="r+")
    assert store.meta.losses
    array = store.group["losses/ckpt-001"]
    array[8:16] = np.asarray(array[8:16]) * 2
    assert_clean_error(query(copy, digits, "retrac", False, "--exact"), "chunk 1", "does not match its done record")
    run(*featurize_args(copy, digits))
    assert arrays_of(copy / "s.zarr") == before


def test_edited_root_metadata_is_refused(copy, digits):
    root = copy / "s.zarr" / "zarr.json"
    doc = json.loads(root.read_text())
    doc["attributes"]["projidx"]["n"] = 16
    root.write_text(json.dumps(doc))
    assert_clean_error(query(copy, digits, "retrac", False, "--exact"), "does not match its digest", "rm -r")
    assert_clean_error(run(*featurize_args(copy, digits), ok=False), "does not match its digest")
    del doc["attributes"]["projidx"]["uuid"]
    root.write_text(json.dumps(doc))
    assert_clean_error(run("info", copy / "s.zarr", ok=False), "digest")


# ---- indices and outputs tied to their content -------------------------------------------------------------

def index_file(index: Path, method: str) -> Path:
    """The ``method`` index file its sidecar names (each build writes its own)."""
    return index / json.loads((index / f"{method}.json").read_text())["file"]


@pytest.mark.parametrize("damage", ["overwritten", "inf", "other-method", "npy-row"])
def test_a_damaged_index_is_refused_and_rebuilt_by_index(copy, digits, damage, monkeypatch):
    index = copy / "s.zarr.index"
    if damage == "npy-row":
        import projidx.search.index as index_module

        monkeypatch.setattr(index_module, "faiss_module", lambda: None)
        run("index", "--store", copy / "s.zarr", "--method", "retrac")
        vectors = np.load(index_file(index, "retrac"))
        vectors[3] *= 100
        np.save(index_file(index, "retrac"), vectors)
    elif damage == "overwritten":
        index_file(index, "retrac").write_bytes(index_file(index, "retrac").read_bytes()[:100])
    elif damage == "inf":
        import faiss

        ix = faiss.read_index(str(index_file(index, "retrac")))
        v = faiss.rev_swig_ptr(faiss.downcast_index(ix).get_xb(), ix.ntotal * ix.d)
        v[5] = np.inf
        faiss.write_index(ix, str(index_file(index, "retrac")))
    else:
        shutil.copy(index_file(index, "tracin"), index_file(index, "retrac"))
    assert_clean_error(query(copy, digits), "is not the one its sidecar records", "projidx index")
    run("index", "--store", copy / "s.zarr", "--method", "retrac")
    query(copy, digits, "retrac", True)


def test_failed_index_and_results_writes_leave_no_partial_file(copy, digits, monkeypatch):
    import faiss

    import projidx.search.attribution as attribution_module

    before = sorted((copy / "s.zarr.index").iterdir())
    good = file_sha256(index_file(copy / "s.zarr.index", "retrac"))

    def half_write(index, path):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("Error in faiss::FileIOWriter: disk quota exceeded")

    monkeypatch.setattr(faiss, "write_index", half_write)
    assert_clean_error(run("index", "--store", copy / "s.zarr", "--method", "retrac", ok=False), "could not write")
    assert file_sha256(index_file(copy / "s.zarr.index", "retrac")) == good
    assert sorted((copy / "s.zarr.index").iterdir()) == before  # no partial or temporary file left
    monkeypatch.undo()

    def broken(self):
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(attribution_module.Attribution, "to_json", broken)
    assert_clean_error(query(copy, digits), "file too large")
    assert not (copy / "r.json").exists()


# ---- validate before creating anything ---------------------------------------------------------------------

def edit_checkpoints(d: Path, blob_edit=None, manifest_edit=None) -> None:
    if blob_edit is not None:
        blob = torch.load(d / "ck" / "ckpt-000.pt", weights_only=True)
        blob = blob_edit(blob) or blob
        torch.save(blob, d / "ck" / "ckpt-000.pt")
    manifest = json.loads((d / "ck" / MANIFEST).read_text())
    manifest["checkpoints"][0]["sha256"] = file_sha256(d / "ck" / "ckpt-000.pt")
    if manifest_edit is not None:
        manifest = manifest_edit(manifest) or manifest
    (d / "ck" / MANIFEST).write_text(json.dumps(manifest))


def _set(blob, key, value):
    blob[key] = value


CHECKPOINT_PROBES = {
    "no state_dict": (lambda b: {"weights": b["state_dict"]}, None, "no 'state_dict'"),
    "replay lengths": (lambda b: _set(b, "replay_ids", b["replay_ids"][:-1]), None, "one equal length"),
    "replay -3": (lambda b: b["replay_timesteps"].__setitem__(0, -3), None, "must lie in [0, 1000)"),
    "duplicate ids": (None, lambda m: m["checkpoints"][1].__setitem__("id", m["checkpoints"][0]["id"]), "unique"),
    "empty id": (None, lambda m: m["checkpoints"][0].__setitem__("id", ""), "checkpoint id ''"),
    "dotdot id": (None, lambda m: m["checkpoints"][0].__setitem__("id", ".."), "checkpoint id '..'"),
    "manifest list": (None, lambda m: [m], "must hold a JSON object"),
    "weight -1": (None, lambda m: m["checkpoints"][0].__setitem__("weight", -1), "finite number >= 0"),
    "weight NaN": (None, lambda m: m["checkpoints"][0].__setitem__("weight", float("nan")), "finite number >= 0"),
    "file outside": (None, lambda m: m["checkpoints"][0].__setitem__("file", "../x.pt"), "must be a file name"),
}


@pytest.mark.parametrize("probe", list(CHECKPOINT_PROBES))
def test_bad_checkpoints_are_refused_before_anything_is_written(tmp_path, built, digits, probe):
    shutil.copytree(built / "ck", tmp_path / "ck")
    blob_edit, manifest_edit, needle = CHECKPOINT_PROBES[probe]
    edit_checkpoints(tmp_path, blob_edit, manifest_edit)
    assert_clean_error(run(*featurize_args(tmp_path, digits), ok=False), needle)
    assert not (tmp_path / "s.zarr").exists()


def test_replay_refuses_data_the_checkpoints_were_not_trained_on(tmp_path, built, digits):
    shutil.copytree(built / "ck", tmp_path / "ck")
    with np.load(digits) as f:
        images, ids = f["images"].copy(), f["ids"]
    images[4] = 255 - images[4]  # one image edited
    edited = save_npz(tmp_path / "edited.npz", images, ids)
    subset = save_npz(tmp_path / "subset.npz", images[:12], ids[:12])
    for data in (edited, subset):
        assert_clean_error(run(*featurize_args(tmp_path, data), ok=False), "not the data the checkpoints were trained",
                           "--other-data")
    assert not (tmp_path / "s.zarr").exists()
    with pytest.warns(UserWarning, match="not the data"):
        run(*featurize_args(tmp_path, subset, "--other-data"))
    assert FeatureStore.open(tmp_path / "s.zarr").is_complete()


@pytest.mark.parametrize(("flag", "value"), [("--proj-dim", 10**9), ("--chunk-rows", 10**8)])
def test_infeasible_sizes_are_refused_before_creating_the_store(tmp_path, built, digits, flag, value):
    args = ["featurize", "--checkpoints", built / "ck", "--data", digits, "--store", tmp_path / "x.zarr",
            "--timesteps", 2, flag, value]
    assert_clean_error(run(*args, ok=False), "GiB", "lower --chunk-rows")
    assert not (tmp_path / "x.zarr").exists()


# ---- one writer -----------------------------------------------------------------------------------------------

def test_a_second_writer_is_refused_naming_the_holder(copy, digits):
    before = tree_digest(copy / "s.zarr")
    with WriterLock(copy / "s.zarr"):
        assert_clean_error(run(*featurize_args(copy, digits), ok=False), "is being written by pid")
        assert_clean_error(run("index", "--store", copy / "s.zarr", "--method", "retrac", ok=False),
                           "is being written by pid")
    assert tree_digest(copy / "s.zarr") == before
    run(*featurize_args(copy, digits))  # the lock is free again


# ---- one-line errors for the rest ---------------------------------------------------------------------------

@pytest.mark.parametrize(("code", "needle"), [(errno.ENOSPC, "no space left"), (errno.EFBIG, "file too large"),
                                              (errno.EROFS, "read-only file system")])
def test_os_errors_while_writing_are_one_line_and_resumable(tmp_path, built, digits, monkeypatch, code, needle):
    import os

    shutil.copytree(built / "ck", tmp_path / "ck")
    calls = []
    real = FeatureStore.write_chunk

    def failing(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(code, os.strerror(code), str(self.path / "features"))
        return real(self, *args)

    monkeypatch.setattr(FeatureStore, "write_chunk", failing)
    assert_clean_error(run(*featurize_args(tmp_path, digits), ok=False), needle, "re-run the same command")
    monkeypatch.undo()
    run(*featurize_args(tmp_path, digits))
    assert arrays_of(tmp_path / "s.zarr") == arrays_of(built / "s.zarr")


def test_ctrl_c_and_memory_errors_are_one_line(tmp_path, built, digits, monkeypatch):
    import projidx.features.featurization as featurization

    shutil.copytree(built / "ck", tmp_path / "ck")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(featurization, "featurize", interrupted)
    r = run(*featurize_args(tmp_path, digits), ok=False)
    assert r.exit_code == 130 and "interrupted" in r.output and "Traceback" not in r.output

    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(featurization, "featurize", exhausted)
    assert_clean_error(run(*featurize_args(tmp_path, digits), ok=False), "out of memory", "--batch-size")


def test_ctrl_c_during_start_up_is_one_line():
    import subprocess
    import sys

    code = ("import builtins, sys\n"
            "real = builtins.__import__\n"
            "def imp(name, *a, **k):\n"
            "    if name == 'projidx.cli.main': raise KeyboardInterrupt\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = imp\n"
            "sys.argv = ['projidx', '--help']\n"
            "from projidx.__main__ import run\n"
            "run()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 130 and r.stderr.strip() == "Error: interrupted", r.stderr
