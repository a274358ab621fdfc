"""Pictures: each query beside its top-k training images, with scores."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _show(ax, image: np.ndarray) -> None:
    """image: (C, H, W) in [-1, 1]."""
    img = np.clip((image + 1) / 2, 0, 1)
    if img.shape[0] == 1:
        ax.imshow(img[0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(np.transpose(img, (1, 2, 0)))
    ax.set_xticks([])
    ax.set_yticks([])


def attribution_grid(
    path: str | Path,
    query_images: np.ndarray,
    train_images: np.ndarray,
    scores: np.ndarray,
    title: str = "",
) -> None:
    """Write a PNG: row i = query i, then its top-k training images (best first) with their scores.

    query_images: (M, C, H, W); train_images: (M, k, C, H, W); scores: (M, k); all images in [-1, 1].
    """
    m, k = scores.shape
    fig, axes = plt.subplots(m, k + 1, figsize=(1.2 * (k + 1), 1.3 * m + 0.4), squeeze=False)
    for i in range(m):
        _show(axes[i, 0], query_images[i])
        axes[i, 0].set_title("query", fontsize=7)
        for j in range(k):
            _show(axes[i, j + 1], train_images[i, j])
            axes[i, j + 1].set_title(f"{scores[i, j]:.3g}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
