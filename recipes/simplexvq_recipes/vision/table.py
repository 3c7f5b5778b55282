"""Evaluation numbers as a row of the paper's Table 1 (method | variant | Code Use | rMSE | FID | IS)."""

from __future__ import annotations

from typing import Any

_FAMILIES = {"ste": "STE", "rotation": "RE", "hard_gumbel": "H-Gmb", "soft_gumbel": "S-Gmb", "softmax": "Softmax"}
_VARIANTS = {
    "euclid": "Euclid",
    "cosine": "Cosine",
    "perplexity": "PPL",
    "knn_l2": "KNN-L2",
    "knn_ce": "KNN-CE",
    "none": "none",
}


def paper_label(method: str) -> tuple[str, str]:
    """Table 1's two method columns for a registry name: ``softmax-knn_ce`` -> (``Softmax``, ``KNN-CE``)."""
    family, _, variant = method.partition("-")
    if family in _FAMILIES and variant in _VARIANTS:
        return _FAMILIES[family], _VARIANTS[variant]
    return ("SimVQ", "") if method == "simvq" else (method, "")


def _number(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def table1_markdown(metrics: dict[str, Any]) -> str:
    """Title, header and one row. Without Inception weights the FID column is renamed to the fallback's name."""
    family, variant = paper_label(metrics["method"])
    pretrained = metrics.get("fid") is not None
    fd_header = (
        "FID (↓)" if pretrained or "feature_network" not in metrics else "FD random-init Inception-v3, not FID (↓)"
    )
    fd_value = metrics.get("fid") if pretrained else metrics.get("fd_random_inception_v3")
    title = f"Feature Map Size; Codebook Size: {metrics['feature_map']}; {metrics['codebook_size']}"
    header = f"| Method | | Code Use (↑) | rMSE (↓) | {fd_header} | IS (↑) |"
    row = (
        f"| {family} | {variant} | {100 * metrics['usage']:.1f}% | {metrics['rmse']:.3f} | {_number(fd_value)} | "
        f"{_number(metrics.get('inception_score'))} |"
    )
    return "\n".join([title, "", header, "|---|---|---|---|---|---|", row]) + "\n"
