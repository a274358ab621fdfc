"""The CLI end to end on an .npz dataset, and every bad input: one line, non-zero exit, store untouched."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from projidx.cli.main import main
from projidx.models.checkpoints import MANIFEST
from tests.conftest import save_npz


def run(*args: str, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def assert_clean_error(result, *needles: str) -> None:
    """Exit status != 0, exactly one line of output naming the problem, no traceback."""
    assert result.exit_code != 0
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line.strip() and "%|" not in line]  # minus progress bars
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error:"), lines[0]
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def rgb_npz(tmp_path_factory) -> tuple[Path, Path]:
    """A non-digits dataset: 30 RGB 12x10 images (smooth blobs) with custom ids, and 4 queries."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:12, 0:10]
    imgs = []
    for _ in range(34):
        cy, cx, r = rng.uniform(2, 10), rng.uniform(2, 8), rng.uniform(1.5, 4)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / r**2)
        color = rng.uniform(0, 1, 3)[:, None, None]
        imgs.append((blob[None] * color * 255).astype(np.uint8))
    imgs = np.stack(imgs)
    d = tmp_path_factory.mktemp("npz")
    return (save_npz(d / "train.npz", imgs[:30], np.arange(30) * 7 + 100), save_npz(d / "queries.npz", imgs[30:]))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, rgb_npz):
    """train -> featurize (grid mode) -> index on the RGB .npz through the CLI."""
    train_npz, _ = rgb_npz
    d = tmp_path_factory.mktemp("cli")
    run("train", "--data", train_npz, "--out", d / "ck", "--epochs", 2, "--checkpoints", 2, "--width", 8,
        "--loss", "l1")
    run("featurize", "--checkpoints", d / "ck", "--data", train_npz, "--store", d / "s.zarr",
        "--train-timesteps", "grid", "--timesteps", 3, "--proj-dim", 64, "--chunk-rows", 8)
    run("index", "--store", d / "s.zarr", "--method", "retrac")
    return d


def test_cli_pipeline_on_an_npz_dataset(pipeline, rgb_npz):
    d = pipeline
    _, queries = rgb_npz
    out = run("query", "--store", d / "s.zarr", "--data", queries, "--method", "retrac", "--top-k", 5,
              "--query-timesteps", 3, "--noise-draws", 2, "--out", d / "r.json", "--png", d / "r.png")
    assert "wrote" in out.output
    assert "search: Flat index, recall@10 1.00 against the exact scan" in out.output  # told at query time
    res = json.loads((d / "r.json").read_text())
    assert res["method"] == "retrac" and res["top_k"] == 5 and len(res["queries"]) == 4
    assert res["search"] == {"exact": False, "factory": "Flat", "recall_at_10": 1.0, "rerank": None}
    train_ids = set((np.arange(30) * 7 + 100).tolist())
    for q in res["queries"]:
        assert len(q["ids"]) == 5 and set(q["ids"]) <= train_ids
        assert q["scores"] == sorted(q["scores"], reverse=True)
    assert (d / "r.png").stat().st_size > 1000
    exact = run("query", "--store", d / "s.zarr", "--data", queries, "--method", "retrac", "--top-k", 5,
                "--query-timesteps", 3, "--noise-draws", 2, "--out", d / "e.json", "--exact")
    assert "wrote" in exact.output and "search: exact scan" in exact.output
    assert [q["ids"] for q in json.loads((d / "e.json").read_text())["queries"]] == [q["ids"] for q in res["queries"]]
    info = json.loads(run("info", d / "s.zarr").output)
    assert info["train_timesteps"] == "grid" and info["loss"] == "l1" and info["image_shape"] == [3, 12, 10]
    assert info["chunks_done"] == {"ckpt-000": "4/4", "ckpt-001": "4/4"}


