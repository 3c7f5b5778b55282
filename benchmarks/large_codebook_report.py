"""Tables and plots of the large-codebook study (runs of :mod:`large_codebook`): one row per setting with the mean
and spread over its seeds, code use against M per method, and code use over training for the N < K M levers."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SETTING_KEYS: tuple[str, ...] = (
    "method",
    "lever",
    "M",
    "N",
    "K",
    "steps",
    "vertices per step",
    "schedule",
    "processes",
    "weight",
)
"""What identifies a row of the table; runs that differ only in ``seed`` are averaged into one row."""

METRICS: tuple[str, ...] = (
    "val_code_use",
    "train_code_use",
    "val_perplexity",
    "train_individual_perplexity",
    "val_rmse",
    "cpu_seconds_per_step",
    "seconds_per_step",
    "step_peak_memory_mib",
)


def patch_row(labels: dict[str, Any], results: dict[str, Any], history: Sequence[dict[str, float]]) -> dict[str, Any]:
    """One finished run as a row: its labels, the final held-out metrics and the step's cost."""
    vertices = results["options"].get("vertex_subsample") or results["codebook_size"]
    slots = results["knn_k"] * results["codebook_size"]
    return {
        "schedule": results.get("lr_schedule", "one_cycle"),
        "processes": results.get("processes", 1),
        **labels,
        "vertices per step": vertices,
        "searched rows": round(results["searched_rows_over_km"] * slots),  # the run's own count (large_codebook)
        "N / (K M)": results["searched_rows_over_km"],
        "val_code_use": results["val_code_use"],
        "val_perplexity": results["val_perplexity"],
        "val_dead_codes": results["val_dead_codes"],
        "val_rmse": results["val_rmse"],
        "val_rows_per_code": results["val_rows_per_code"],
        "train_code_use": results.get("train_code_use", math.nan),
        "train_individual_perplexity": results["train_individual_perplexity"],
        "train_code_use_last_interval": results["train_code_use_last_interval"],
        "seconds_per_step": results["seconds_per_step"],
        "cpu_seconds_per_step": results["cpu_seconds_per_step"],
        "step_peak_memory_mib": results["step_peak_memory_mib"],
        "steps": results["step"],
        "curve": [(row["step"], row["val_subset/code_use"]) for row in history if "val_subset/code_use" in row],
    }


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with equal settings (all but the seed) merged: each metric's mean, ``<metric>_sd`` its standard deviation
    over seeds (0 for one seed) and ``<metric>_all`` the values; ``seeds`` the seeds. First-seen order."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        setting = tuple((key, row.get(key)) for key in SETTING_KEYS)
        groups.setdefault(setting, []).append(row)
    merged = []
    for members in groups.values():
        row = {key: value for key, value in members[0].items() if key not in (*METRICS, "seed", "curve")}
        row["seeds"] = [member.get("seed", 0) for member in members]
        row["curves"] = [member["curve"] for member in members]
        for metric in METRICS:
            values = [member[metric] for member in members]
            row[metric] = statistics.fmean(values)
            row[f"{metric}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
            row[f"{metric}_all"] = values
        merged.append(row)
    return merged


def _mean_sd(row: dict[str, Any], metric: str, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    if math.isnan(row[metric]):
        return "n/a"
    mean = format(scale * row[metric], spec) + suffix
    if len(row["seeds"]) < 2:
        return mean
    return f"{mean} ± {format(scale * row[f'{metric}_sd'], spec)}"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """One Markdown row per setting (mean ± standard deviation over seeds where there are several)."""
    if not rows:
        return ""
    has_lever = any("lever" in row for row in rows)
    header = [
        "method",
        *(["lever"] if has_lever else []),
        "KNN weight",
        "M",
        "N (rows/step)",
        "processes",
        "K",
        "N / (K M)",
        "vertices/step",
        "steps",
        "LR schedule",
        "seeds",
        "code use (held-out)",
        "code use (train rows)",
        "code perplexity (held-out)",
        "individual perplexity (train)",
        "rMSE (held-out)",
        "CPU s/step",
        "wall s/step",
        "step peak MiB",
        "held-out rows/code",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row["method"],
            *([row.get("lever", "")] if has_lever else []),
            f"{row['weight']:g}" if row.get("weight") is not None else "",
            str(row["M"]),
            str(row["N"]),
            str(row["processes"]),
            str(row["K"]),
            f"{row['N / (K M)']:.3g}",
            str(row["vertices per step"]),
            str(row["steps"]),
            row["schedule"].replace("_", "-"),
            str(len(row["seeds"])),
            _mean_sd(row, "val_code_use", ".1f", 100, "%"),
            _mean_sd(row, "train_code_use", ".1f", 100, "%"),
            _mean_sd(row, "val_perplexity", ".0f"),
            _mean_sd(row, "train_individual_perplexity", ".1f"),
            _mean_sd(row, "val_rmse", ".4f"),
            f"{row['cpu_seconds_per_step']:.3f}",
            f"{row['seconds_per_step']:.3f}",
            f"{row['step_peak_memory_mib']:.0f}",
            f"{row['val_rows_per_code']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _style(method: str) -> str:
    if method.startswith(("ste-", "rotation-")) or method == "simvq":
        return "--"
    return ":" if method.endswith("-perplexity") else "-"


def series(row: dict[str, Any]) -> str:
    """The method of a row, with KNN-CE's regularizer weight where the row has one."""
    weight = row.get("weight")
    return row["method"] if weight is None else f"{row['method']}, weight {weight:g}"


def plot_code_use_vs_m(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Held-out code use against M (log scale) per method, error bars over seeds; and held-out code use (every 8th
    held-out patch) over training for every setting's first seed."""
    fig, (by_m, over_training) = plt.subplots(1, 2, figsize=(13, 5))
    methods = list(dict.fromkeys(series(row) for row in rows))
    colors = dict(zip(methods, plt.get_cmap("tab10").colors, strict=False))
    for method in methods:
        mine = sorted((row for row in rows if series(row) == method), key=lambda row: row["M"])
        by_m.errorbar(
            [row["M"] for row in mine],
            [100 * row["val_code_use"] for row in mine],
            yerr=[100 * row["val_code_use_sd"] for row in mine],
            fmt=_style(method),
            marker="o",
            capsize=3,
            color=colors[method],
            label=method,
        )
        for row in mine:
            if row["curves"] and row["curves"][0]:
                steps, use = zip(*row["curves"][0], strict=True)
                over_training.plot(
                    steps,
                    [100 * u for u in use],
                    _style(method),
                    marker="o",
                    markersize=3,
                    color=colors[method],
                    alpha=min(1.0, max(0.3, 0.3 + 0.1 * math.log2(row["M"] / 1024))),
                    label=f"{method}, M={row['M']}",
                )
    by_m.set_xscale("log", base=2)
    by_m.set(xlabel="codebook size M", ylabel="code use on held-out patches (%)", ylim=(0, 102))
    by_m.set_title("code use against M (mean ± sd over seeds)")
    by_m.legend(fontsize=8)
    over_training.set(xlabel="training step", ylabel="held-out code use, every 8th patch (%)", ylim=(0, 102))
    over_training.set_title("over training (seed 0)")
    over_training.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_levers(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Held-out code use (every 8th held-out patch) against rows seen (all processes), one line per lever setting;
    and final code use against N / (K S) (N the rows searched for neighbours, S vertices regularized per step)."""
    fig, (curves, ratio) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.get_cmap("tab10").colors
    for index, row in enumerate(rows):
        if not row["curves"] or not row["curves"][0]:
            continue
        steps, use = zip(*row["curves"][0], strict=True)
        name = f"{row.get('lever', '')}: M={row['M']}, w={row.get('weight') or 1:g}, N={row['N']}x{row['processes']}"
        name += f", K={row['K']}, S={row['vertices per step']}"
        name += f", {row['steps']} steps, {row['schedule']}"
        seen = [step * row["N"] * row["processes"] / 1e6 for step in steps]
        curves.plot(seen, [100 * u for u in use], "-", marker="o", color=colors[index % 10], label=name)
        per_vertex = row["searched rows"] / (row["K"] * row["vertices per step"])
        ratio.scatter([per_vertex], [100 * row["val_code_use"]], color=colors[index % 10], label=name, zorder=3)
    curves.set(xlabel="rows seen (millions)", ylabel="held-out code use, every 8th patch (%)", ylim=(0, 102))
    sizes = sorted({row["M"] for row in rows})
    curves.set_title(f"KNN-CE, M = {' and '.join(map(str, sizes))}: code use over training")
    curves.legend(fontsize=7)
    ratio.set_xscale("log", base=2)
    ratio.set(xlabel="N / (K S): rows per neighbour slot in a step", ylabel="final held-out code use (%)")
    ratio.set_title("final code use against N / (K S)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_step_cost(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """CPU seconds and peak memory of one training step per method and M (grouped bars, log scale)."""
    fig, (seconds, memory) = plt.subplots(1, 2, figsize=(12, 4.5))
    sizes = sorted({row["M"] for row in rows})
    methods = list(dict.fromkeys(row["method"] for row in rows))
    width = 0.8 / max(1, len(methods))
    for index, method in enumerate(methods):
        mine = {row["M"]: row for row in rows if row["method"] == method}
        xs = [position + index * width for position, m in enumerate(sizes) if m in mine]
        seconds.bar(xs, [mine[m]["cpu_seconds_per_step"] for m in sizes if m in mine], width, label=method)
        memory.bar(xs, [mine[m]["step_peak_memory_mib"] for m in sizes if m in mine], width, label=method)
    for axis, label in ((seconds, "CPU seconds per step (1 thread)"), (memory, "peak memory of training (MiB)")):
        axis.set_xticks([position + 0.4 - width / 2 for position in range(len(sizes))], [f"M={m}" for m in sizes])
        axis.set(ylabel=label, yscale="log")
        axis.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
