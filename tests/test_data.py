"""Built-in datasets and .npz rules."""

from __future__ import annotations

import numpy as np
import pytest

from projidx.data.datasets import from_arrays, load_dataset
from projidx.errors import ProjidxError


def test_builtin_datasets_are_stable_and_scaled():
    for spec, shape in [("digits:train", (1500, 1, 8, 8)), ("digits:test", (297, 1, 8, 8)),
                        ("photos:train", (1000, 3, 16, 16)), ("photos:gray8", (1200, 1, 8, 8))]:
        a, b = load_dataset(spec), load_dataset(spec)
        assert tuple(a.images.shape) == shape
        assert a.fingerprint() == b.fingerprint()
        assert a.images.min() >= -1 and a.images.max() <= 1
    assert load_dataset("digits:test").ids[0] == 1500 and load_dataset("photos:test").ids[0] == 1000


def test_npz_rules():
    x = from_arrays(np.full((2, 8, 8), 255, np.uint8))
    assert x.images.shape == (2, 1, 8, 8) and float(x.images.max()) == 1.0
    with pytest.raises(ProjidxError, match=r"\[-1, 1\]"):
        from_arrays(np.full((2, 8, 8), -3.0, np.float32))
    with pytest.raises(ProjidxError, match="not unique"):
        from_arrays(np.zeros((2, 8, 8), np.uint8), np.array([3, 3]))
    with pytest.raises(ProjidxError, match="1 or 3 channels"):
        from_arrays(np.zeros((2, 2, 8, 8), np.uint8))


def _png_folder(folder, images, mode):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img, mode=mode).save(folder / f"img_{i:02d}.png")
    return folder


def test_image_folders_single_images_and_classes(tmp_path):
    from projidx.data.datasets import DataOptions

    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (5, 12, 10), dtype=np.uint8)
    data = load_dataset(str(_png_folder(tmp_path / "gray", gray, "L")))
    assert tuple(data.images.shape) == (5, 1, 12, 10) and data.names == tuple(f"img_{i:02d}.png" for i in range(5))
    np.testing.assert_allclose(data.images[:, 0].numpy(), gray / 255 * 2 - 1, atol=1e-6)
    assert data.ids.tolist() == [0, 1, 2, 3, 4]
    rgb = rng.integers(0, 256, (3, 9, 9, 3), dtype=np.uint8)
    one = load_dataset(str(_png_folder(tmp_path / "rgb", rgb, "RGB") / "img_01.png"))
    assert tuple(one.images.shape) == (1, 3, 9, 9) and one.names == ("img_01.png",)
    np.testing.assert_allclose(one.images[0].numpy(), rgb[1].transpose(2, 0, 1) / 255 * 2 - 1, atol=1e-6)
    _png_folder(tmp_path / "classes" / "cat", gray[:2], "L")
    _png_folder(tmp_path / "classes" / "dog", gray[2:5], "L")
    by_class = load_dataset(str(tmp_path / "classes"))
    assert by_class.labels.tolist() == [0, 0, 1, 1, 1] and by_class.names[2] == "dog/img_00.png"
    from PIL import Image

    Image.fromarray(gray[0]).save(tmp_path / "gray" / "big.jpg")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "gray" / "zz.png")
    with pytest.raises(ProjidxError, match="different sizes .* --resize"):
        load_dataset(str(tmp_path / "gray"))
    resized = load_dataset(str(tmp_path / "gray"), DataOptions(resize=(16, 16)))
    assert tuple(resized.images.shape) == (7, 1, 16, 16) and "big.jpg" in resized.names
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProjidxError, match="no image files"):
        load_dataset(str(tmp_path / "empty"))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ProjidxError, match="not a readable image"):
        load_dataset(str(tmp_path / "bad.png"))