def test_bad_data_files(tmp_path, pipeline, rgb_npz):
    d = pipeline
    train_npz, _ = rgb_npz
    np.savez(tmp_path / "noimages.npz", pictures=np.zeros((3, 8, 8), np.uint8))
    np.savez(tmp_path / "rank.npz", images=np.zeros((3, 8), np.uint8))
    nan = np.zeros((3, 8, 8), np.float32)
    nan[1, 2, 2] = np.nan
    np.savez(tmp_path / "nan.npz", images=nan)
    inf = np.zeros((3, 8, 8), np.float32)
    inf[2, 0, 0] = np.inf
    np.savez(tmp_path / "inf.npz", images=inf)
    np.savez(tmp_path / "empty.npz", images=np.zeros((0, 8, 8), np.uint8))
    (tmp_path / "garbage.npz").write_bytes(b"not a zip")
    cases = {
        "noimages.npz": "no array named 'images'",
        "rank.npz": "must be (N,H,W), (N,C,H,W) or (N,H,W,C)",
        "nan.npz": "NaN or inf",
        "inf.npz": "NaN or inf",
        "empty.npz": "empty",
        "garbage.npz": "not a readable .npz",
        "missing.npz": "no such file",
    }
    for name, needle in cases.items():
        r = run("train", "--data", tmp_path / name, "--out", tmp_path / "ck", "--epochs", 1, "--checkpoints", 1,
                ok=False)
        assert_clean_error(r, needle)
    before = tree_digest(d / "s.zarr")
    for name, needle in cases.items():
        r = run("featurize", "--checkpoints", d / "ck", "--data", tmp_path / name, "--store", d / "s.zarr", ok=False)
        assert_clean_error(r, needle)
    assert tree_digest(d / "s.zarr") == before


def test_query_with_another_image_shape(tmp_path, pipeline):
    d = pipeline
    save_npz(tmp_path / "q.npz", np.zeros((2, 8, 8), np.uint8))
    r = run("query", "--store", d / "s.zarr", "--data", tmp_path / "q.npz", "--method", "retrac",
            "--out", tmp_path / "r.json", ok=False)
    assert_clean_error(r, "query images are (1, 8, 8)", "(3, 12, 10)")
    assert not (tmp_path / "r.json").exists()


def test_featurize_refuses_to_mix_stores(tmp_path, pipeline, rgb_npz):
    d = pipeline
    train_npz, queries_npz = rgb_npz
    before = tree_digest(d / "s.zarr")
    base = ["featurize", "--checkpoints", d / "ck", "--data", train_npz, "--store", d / "s.zarr",
            "--train-timesteps", "grid", "--timesteps", 3, "--proj-dim", 64, "--chunk-rows", 8]
    variants = {
        "projector spec": ["--proj-dim", 32],
        "projector spec ": ["--projector", "dense"],
        "timesteps": ["--timesteps", 4],
        "training-side timestep mode": ["--train-timesteps", "replay"],
        "noise seed": ["--noise-seed", 1],
        "noise policy (store: shared, given: per-sample)": ["--noise", "per-sample"],
        "projector spec  ": ["--projection-seed", 4],
        "training-side noise draws": ["--train-draws", 2],
    }
    for needle, extra in variants.items():
        args = list(base)
        for flag, value in zip(extra[::2], extra[1::2], strict=True):
            if flag in args:
                args[args.index(flag) + 1] = value
            else:
                args += [flag, value]
        assert_clean_error(run(*args, ok=False), "different", needle.strip())
    # another dataset (same shape, other pixels)
    other = np.load(train_npz)["images"].copy()
    other[0] = 255 - other[0]
    save_npz(tmp_path / "other.npz", other, np.arange(30) * 7 + 100)
    args = list(base)
    args[args.index("--data") + 1] = tmp_path / "other.npz"
    assert_clean_error(run(*args, ok=False), "different", "dataset")
    # other checkpoints (retrained with another seed) and another model (other width)
    run("train", "--data", train_npz, "--out", tmp_path / "ck2", "--epochs", 2, "--checkpoints", 2, "--width", 8,
        "--loss", "l1", "--seed", 9)
    args = list(base)
    args[args.index("--checkpoints") + 1] = tmp_path / "ck2"
    assert_clean_error(run(*args, ok=False), "different", "checkpoints")
    run("train", "--data", train_npz, "--out", tmp_path / "ck3", "--epochs", 2, "--checkpoints", 2, "--width", 16,
        "--loss", "l1")
    args[args.index("--checkpoints") + 1] = tmp_path / "ck3"
    assert_clean_error(run(*args, ok=False), "different", "model")
    assert tree_digest(d / "s.zarr") == before
    # the original settings resume fine (nothing to do)
    run(*base)
    assert tree_digest(d / "s.zarr") == before


