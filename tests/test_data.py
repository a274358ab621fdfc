"""Built-in datasets and .npz rules."""

from __future__ import annotations

import numpy as np
import pytest

from projidx.data import from_arrays, load_dataset
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
        from_arrays(np.full((2, 8, 8), 2.0, np.float32))
    with pytest.raises(ProjidxError, match="not unique"):
        from_arrays(np.zeros((2, 8, 8), np.uint8), np.array([3, 3]))
    with pytest.raises(ProjidxError, match="1 or 3 channels"):
        from_arrays(np.zeros((2, 2, 8, 8), np.uint8))
