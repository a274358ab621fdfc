"""Distributed featurization: ``torchrun --nproc-per-node 2 -m projidx featurize`` on 2 gloo ranks (CPU) writes
the one-process store bit for bit, resumes after a killed rank, and refuses a second writer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from projidx.errors import ProjidxError
from projidx.features.dist import TIMEOUT_ENV, World, timeout, world_from_env
from projidx.features.featurization import featurize
from projidx.models.checkpoints import load_checkpoint_dir
from projidx.settings import FeaturizeConfig
from projidx.store.feature_store import FeatureStore, WriterLock
from tests.conftest import save_npz
from tests.test_reliability import arrays_of

FLAGS = ["--proj-dim", "16", "--chunk-rows", "4", "--timesteps", "3", "--batch-size", "6"]
CONFIG = FeaturizeConfig(proj_dim=16, chunk_rows=4, timesteps=3, batch_size=6)  # the same settings

# rank 1 featurizes through the library and SIGKILLs itself after writing its second chunk
KILL_RANK_1 = """
import os, signal, sys, time
from projidx.models.checkpoints import load_checkpoint_dir
from projidx.data.datasets import load_dataset
from projidx.features.featurization import featurize
from projidx.settings import FeaturizeConfig
from projidx.store.feature_store import FeatureStore
written = []
def on_chunk(cid, i):
    written.append(i)
    if os.environ["RANK"] == "1" and len(written) == 2:
        deadline = time.time() + 120  # let rank 0 write a chunk of its own first, however loaded the machine
        while time.time() < deadline:
            fs = FeatureStore.open(sys.argv[3], mode="r+")
            if sum(int(fs.done(c).sum()) for c in fs.meta.checkpoint_ids) >= 3:
                break
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
ckpts, data, store = load_checkpoint_dir(sys.argv[1]), load_dataset(sys.argv[2]), sys.argv[3]
featurize(ckpts, data, store, FeaturizeConfig(proj_dim=16, chunk_rows=4, timesteps=3, batch_size=6),
          progress=False, on_chunk=on_chunk)
"""


def torchrun(*args) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 ARGS`` (a free rendezvous port), 2 gloo ranks of 1 thread."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def projidx_lines(result: subprocess.CompletedProcess) -> list[str]:
    """What projidx printed (minus progress bars and torchrun's own messages)."""
    return [line for line in (result.stdout + result.stderr).splitlines()
            if line.startswith(("featurized", "Error:"))]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_ckpt_dir, tiny_data) -> Path:
    """The tiny checkpoints, their training data as .npz, and a one-process reference store made with one torch
    thread, as each rank has (torch's CPU kernels sum in an order that depends on the thread count)."""
    d = tmp_path_factory.mktemp("dist")
    save_npz(d / "train.npz", tiny_data.images.numpy(), tiny_data.ids.numpy())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        featurize(load_checkpoint_dir(tiny_ckpt_dir), tiny_data, d / "ref.zarr", CONFIG, progress=False)
    finally:
        torch.set_num_threads(threads)
    return d


def test_world_splits_units_round_robin():
    units = list(range(7))
    shares = [World(r, 3).share(units) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert World().share(units) == units
    assert World(1, 2).device("cuda") == "cuda:1" and World(1, 2).device("cpu") == "cpu"


def test_world_from_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert world_from_env() == World(0, 1, 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ProjidxError, match="RANK=2 and WORLD_SIZE=2"):
        world_from_env()
    monkeypatch.setenv(TIMEOUT_ENV, "0")
    with pytest.raises(ProjidxError, match=TIMEOUT_ENV):
        timeout()


def test_killed_rank_is_recovered_by_rerunning_torchrun(tmp_path, run_dir, tiny_ckpt_dir):
    """Rank 1 dies mid-run (SIGKILL; torchrun stops rank 0); a done chunk is then damaged; the same torchrun
    command line completes the store, equal in every array to the one-process run."""
    store = tmp_path / "s.zarr"
    script = tmp_path / "kill_rank_1.py"
    script.write_text(KILL_RANK_1)
    killed = torchrun(script, tiny_ckpt_dir, run_dir / "train.npz", store)
    assert killed.returncode != 0
    fs = FeatureStore.open(store, mode="r+")
    assert all(fs.group[f"done/{cid}"].chunks == (1,) for cid in fs.meta.checkpoint_ids)  # a record per object
    done = [(cid, i) for cid in fs.meta.checkpoint_ids for i in np.flatnonzero(fs.done(cid))]
    assert 3 <= len(done) < 2 * fs.n_chunks, done  # rank 1 wrote 2 chunks, rank 0 at least one, not all
    cid, i = done[0]
    (store / "features" / cid / "c" / str(i) / "0" / "0").unlink()  # a done chunk loses its features
    result = torchrun("-m", "projidx", "featurize", "--checkpoints", tiny_ckpt_dir, "--data", run_dir / "train.npz",
                      "--store", store, *FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = projidx_lines(result)
    assert len(lines) == 1 and "by 2 ranks" in lines[0], lines
    assert arrays_of(store) == arrays_of(run_dir / "ref.zarr")


def test_torchrun_refuses_a_store_being_written(tmp_path, run_dir, tiny_ckpt_dir):
    """A second writer on a locked store: rank 0 prints the one-line refusal, rank 1 stops silently."""
    store = tmp_path / "s.zarr"
    with WriterLock(store):
        result = torchrun("-m", "projidx", "featurize", "--checkpoints", tiny_ckpt_dir, "--data",
                          run_dir / "train.npz", "--store", store, *FLAGS)
    assert result.returncode != 0
    lines = projidx_lines(result)
    assert len(lines) == 1 and "is being written by" in lines[0], lines
    assert not store.exists()