def test_channels_last_npy_and_value_ranges(tmp_path):
    from projidx.data.datasets import DataOptions

    rng = np.random.default_rng(1)
    unit = rng.uniform(0, 1, (4, 10, 10, 3)).astype(np.float32)  # channels-last, values in [0, 1]
    np.save(tmp_path / "x.npy", unit)
    with pytest.raises(ProjidxError, match="look like \\[0, 1\\].*--value-range 0,1"):
        load_dataset(str(tmp_path / "x.npy"))
    data = load_dataset(str(tmp_path / "x.npy"), DataOptions(value_range="0,1"))
    assert tuple(data.images.shape) == (4, 3, 10, 10)
    np.testing.assert_allclose(data.images.numpy(), unit.transpose(0, 3, 1, 2) * 2 - 1, atol=1e-6)
    with pytest.raises(ProjidxError, match="look like \\[0, 255\\]"):
        from_arrays((unit * 255).astype(np.float32))
    with pytest.raises(ProjidxError, match="must lie in \\[0, 1\\]"):
        from_arrays(unit * 2, options=DataOptions(value_range="0,1"))
    np.savez(tmp_path / "l.npz", images=(unit * 255).astype(np.uint8), labels=np.array([1, 0, 1, 2]))
    assert load_dataset(str(tmp_path / "l.npz")).labels.tolist() == [1, 0, 1, 2]


def test_hugging_face_datasets_from_disk_and_parquet(tmp_path):
    datasets = pytest.importorskip("datasets", reason="Hugging Face datasets need projidx[hf]")
    from PIL import Image

    from projidx.data.datasets import DataOptions

    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (6, 9, 11, 3), dtype=np.uint8)
    ds = datasets.Dataset.from_dict({"picture": [Image.fromarray(p) for p in pixels], "label": [0, 1, 2, 0, 1, 2]})
    ds = ds.cast_column("picture", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hf"))
    ds.to_parquet(str(tmp_path / "hf.parquet"))
    with pytest.raises(ProjidxError, match="no column 'image'.*--image-column"):
        load_dataset(str(tmp_path / "hf"))
    for spec in (tmp_path / "hf", tmp_path / "hf.parquet"):
        data = load_dataset(str(spec), DataOptions(image_column="picture"))
        assert tuple(data.images.shape) == (6, 3, 9, 11) and data.labels.tolist() == [0, 1, 2, 0, 1, 2]
        np.testing.assert_allclose(data.images.numpy(), pixels.transpose(0, 3, 1, 2) / 255 * 2 - 1, atol=1e-6)
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_dataset(str(tmp_path / "dd"), DataOptions(image_column="picture"))) == 6


