"""Compile the Triton kernels for a GPU target on a machine without a GPU (Triton's compiler and its ptxas).

The interpreter does not enforce what GPU compilation does (block shapes, ``tl.dot`` operand sizes, shared
memory): this compiles every kernel for, by default, compute capability 9.0 (H100 / H200) with the block sizes
:func:`simplexvq.scale.triton.launch.block_sizes` picks for CUDA, and reports shared memory and registers::

    PYTHONPATH=plugin python benchmarks/gpu/compile_check.py [--quick] [--arch 90]

It prints one JSON record per compiled variant and exits non-zero if any fails or exceeds the shared memory.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes per block (opt-in maximum)
POINTER_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


@dataclass(frozen=True)
class Variant:
    """One compilation: kernel name, input dtype, feature width, and the kernel's boolean / mode switches."""

    kernel: str
    dtype: str
    dim: int
    switches: tuple[tuple[str, int | bool], ...]


def _signature(kernel: str, dtype: str) -> tuple[dict[str, str], set[str]]:
    """Pointer types by argument name (inputs in ``dtype``, per-row and partial results in the accumulation
    dtype) and the integer arguments."""
    element = "*" + POINTER_TYPES[dtype]
    accumulate = "*fp64" if dtype == "float64" else "*fp32"
    inputs = {"Q", "K", "V", "BIAS", "GRAD_OUT", "OUT", "GRAD_Q"}
    integers = {"N", "G", "M", "D", "DV", "NUM_K", "ROWS_PER_SPLIT", "SLICES"}
    pointers = {"VALID": "*i8", "INDICES": "*i64", "TOP_ROWS": "*i64"}
    from simplexvq.scale.triton import kernels

    for name in getattr(kernels, kernel).arg_names:
        if name not in integers and name not in pointers:
            pointers[name] = element if name in inputs else accumulate
    return pointers, integers


def variants(quick: bool) -> list[Variant]:
    dtypes = ["bfloat16"] if quick else ["float32", "bfloat16", "float16", "float64"]
    dims = [64] if quick else [64, 256]
    out: list[Variant] = []
    for dtype, dim in itertools.product(dtypes, dims):
        out.append(Variant("softmax_rows_kernel", dtype, dim, (("HAS_BIAS", True), ("HAS_OUT", True))))
        for knn in (0, 1, 2) if not quick else (2,):
            out.append(Variant("softmax_columns_kernel", dtype, dim, (("HAS_BIAS", True), ("KNN", knn))))
        flags = (("HAS_BIAS", True), ("HAS_GRAD_OUT", True), ("HAS_QUAD", True))
        out.append(Variant("softmax_backward_kernel", dtype, dim, flags))
    return out


def _resource_usage(cubin: bytes) -> dict:
    """Registers per thread and stack bytes (spills) of a compiled kernel, read with the cuobjdump that ships
    with Triton's NVIDIA backend; empty if it is not there."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return {}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        listing = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", listing)
    return {"registers": int(found.group(1)), "stack": int(found.group(2))} if found else {}


def compile_variant(variant: Variant, arch: int) -> dict:
    """Compile one variant; returns seconds, shared memory, registers (or the error)."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from simplexvq.scale.triton import kernels
    from simplexvq.scale.triton.launch import block_sizes

    fn = getattr(kernels, variant.kernel)
    dtype = getattr(torch, variant.dtype)
    backward = variant.kernel == "softmax_backward_kernel"
    blocks = block_sizes(torch.device("cuda"), variant.dim, variant.dim, dtype, backward=backward)
    constants: dict[str, object] = dict(variant.switches, ELEMENTWISE=dtype == torch.float64)
    constants["DOT_PRECISION"] = "tf32" if variant.dtype == "float32" else "ieee"
    constants.update(BLOCK_N=blocks.rows, BLOCK_M=blocks.columns, BLOCK_D=blocks.dim, BLOCK_DV=blocks.value_dim)
    if variant.kernel == "softmax_columns_kernel":
        constants.pop("BLOCK_DV")
        constants["BLOCK_K"] = 8
    pointers, integers = _signature(variant.kernel, variant.dtype)
    signature = {}
    for name in fn.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in integers:
            signature[name] = "i32"
        else:
            signature[name] = pointers[name]
    started = time.perf_counter()
    record = {"kernel": variant.kernel, "dtype": variant.dtype, "dim": variant.dim, "switches": dict(variant.switches)}
    try:
        compiled = triton.compile(
            ASTSource(fn, signature, constexprs=constants),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": blocks.num_warps, "num_stages": blocks.num_stages},
        )
        record.update(shared=compiled.metadata.shared, ok=compiled.metadata.shared <= SHARED_LIMIT.get(arch, 101376))
        record.update(_resource_usage(compiled.asm["cubin"]))
    except Exception as error:  # noqa: BLE001 - a compile failure is the result to report
        record.update(ok=False, error=f"{type(error).__name__}: {str(error)[:1000]}")
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100 / H200)")
    parser.add_argument("--quick", action="store_true", help="bfloat16, D = 64, the richest switches only")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("compile_check.py: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
    sys.path.insert(0, str(REPO / "plugin"))
    failures = 0
    for variant in variants(args.quick):
        record = compile_variant(variant, args.arch)
        failures += not record["ok"]
        print(json.dumps(record), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
