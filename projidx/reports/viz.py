"""Pictures: each query beside its top-k training images, with scores."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: str | Path, dpi: int = 110) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


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
    labels: list[list[str]] | None = None,
    query_labels: list[str] | None = None,
) -> None:
    """Write a PNG: row i = query i, then its top-k training images (best first), each with its score above and
    its id or file name (``labels`` (M, k), ``query_labels`` (M,)) below.

    query_images: (M, C, H, W); train_images: (M, k, C, H, W); scores: (M, k); all images in [-1, 1].
    """
    m, k = scores.shape
    fig, axes = plt.subplots(m, k + 1, figsize=(1.3 * (k + 1), 1.55 * m + 0.5), squeeze=False)
    for i in range(m):
        _show(axes[i, 0], query_images[i])
        axes[i, 0].set_title("query", fontsize=7)
        if query_labels is not None:
            axes[i, 0].set_xlabel(_short(query_labels[i]), fontsize=6)
        for j in range(k):
            _show(axes[i, j + 1], train_images[i, j])
            axes[i, j + 1].set_title(f"{scores[i, j]:.3g}", fontsize=7)
            if labels is not None:
                axes[i, j + 1].set_xlabel(_short(labels[i][j]), fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path, dpi=100)


def image_rows(path: str | Path, rows: dict[str, np.ndarray], captions: dict[str, list[str]], title: str) -> None:
    """A PNG with one row of images per key (``rows[key]``: (n, C, H, W) in [-1, 1]), each captioned below."""
    n = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(rows), n + 1, figsize=(1.3 * (n + 1), 1.6 * len(rows) + 0.5), squeeze=False)
    for i, (key, images) in enumerate(rows.items()):
        axes[i, 0].axis("off")
        axes[i, 0].text(0.5, 0.5, key, ha="center", va="center", fontsize=9)
        for j in range(n):
            if j < len(images):
                _show(axes[i, j + 1], images[j])
                axes[i, j + 1].set_xlabel(_short(captions[key][j].split("\n")[0]) + "\n"
                                          + "\n".join(captions[key][j].split("\n")[1:]), fontsize=6)
            else:
                axes[i, j + 1].axis("off")
    fig.suptitle(title, fontsize=10)
    _save(fig, path, dpi=100)


def _short(text: str, limit: int = 14) -> str:
    """A label that fits under a thumbnail: the end of a long file name."""
    return text if len(text) <= limit else "..." + text[-(limit - 3):]


def norm_vs_timestep(path: str | Path, bias: dict) -> None:
    """Median gradient norm (p10-p90 band) against timestep, log scale, one line per checkpoint.

    bias: the dict of :func:`projidx.analysis.bias.timestep_bias`.
    """
    fig, ax = plt.subplots(figsize=(6, 4))
    for cid, entry in bias["checkpoints"].items():
        rows = entry["by_timestep"]
        t = [r["timestep"] for r in rows]
        line = ax.plot(t, [r["median"] for r in rows], marker=".", label=cid)[0]
        ax.fill_between(t, [r["p10"] for r in rows], [r["p90"] for r in rows], color=line.get_color(), alpha=0.15)
    ax.set_yscale("log")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("per-sample gradient norm ||g||")
    ax.set_title(f"gradient norm by timestep ({bias['mode']} mode; median, 10-90% band)")
    ax.legend(fontsize=7)
    _save(fig, path)


def norm_scatter(path: str | Path, norms: dict[str, np.ndarray], timesteps: dict[str, np.ndarray]) -> None:
    """Each sample's gradient norm against its (replayed) timestep, one colour per checkpoint."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for cid in norms:
        ax.scatter(timesteps[cid].ravel(), norms[cid].ravel(), s=3, alpha=0.4, label=cid)
    ax.set_yscale("log")
    ax.set_xlabel("replayed training timestep")
    ax.set_ylabel("gradient norm")
    ax.set_title("per-sample gradient norm against its replayed timestep")
    ax.legend(fontsize=7, markerscale=3)
    _save(fig, path)


def influence_curves(path: str | Path, stats_by_method: dict[str, dict]) -> None:
    """Samples in the top-k of at least q queries against q, one line per method (generally influential)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, s in stats_by_method.items():
        curve = s["generally_influential"]["curve"]
        ax.plot([c["min_queries"] for c in curve], [c["samples"] for c in curve], marker=".",
                label=f"{method} (unique ratio {s['unique_ratio']:.2f})")
    ax.axvline(stats_by_method[next(iter(stats_by_method))]["generally_influential"]["threshold"], color="gray",
               linestyle=":", label="half the queries")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("q: number of queries whose top-k contains the sample")
    ax.set_ylabel("training samples in >= q top-k lists")
    ax.legend(fontsize=7)
    _save(fig, path)


def appearances_vs_norm(path: str | Path, counts: dict[str, np.ndarray], norms: np.ndarray) -> None:
    """How often each training sample appears in the queries' top-k, against its gradient norm, per method."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, c in counts.items():
        ax.scatter(norms, c, s=5, alpha=0.5, label=method)
    ax.set_xscale("log")
    ax.set_xlabel("training gradient norm (mean over stored gradients, last checkpoint)")
    ax.set_ylabel("appearances in top-k lists")
    ax.legend(fontsize=7, markerscale=3)
    _save(fig, path)


def score_histogram(path: str | Path, scores: dict[str, np.ndarray], title: str) -> None:
    """Histogram of per-sample scores (e.g. self-influence), one panel per method."""
    fig, axes = plt.subplots(1, len(scores), figsize=(4 * len(scores), 3), squeeze=False)
    for ax, (method, s) in zip(axes[0], scores.items(), strict=True):
        ax.hist(s, bins=50)
        ax.set_title(method)
        ax.set_xlabel("score")
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def lds_plot(path: str | Path, rows: list[dict]) -> None:
    """Write a PNG: the LDS of each (store, method) as a bar with its 95% interval. ``rows``: dicts with "store",
    "method", "lds" (None: undefined) and "ci95" [low, high]."""
    rows = [r for r in rows if r["lds"] is not None]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(rows) + 1.5), 3.6))
    x = np.arange(len(rows))
    values = np.array([r["lds"] for r in rows])
    low = values - np.array([r["ci95"][0] for r in rows])
    high = np.array([r["ci95"][1] for r in rows]) - values
    ax.bar(x, values, yerr=np.stack([low, high]), capsize=3, color="#4c72b0")
    ax.set_xticks(x, [f"{r['method']}\n{r['store']}" for r in rows], rotation=45, ha="right", fontsize=7)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylabel("LDS (Spearman, mean over queries)")
    ax.set_title("Linear datamodeling score, 95% bootstrap intervals", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def leave_out_plot(path: str | Path, report: dict) -> None:
    """Write a PNG: per method, the mean rise of the queries' loss when their top-K rows are removed minus when K
    random rows are, with its 95% interval (``report``: the ``leave_out`` section of lds.json)."""
    names = list(report["methods"])
    values = np.array([report["methods"][n]["difference"] for n in names])
    low = values - np.array([report["methods"][n]["difference_ci95"][0] for n in names])
    high = np.array([report["methods"][n]["difference_ci95"][1] for n in names]) - values
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(names) + 1.5), 3.6))
    x = np.arange(len(names))
    ax.bar(x, values, yerr=np.stack([low, high]), capsize=3, color="#55a868")
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=7)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylabel("loss rise: top-K removed - random K removed")
    ax.set_title(f"Leave-{report['k']}-out, {report['queries']} queries, 95% bootstrap intervals", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
