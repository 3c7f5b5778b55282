"""Argument checks shared by every entry point of eq. 13 at scale; messages name the problem and the fix."""

from __future__ import annotations

import numbers
from typing import Literal

import torch
from torch import Tensor

KnnScope = Literal["local", "global"]
KnnDistance = Literal["ce", "l2"]
SCOPES: tuple[str, ...] = ("local", "global")

__all__ = ["SCOPES", "KnnDistance", "KnnScope", "check_chunk_size", "check_k", "check_k_fits", "check_vertices"]


def check_k(k: object, function: str) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"{function}: k must be a positive integer, got {k!r}")
    return int(k)


def check_k_fits(k: int, num_rows: int, function: str, world_size: int = 1) -> None:
    """K larger than the (global) number of rows is an error: a smaller K would change the loss asked for."""
    if k <= num_rows:
        return
    if world_size > 1:
        raise ValueError(
            f"{function}: k={k} neighbours per code vector requested, but the batches of all {world_size} ranks "
            f"hold only N={num_rows} (unpadded) positions together; K must not exceed the global N: lower k or use "
            "larger batches"
        )
    raise ValueError(
        f"{function}: k={k} neighbours per code vector requested, but the batch holds only N={num_rows} "
        "(unpadded) positions; K must not exceed N: lower k or use a larger batch"
    )


def check_chunk_size(chunk_size: object, function: str) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(
            f"{function}: chunk_size must be a positive integer (rows per chunk) or None, got {chunk_size!r}"
        )
    return int(chunk_size)


def check_vertices(vertices: Tensor | None, groups: int, codebook_size: int, function: str) -> Tensor | None:
    """Validate a vertex subset, (S,) shared by every group or (G, S), and return it as (G, S) long."""
    if vertices is None:
        return None
    if not isinstance(vertices, Tensor) or vertices.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{function}: vertices must be an integer tensor of code indices, got {vertices!r}")
    if vertices.dim() == 1:
        vertices = vertices.unsqueeze(0).expand(groups, -1)
    if vertices.dim() != 2 or vertices.shape[0] != groups or vertices.shape[1] == 0:
        raise ValueError(
            f"{function}: vertices must have shape (S,) or (G={groups}, S) with S >= 1, got {tuple(vertices.shape)}"
        )
    out_of_range = (vertices < 0).any() | (vertices >= codebook_size).any()
    ordered = vertices.sort(dim=-1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any()
    range_message = f"{function}: vertices must lie in [0, M={codebook_size})"
    repeat_message = f"{function}: vertices must not repeat within a group (a repeated vertex counts twice)"
    if torch.compiler.is_compiling():  # traced: checked on the device, nothing read back
        torch._assert_async(~out_of_range, range_message)
        torch._assert_async(~repeated, repeat_message)
    elif bool(out_of_range):
        raise ValueError(range_message)
    elif bool(repeated):
        raise ValueError(repeat_message)
    return vertices.long()
