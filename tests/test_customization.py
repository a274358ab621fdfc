"""benchmarks/customization.py's own numbers: the recall / hit / best-rank of exemplars against a by-hand reference,
and concepts that are what they claim (distinct patterns in their own colours). The pipeline it drives is tested
end to end in test_latent.py and test_lora.py."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
customization = pytest.importorskip("customization")


def test_ranks_of_counts_exemplars_in_the_top_k():
    exemplars = np.array([100, 101, 102])
    top = np.array([[100, 5, 101, 7, 8, 9, 10, 11, 12, 13],   # two exemplars, the best first
                    [1, 2, 3, 4, 5, 6, 7, 8, 9, 102],         # one, last
                    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])         # none: best rank counts as k
    r = customization.ranks_of(top, exemplars, 10)
    assert r["recall_at_10"] == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)
    assert r["hit_at_10"] == pytest.approx(2 / 3)
    assert r["best_rank"] == pytest.approx((0 + 9 + 10) / 3)


@pytest.mark.parametrize("kind", ["checker", "ring", "stripes"])
def test_concept_images_are_two_coloured_patterns_seeded(kind):
    images = customization.concept_images(kind, 4, seed=3)
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
    for x in images:
        assert len(np.unique(x.reshape(-1, 3), axis=0)) == 2  # a pattern in two colours
    np.testing.assert_array_equal(images, customization.concept_images(kind, 4, seed=3))
    assert not np.array_equal(images, customization.concept_images(kind, 4, seed=4))
