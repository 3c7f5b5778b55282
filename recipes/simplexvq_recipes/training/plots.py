"""PNG plots users expect from a quantizer run: code usage over training, and a histogram of code usage.

Each plot names the quantizer method (``method=``, e.g. ``softmax-knn_ce``) in its title and legend, so that
pictures of several runs side by side say which is which. ``*_figure`` functions return the matplotlib figure;
``plot_*`` save it as a PNG.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from simplexvq_recipes.training.tracking import MetricHistory  # noqa: E402


def code_usage_figure(history: MetricHistory, prefix: str = "val/usage", *, method: str | None = None) -> plt.Figure:
    """Code usage (%) of every codebook group against the training step; ``method`` goes into title and legend."""
    keys = [k for k in history.keys() if k == prefix or k.startswith(prefix + "/")]
    if not keys:
        raise ValueError(f"no metric named {prefix!r} or {prefix}/<group> in the history; known: {history.keys()}")
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for key in keys:
        steps, values = history.series(key)
        label = f"codebook {key.rsplit('/', 1)[-1]}" if key != prefix else "codebook"
        axis.plot(steps, [100 * v for v in values], marker="o", markersize=3, label=_named(method, label))
    axis.set_title(_named(method, f"code usage ({prefix})"))
    axis.set_xlabel("training step")
    axis.set_ylabel("code usage (%)")
    axis.set_ylim(0, 105)
    axis.grid(alpha=0.3)
    axis.legend()
    return figure


def plot_code_usage(
    history: MetricHistory, path: str | Path, prefix: str = "val/usage", *, method: str | None = None
) -> Path:
    """Save :func:`code_usage_figure` as a PNG at ``path``."""
    return _save(code_usage_figure(history, prefix, method=method), path)


def code_histogram_figure(counts: torch.Tensor, title: str = "code usage", *, method: str | None = None) -> plt.Figure:
    """How often each code was used (codes sorted by frequency), one panel per group; ``counts``: (G, M)."""
    counts = counts.detach().double().cpu()
    groups = counts.shape[0]
    figure, axes = plt.subplots(groups, 1, figsize=(6, 2.5 * groups), squeeze=False)
    for group, axis in enumerate(axes[:, 0]):
        frequencies = counts[group].sort(descending=True).values
        total = frequencies.sum().clamp_min(1)
        used = int((frequencies > 0).sum())
        axis.bar(range(len(frequencies)), (frequencies / total).tolist(), width=1.0)
        axis.set_yscale("log")
        axis.set_title(_named(method, f"{title}, codebook {group}: {used}/{len(frequencies)} codes used"))
        axis.set_xlabel("code rank")
        axis.set_ylabel("frequency")
    return figure


def plot_code_histogram(
    counts: torch.Tensor, path: str | Path, title: str = "code usage", *, method: str | None = None
) -> Path:
    """Save :func:`code_histogram_figure` as a PNG at ``path``."""
    return _save(code_histogram_figure(counts, title, method=method), path)


def _named(method: str | None, text: str) -> str:
    return text if method is None else f"{method}: {text}"


def _save(figure: plt.Figure, path: str | Path) -> Path:
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