def test_bad_checkpoints(tmp_path, pipeline, rgb_npz):
    d = pipeline
    train_npz, _ = rgb_npz
    store = tmp_path / "new.zarr"
    feat = ["featurize", "--data", train_npz, "--store", store, "--proj-dim", 16]
    assert_clean_error(run(*feat, "--checkpoints", tmp_path / "nowhere", ok=False), "no such folder", "manifest.json")
    # a checkpoint file missing
    ck = tmp_path / "ck"
    shutil.copytree(d / "ck", ck)
    (ck / "ckpt-001.pt").unlink()
    assert_clean_error(run(*feat, "--checkpoints", ck, ok=False), "ckpt-001", "missing")
    # a corrupted checkpoint file (hash mismatch) and an unreadable one (manifest hash updated)
    shutil.rmtree(ck)
    shutil.copytree(d / "ck", ck)
    (ck / "ckpt-001.pt").write_bytes(b"garbage")
    assert_clean_error(run(*feat, "--checkpoints", ck, ok=False), "ckpt-001", "does not match the hash")
    manifest = json.loads((ck / MANIFEST).read_text())
    manifest["checkpoints"][1]["sha256"] = hashlib.sha256(b"garbage").hexdigest()
    (ck / MANIFEST).write_text(json.dumps(manifest))
    assert_clean_error(run(*feat, "--checkpoints", ck, ok=False), "ckpt-001", "cannot read")
    # parameters that do not fit the model: the manifest claims another width
    shutil.rmtree(ck)
    shutil.copytree(d / "ck", ck)
    manifest = json.loads((ck / MANIFEST).read_text())
    manifest["model"]["config"]["base"] = 16
    (ck / MANIFEST).write_text(json.dumps(manifest))
    assert_clean_error(run(*feat, "--checkpoints", ck, ok=False), "does not fit the model")
    assert not store.exists()


def test_bad_numbers(tmp_path, pipeline, rgb_npz):
    d = pipeline
    train_npz, queries = rgb_npz
    r = run("featurize", "--checkpoints", d / "ck", "--data", train_npz, "--store", tmp_path / "x.zarr",
            "--proj-dim", 0, ok=False)
    assert_clean_error(r, "--proj-dim must be >= 1")
    assert not (tmp_path / "x.zarr").exists()
    r = run("query", "--store", tmp_path / "nothing.zarr", "--data", queries, "--method", "retrac",
            "--out", tmp_path / "r.json", ok=False)
    assert_clean_error(r, "not a projidx store")
    r = run("query", "--store", d / "s.zarr", "--data", queries, "--method", "tracin",
            "--out", tmp_path / "r.json", ok=False)
    assert_clean_error(r, "no tracin index")


def test_nan_gradients_are_reported_with_the_sample_id_and_not_stored(tmp_path, pipeline, rgb_npz):
    d = pipeline
    train_npz, _ = rgb_npz
    ck = tmp_path / "ck"
    shutil.copytree(d / "ck", ck)
    blob = torch.load(ck / "ckpt-000.pt", weights_only=True)
    blob["state_dict"]["out.weight"][0, 0, 0, 0] = float("nan")
    torch.save(blob, ck / "ckpt-000.pt")
    manifest = json.loads((ck / MANIFEST).read_text())
    manifest["checkpoints"][0]["sha256"] = hashlib.sha256((ck / "ckpt-000.pt").read_bytes()).hexdigest()
    (ck / MANIFEST).write_text(json.dumps(manifest))
    store = tmp_path / "nan.zarr"
    r = run("featurize", "--checkpoints", ck, "--data", train_npz, "--store", store, "--proj-dim", 16,
            "--chunk-rows", 8, ok=False)
    assert_clean_error(r, "non-finite gradient for sample id 100")
    info = json.loads(run("info", store).output)
    assert info["chunks_done"]["ckpt-000"] == "0/4"