def _same_rows(streamed, loaded, conditioning=()):
    """A streamed dataset reads exactly the in-memory one: every row, any subset, the fingerprint."""
    from projidx.data.datasets import StreamedImages

    assert isinstance(streamed, StreamedImages) and len(streamed) == len(loaded)
    assert streamed.image_shape == loaded.image_shape and streamed.names == loaded.names
    assert streamed.ids.tolist() == loaded.ids.tolist()
    assert (streamed.labels is None) == (loaded.labels is None)
    if loaded.labels is not None:
        assert streamed.labels.tolist() == loaded.labels.tolist()
    whole = streamed.subset(slice(None))
    assert whole.images.dtype == loaded.images.dtype and bool((whole.images == loaded.images).all())
    rows = np.array([len(loaded) - 1, 0, len(loaded) // 2])
    part = streamed.subset(rows)
    assert bool((part.images == loaded.images[rows]).all()) and part.ids.tolist() == loaded.ids[rows].tolist()
    assert streamed.fingerprint(conditioning) == loaded.fingerprint(conditioning)


def test_streamed_datasets_equal_the_in_memory_loads(tmp_path, monkeypatch):
    """.npy (memory-mapped, float auto range decided over every row, chunks smaller than the data), image folders
    (colour decided from the headers of every file, mixed sizes resized), class folders and Hugging Face image
    columns: the same rows bit for bit and the same fingerprint as the in-memory load."""
    from PIL import Image

    import projidx.data.datasets as data_module
    from projidx.data.datasets import DataOptions

    monkeypatch.setattr(data_module, "STREAM_ROWS", 3)  # several chunks in every streamed pass
    rng = np.random.default_rng(3)
    floats = rng.uniform(-1, 1, (10, 9, 9)).astype(np.float32)
    floats[7, 0, 0] = -1.0
    np.save(tmp_path / "f.npy", floats)
    _same_rows(load_dataset(str(tmp_path / "f.npy"), stream=True), load_dataset(str(tmp_path / "f.npy")))
    unit = (floats + 1) / 2
    np.save(tmp_path / "u.npy", unit)
    with pytest.raises(ProjidxError, match="look like \\[0, 1\\]"):  # decided over all rows, not the first chunk
        load_dataset(str(tmp_path / "u.npy"), stream=True)
    unit[8, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", unit)
    with pytest.raises(ProjidxError, match="image 8 contains NaN"):  # the row, not its place in the chunk
        load_dataset(str(tmp_path / "nan.npy"), DataOptions(value_range="0,1"), stream=True)
    options = DataOptions(resize=(12, 12))
    np.save(tmp_path / "c.npy", rng.integers(0, 256, (7, 10, 10, 3), dtype=np.uint8))
    _same_rows(load_dataset(str(tmp_path / "c.npy"), options, stream=True),
               load_dataset(str(tmp_path / "c.npy"), options))
    # a folder of mostly gray images with one colour image at the end, in two sizes
    folder = _png_folder(tmp_path / "mixed", rng.integers(0, 256, (6, 10, 10), dtype=np.uint8), "L")
    Image.fromarray(rng.integers(0, 256, (14, 11, 3), dtype=np.uint8)).save(folder / "zz_color.png")
    with pytest.raises(ProjidxError, match="different sizes"):
        load_dataset(str(folder), stream=True)
    _same_rows(load_dataset(str(folder), options, stream=True), load_dataset(str(folder), options))
    _png_folder(tmp_path / "classes" / "a", rng.integers(0, 256, (2, 8, 8), dtype=np.uint8), "L")
    _png_folder(tmp_path / "classes" / "b", rng.integers(0, 256, (4, 8, 8), dtype=np.uint8), "L")
    _same_rows(load_dataset(str(tmp_path / "classes"), stream=True), load_dataset(str(tmp_path / "classes")),
               conditioning=("class_labels",))
    datasets = pytest.importorskip("datasets", reason="Hugging Face datasets need projidx[hf]")
    pictures = [Image.fromarray(rng.integers(0, 256, (9, 9), dtype=np.uint8)) for _ in range(5)]
    pictures.append(Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)))
    ds = datasets.Dataset.from_dict({"image": pictures, "label": [0, 1, 0, 1, 0, 1]})
    ds.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "hf"))
    _same_rows(load_dataset(str(tmp_path / "hf"), stream=True), load_dataset(str(tmp_path / "hf")))


def test_featurize_on_streamed_data_writes_the_in_memory_store(tmp_path, tiny_ckpts, tiny_data, monkeypatch):
    """A store featurized from a memory-mapped .npy equals, array by array, the store from the same rows in
    memory; the streamed data is never converted whole (rows are read per chunk)."""
    import zarr

    import projidx.data.datasets as data_module
    from projidx.features.featurization import FeaturizeConfig, featurize

    pixels = ((tiny_data.images.numpy() + 1) * 127.5).round().astype(np.uint8)
    np.save(tmp_path / "d.npy", pixels)
    loaded = load_dataset(str(tmp_path / "d.npy"))
    monkeypatch.setattr(data_module, "STREAM_ROWS", 16)
    streamed = load_dataset(str(tmp_path / "d.npy"), stream=True)
    largest = []
    read = streamed._read
    streamed._read = lambda rows: (largest.append(len(rows)), read(rows))[1]
    config = FeaturizeConfig(proj_dim=32, timesteps=2, chunk_rows=8)
    featurize(tiny_ckpts, loaded, tmp_path / "a.zarr", config, progress=False)
    featurize(tiny_ckpts, streamed, tmp_path / "b.zarr", config, progress=False)
    assert max(largest) <= 16 < len(streamed)
    a, b = zarr.open_group(str(tmp_path / "a.zarr"), mode="r"), zarr.open_group(str(tmp_path / "b.zarr"), mode="r")
    names = [f"{kind}/{cid}" for kind in ("features", "norms", "mean_norms", "timesteps", "done")
             for cid in ("ckpt-000", "ckpt-001")] + ["ids"]
    for name in names:
        np.testing.assert_array_equal(np.asarray(a[name][:]), np.asarray(b[name][:]), err_msg=name)
