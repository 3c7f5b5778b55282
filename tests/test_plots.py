"""Run plots name the quantizer method, in the title of every panel and in the legend."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from simplexvq_recipes.training.plots import (
    code_histogram_figure,
    code_usage_figure,
    plot_code_histogram,
    plot_code_usage,
)
from simplexvq_recipes.training.tracking import MetricHistory

HISTORY = MetricHistory([{"step": 1.0, "val/usage/0": 0.25, "val/usage/1": 0.5}, {"step": 2.0, "val/usage/0": 1.0}])


def test_code_usage_plot_names_the_method_and_plots_the_history():
    figure = code_usage_figure(HISTORY, method="softmax-knn_ce")
    axis = figure.axes[0]
    assert axis.get_title() == "softmax-knn_ce: code usage (val/usage)"
    assert [t.get_text() for t in axis.get_legend().get_texts()] == [
        "softmax-knn_ce: codebook 0",
        "softmax-knn_ce: codebook 1",
    ]
    first, second = axis.get_lines()
    assert list(first.get_xdata()) == [1.0, 2.0] and list(first.get_ydata()) == [25.0, 100.0]
    assert list(second.get_ydata()) == [50.0]
    plt.close(figure)
    unnamed = code_usage_figure(HISTORY)
    assert unnamed.axes[0].get_title() == "code usage (val/usage)"
    plt.close(unnamed)


def test_code_histogram_names_the_method_in_every_panel(tmp_path):
    counts = torch.tensor([[5.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    figure = code_histogram_figure(counts, method="ste-euclid")
    assert [a.get_title() for a in figure.axes] == [
        "ste-euclid: code usage, codebook 0: 2/3 codes used",
        "ste-euclid: code usage, codebook 1: 3/3 codes used",
    ]
    heights = [bar.get_height() for bar in figure.axes[0].patches]
    assert heights == [5 / 6, 1 / 6, 0.0]  # sorted by frequency
    plt.close(figure)
    for png in (
        plot_code_histogram(counts, tmp_path / "hist.png", method="ste-euclid"),
        plot_code_usage(HISTORY, tmp_path / "usage.png", method="ste-euclid"),
    ):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