def test_corrupted_chunk_is_named_and_repaired_by_featurize(tmp_path, pipeline, rgb_npz):
    d = pipeline
    train_npz, queries = rgb_npz
    store = tmp_path / "s.zarr"
    shutil.copytree(d / "s.zarr", store)
    good = tree_digest(store)
    chunk_file = store / "features" / "ckpt-001" / "c" / "2" / "0" / "0"
    data = bytearray(chunk_file.read_bytes())
    data[100] ^= 0xFF
    chunk_file.write_bytes(bytes(data))
    r = run("query", "--store", store, "--data", queries, "--method", "retrac", "--exact",
            "--query-timesteps", 2, "--noise-draws", 1, "--out", tmp_path / "r.json", ok=False)
    assert_clean_error(r, "checkpoint ckpt-001", "rows 16-23", "corrupted", "re-run 'projidx featurize'")
    assert_clean_error(run("index", "--store", store, "--method", "tracin", ok=False), "rows 16-23", "corrupted")
    # truncated chunk of another array
    norms_file = store / "norms" / "ckpt-000" / "c" / "1" / "0"
    norms_file.write_bytes(norms_file.read_bytes()[:-9])
    r = run("index", "--store", store, "--method", "tracin", ok=False)
    assert_clean_error(r, "checkpoint ckpt-000", "rows 8-15")
    # a deleted chunk reads as fill: detected too
    (store / "mean_norms" / "ckpt-000" / "c" / "3").unlink()
    run("featurize", "--checkpoints", d / "ck", "--data", train_npz, "--store", store, "--train-timesteps", "grid",
        "--timesteps", 3, "--proj-dim", 64, "--chunk-rows", 8)
    assert tree_digest(store) == good
    run("index", "--store", store, "--method", "tracin")


def test_analyze_commands(tmp_path, pipeline, rgb_npz):
    d = pipeline
    _, queries = rgb_npz
    out = tmp_path / "bias"
    r = run("analyze", "timestep-bias", "--store", d / "s.zarr", "--out", out)
    assert "max/min ratio" in r.output
    bias = json.loads((out / "timestep_bias.json").read_text())
    assert bias["mode"] == "grid" and set(bias["checkpoints"]) == {"ckpt-000", "ckpt-001"}
    rows = bias["checkpoints"]["ckpt-000"]["by_timestep"]
    assert [row["count"] for row in rows] == [30, 30, 30]  # 30 samples at each of the 3 grid timesteps
    assert (out / "norm_vs_timestep.png").stat().st_size > 1000
    out = tmp_path / "infl"
    run("analyze", "influence", "--store", d / "s.zarr", "--data", queries, "--top-k", 5, "--out", out,
        "--query-timesteps", 2, "--noise-draws", 1)
    infl = json.loads((out / "influence.json").read_text())
    for method in ("tracin", "retrac"):
        m = infl["methods"][method]
        assert m["queries"] == 4 and m["top_k"] == 5 and len(m["counts"]) == 30 and sum(m["counts"]) == 20
        assert m["unique_ratio"] == len({i for ids in m["top_ids"] for i in ids}) / 20
    assert (out / "influence_curve.png").exists() and (out / "appearances_vs_norm.png").exists()
    out = tmp_path / "self"
    run("analyze", "self-influence", "--store", d / "s.zarr", "--out", out, "--query-timesteps", 2,
        "--noise-draws", 1)
    si = json.loads((out / "self_influence.json").read_text())
    assert len(si["scores"]["retrac"]) == 30 and len(si["highest"]["tracin"]) == 20
    assert si["ids"] == (np.arange(30) * 7 + 100).tolist()
    assert (out / "self_influence_top.png").stat().st_size > 1000


