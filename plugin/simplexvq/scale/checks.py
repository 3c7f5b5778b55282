"""Argument checks shared by every entry point of eq. 13 at scale; messages name the problem and the fix."""

from __future__ import annotations

import numbers
from typing import Literal

import torch
from torch import Tensor

from simplexvq.functional import KnnDistance

KnnScope = Literal["local", "global"]
SCOPES: tuple[str, ...] = ("local", "global")

__all__ = [
    "SCOPES",
    "KnnDistance",
    "KnnScope",
    "check_choice",
    "check_chunk_size",
    "check_k",
    "check_k_fits",
    "check_kernel_inputs",
    "check_request_tensors",
    "check_vertex_shape",
    "check_vertex_values",
    "check_vertex_values_on_device",
    "check_vertices",
]

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_choice(function: str, name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{function}: {name} must be {' or '.join(repr(c) for c in choices)}, got {value!r}")


def check_request_tensors(z: object, codebook: object, temperature: object, valid: object, function: str) -> None:
    """Shapes of the streamed layer's tensors: ``z`` (N, G, d), ``codebook`` (G, M, d), ``temperature`` (G,),
    ``valid`` ``None`` or (N,) bool on z's device."""
    for name, value in (("z", z), ("codebook", codebook), ("temperature", temperature)):
        if not isinstance(value, Tensor):
            raise ValueError(f"{function}: {name} must be a tensor, got {type(value).__name__}")
    if z.dim() != 3 or codebook.dim() != 3 or z.shape[1:] != (codebook.shape[0], codebook.shape[2]):
        raise ValueError(
            f"{function}: z must be (N, G, d) and codebook (G, M, d), got {tuple(z.shape)} and {tuple(codebook.shape)}"
        )
    if temperature.shape != (codebook.shape[0],):
        raise ValueError(
            f"{function}: temperature must have shape (G,) = ({codebook.shape[0]},), got {tuple(temperature.shape)}"
        )
    if valid is not None and (
        not isinstance(valid, Tensor)
        or valid.dtype != torch.bool
        or valid.shape != z.shape[:1]
        or valid.device != z.device
    ):
        got = (
            f"{valid.dtype} of shape {tuple(valid.shape)} on {valid.device}"
            if isinstance(valid, Tensor)
            else type(valid).__name__
        )
        raise ValueError(
            f"{function}: valid must be a bool tensor of shape (N,) = ({z.shape[0]},) on {z.device} marking the rows "
            f"that take part, got {got}"
        )


def check_kernel_inputs(z: Tensor, codebook: Tensor, temperature: Tensor, function: str) -> None:
    """What fused kernels need beyond the request: one floating dtype and one device for the three inputs (and no
    bfloat16 on CPU tensors, which Triton's interpreter misreads)."""
    if z.dtype not in KERNEL_DTYPES or codebook.dtype != z.dtype or temperature.dtype != z.dtype:
        raise ValueError(
            f"{function}: z, codebook and temperature must share one dtype among float16, bfloat16, float32 and "
            f"float64, got {z.dtype}, {codebook.dtype} and {temperature.dtype}: cast them to one dtype first"
        )
    if codebook.device != z.device or temperature.device != z.device:
        raise ValueError(
            f"{function}: z, codebook and temperature must be on one device, got {z.device}, {codebook.device} and "
            f"{temperature.device}: move them to one device first"
        )
    if z.dtype == torch.bfloat16 and z.device.type == "cpu":
        raise ValueError(
            f"{function}: bfloat16 CPU tensors cannot run: Triton's interpreter misreads bfloat16 memory; use float16, "
            "float32 or float64 on the CPU (bfloat16 runs on CUDA tensors)"
        )


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
    vertices = check_vertex_shape(vertices, groups, function)
    if vertices is None:
        return None
    check_vertex_values(vertices, codebook_size, function)
    return vertices.long()


def check_vertex_shape(vertices: object, groups: int, function: str) -> Tensor | None:
    """A vertex subset, (S,) shared by every group or (G, S), as (G, S) (its dtype and device unchanged); only the
    type and shape are checked (nothing is read back)."""
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
    return vertices


def _vertex_problems(vertices: Tensor, codebook_size: int, function: str) -> tuple[Tensor, str, Tensor, str]:
    out_of_range = (vertices < 0).any() | (vertices >= codebook_size).any()
    ordered = vertices.sort(dim=-1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any()
    range_message = f"{function}: vertices must lie in [0, M={codebook_size})"
    repeat_message = f"{function}: vertices must not repeat within a group (a repeated vertex counts twice)"
    return out_of_range, range_message, repeated, repeat_message


def check_vertex_values_on_device(vertices: Tensor | None, codebook_size: int, function: str) -> None:
    """The values of a (G, S) vertex subset, checked on the device without a host read (``RuntimeError`` on the
    CPU, a device-side assertion on a GPU)."""
    if vertices is None:
        return
    out_of_range, range_message, repeated, repeat_message = _vertex_problems(vertices, codebook_size, function)
    torch._assert_async(~out_of_range, range_message)
    torch._assert_async(~repeated, repeat_message)


def check_vertex_values(vertices: Tensor | None, codebook_size: int, function: str) -> None:
    """The values of a (G, S) vertex subset: ``ValueError`` (reads two flags back), or device-side assertions
    under ``torch.compile``."""
    if vertices is None:
        return
    if torch.compiler.is_compiling():  # traced: checked on the device, nothing read back
        check_vertex_values_on_device(vertices, codebook_size, function)
        return
    out_of_range, range_message, repeated, repeat_message = _vertex_problems(vertices, codebook_size, function)
    if bool(out_of_range):
        raise ValueError(range_message)
    if bool(repeated):
        raise ValueError(repeat_message)