def test_bad_device_and_damaged_index(tmp_path, pipeline, rgb_npz):
    d = pipeline
    train_npz, queries = rgb_npz
    r = run("featurize", "--checkpoints", d / "ck", "--data", train_npz, "--store", tmp_path / "x.zarr",
            "--device", "gpu", ok=False)
    assert_clean_error(r, "--device 'gpu'")
    assert not (tmp_path / "x.zarr").exists()
    store = tmp_path / "s.zarr"
    shutil.copytree(d / "s.zarr", store)
    shutil.copytree(d / "s.zarr.index", tmp_path / "s.zarr.index")
    (tmp_path / "s.zarr.index" / "retrac.json").write_text("{not json")
    r = run("query", "--store", store, "--data", queries, "--method", "retrac", "--out", tmp_path / "r.json", ok=False)
    assert_clean_error(r, "retrac index", "unreadable", "rebuild")


def test_every_option_has_help_text():
    import click

    def options(cmd, name):
        if isinstance(cmd, click.Group):
            for sub, c in cmd.commands.items():
                yield from options(c, f"{name} {sub}")
        else:
            yield from ((name, p.opts[0]) for p in cmd.params if isinstance(p, click.Option))

    missing = [(cmd, opt) for cmd, opt in options(main, "projidx")
               if not next(p for p in _command(cmd).params if p.opts[0] == opt).help]
    assert missing == []


def _command(path: str):
    cmd = main
    for part in path.split()[1:]:
        cmd = cmd.commands[part]
    return cmd


def test_train_refuses_a_non_empty_out_unless_forced(tmp_path, rgb_npz):
    train_npz, _ = rgb_npz
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "notes.txt").write_text("mine")
    args = ["train", "--data", train_npz, "--out", tmp_path / "ck", "--epochs", 1, "--checkpoints", 1, "--width", 8]
    assert_clean_error(run(*args, ok=False), "is not empty", "--force")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["notes.txt"]
    run(*args, "--force")
    assert (tmp_path / "ck" / MANIFEST).is_file()


def test_featurize_resumes_from_the_recorded_settings(tmp_path, pipeline, rgb_npz):
    """Only --checkpoints, --data and --store are needed to resume; an explicit other value is still refused."""
    d = pipeline
    train_npz, _ = rgb_npz
    store = tmp_path / "s.zarr"
    shutil.copytree(d / "s.zarr", store)
    before = tree_digest(store)
    run("featurize", "--checkpoints", d / "ck", "--data", train_npz, "--store", store, "--threads", 1)
    assert tree_digest(store) == before
    import torch

    assert torch.get_num_threads() == 1  # --threads reached torch
    r = run("featurize", "--checkpoints", d / "ck", "--data", train_npz, "--store", store, "--proj-dim", 32, ok=False)
    assert_clean_error(r, "different projector spec")


def test_cli_pipeline_on_a_folder_of_pngs_names_the_training_files(tmp_path):
    from PIL import Image

    from projidx.data.datasets import load_dataset

    digits = load_dataset("digits").subset(slice(0, 26))
    pixels = ((digits.images.numpy()[:, 0] + 1) * 127.5).round().astype(np.uint8)
    (tmp_path / "train").mkdir()
    for i, img in enumerate(pixels[:24]):
        Image.fromarray(np.kron(img, np.ones((2, 2), np.uint8))).save(tmp_path / "train" / f"digit_{i:03d}.png")
    Image.fromarray(np.kron(pixels[24], np.ones((2, 2), np.uint8))).save(tmp_path / "query.png")
    run("train", "--data", tmp_path / "train", "--out", tmp_path / "ck", "--epochs", 2, "--checkpoints", 1,
        "--width", 8)
    run("featurize", "--checkpoints", tmp_path / "ck", "--data", tmp_path / "train", "--store", tmp_path / "s.zarr",
        "--timesteps", 2, "--proj-dim", 32)
    run("index", "--store", tmp_path / "s.zarr")
    out = run("query", "--store", tmp_path / "s.zarr", "--data", tmp_path / "train" / "digit_005.png", "--top-k", 3,
              "--out", tmp_path / "r.json", "--png", tmp_path / "r.png").output
    assert "featurized in" in out and "searched in" in out
    result = json.loads((tmp_path / "r.json").read_text())
    entry = result["queries"][0]
    assert entry["query_name"] == "digit_005.png"
    assert entry["names"][0] == "digit_005.png" and entry["ids"][0] == 5  # a training image finds itself
    assert all(n.startswith("digit_") for n in entry["names"]) and (tmp_path / "r.png").is_file()
    r = run("query", "--store", tmp_path / "s.zarr", "--data", tmp_path / "query.png", "--resize", "8x8",
            "--out", tmp_path / "r2.json", ok=False)
    assert_clean_error(r, "query images are (1, 8, 8)", "(1, 16, 16)")


def test_sample_writes_generated_queries_that_query_accepts(tmp_path, pipeline):
    d = pipeline
    run("sample", "--checkpoints", d / "ck", "--out", tmp_path / "gen", "--n", 3, "--steps", 5, "--seed", 1)
    names = sorted(p.name for p in (tmp_path / "gen").iterdir())
    assert names == ["sample_00000.png", "sample_00001.png", "sample_00002.png"]
    run("sample", "--checkpoints", d / "ck", "--out", tmp_path / "gen.npz", "--n", 3, "--steps", 5, "--seed", 1)
    with np.load(tmp_path / "gen.npz") as f:
        assert f["images"].shape == (3, 3, 12, 10) and f["images"].dtype == np.uint8
    from projidx.data.datasets import load_dataset

    assert np.array_equal(load_dataset(str(tmp_path / "gen")).images, load_dataset(str(tmp_path / "gen.npz")).images)
    out = run("query", "--store", d / "s.zarr", "--data", tmp_path / "gen", "--method", "retrac", "--top-k", 3,
              "--out", tmp_path / "r.json").output
    assert "3 queries" in out
    assert json.loads((tmp_path / "r.json").read_text())["queries"][2]["query_name"] == "sample_00002.png"
    assert_clean_error(run("sample", "--checkpoints", d / "ck", "--out", tmp_path / "x", "--checkpoint", "nope",
                           ok=False), "no such checkpoint")


def test_cli_pipeline_on_a_hugging_face_dataset(tmp_path):
    datasets = pytest.importorskip("datasets", reason="Hugging Face datasets need projidx[hf]")
    from PIL import Image

    from projidx.data.datasets import load_dataset

    digits = load_dataset("digits").subset(slice(0, 24))
    pixels = ((digits.images.numpy()[:, 0] + 1) * 127.5).round().astype(np.uint8)
    ds = datasets.Dataset.from_dict({"img": [Image.fromarray(p) for p in pixels], "digit": list(range(24))})
    ds.cast_column("img", datasets.Image()).save_to_disk(str(tmp_path / "hf"))
    cols = ["--image-column", "img", "--label-column", "digit"]
    run("train", "--data", tmp_path / "hf", *cols, "--out", tmp_path / "ck", "--epochs", 2, "--checkpoints", 1,
        "--width", 8)
    run("featurize", "--checkpoints", tmp_path / "ck", "--data", tmp_path / "hf", *cols, "--store",
        tmp_path / "s.zarr", "--timesteps", 2, "--proj-dim", 32)
    run("query", "--store", tmp_path / "s.zarr", "--data", tmp_path / "hf", *cols, "--limit", 2, "--top-k", 3,
        "--exact", "--out", tmp_path / "r.json", "--png", tmp_path / "r.png")
    result = json.loads((tmp_path / "r.json").read_text())
    assert [q["ids"][0] for q in result["queries"]] == [0, 1]  # each training image finds itself first
    assert_clean_error(run("featurize", "--checkpoints", tmp_path / "ck", "--data", tmp_path / "hf", "--store",
                           tmp_path / "t.zarr", ok=False), "no column 'image'", "--image-column")
