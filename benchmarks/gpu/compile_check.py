"""Compile the Triton kernels for a GPU target on a machine without a GPU (Triton's compiler and its ptxas).

The interpreter does not enforce what GPU compilation does (block shapes, ``tl.dot`` operand sizes, shared
memory): this compiles every kernel for, by default, compute capability 9.0 (H100 / H200) with the tiles
:func:`simplexvq.scale.triton.launch.block_sizes` picks for CUDA, for each input dtype, feature width D (64, 128,
256) and, for the column pass, KNN size K (8, 32, 128), and reports per variant: shared memory, registers per
thread, spill stores / loads and stack frame (``ptxas -v`` on the kernel's PTX), and the occupancy these allow
on an SM of that architecture (warps resident / maximum, from its register file, shared memory, thread and block
limits)::

    PYTHONPATH=plugin python benchmarks/gpu/compile_check.py [--quick] [--arch 90] [--out benchmarks/results]

It prints one JSON record per compiled variant, writes ``compile_check.json`` and ``compile_check.md`` to
``--out`` when given, and exits non-zero if any variant fails or exceeds the shared memory.
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
# Per-SM limits (CUDA programming guide, "Compute capabilities", table of technical specifications): 32-bit
# registers, shared memory (bytes), resident warps, resident blocks; 1 KiB of shared memory is reserved per block.
SM_LIMITS = {
    80: {"registers": 65536, "shared": 167936, "warps": 64, "blocks": 32},
    86: {"registers": 65536, "shared": 102400, "warps": 48, "blocks": 16},
    89: {"registers": 65536, "shared": 102400, "warps": 48, "blocks": 24},
    90: {"registers": 65536, "shared": 233472, "warps": 64, "blocks": 32},
}
KNN_SIZES = (8, 32, 128)
POINTER_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


@dataclass(frozen=True)
class Variant:
    """One compilation: kernel name, input dtype, feature width, the kernel's boolean / mode switches and, for
    the column pass, the KNN size K."""

    kernel: str
    dtype: str
    dim: int
    switches: tuple[tuple[str, int | bool], ...]
    k: int = 0


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
    dims = [64] if quick else [64, 128, 256]
    out: list[Variant] = []
    for dtype, dim in itertools.product(dtypes, dims):
        if dtype == "float64" and dim > 64:
            continue  # float64 is the tests' exact path (elementwise products), compiled at one width
        out.append(Variant("softmax_rows_kernel", dtype, dim, (("HAS_BIAS", True), ("HAS_OUT", True))))
        if quick:
            out.append(Variant("softmax_columns_kernel", dtype, dim, (("HAS_BIAS", True), ("KNN", 2)), k=8))
        else:
            out.append(Variant("softmax_columns_kernel", dtype, dim, (("HAS_BIAS", True), ("KNN", 0))))
            for knn, k in itertools.product((1, 2), KNN_SIZES):
                out.append(Variant("softmax_columns_kernel", dtype, dim, (("HAS_BIAS", True), ("KNN", knn)), k=k))
        flags = (("HAS_BIAS", True), ("HAS_GRAD_OUT", True), ("HAS_QUAD", True))
        out.append(Variant("softmax_backward_kernel", dtype, dim, flags))
    return out


def _ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers per thread, spill stores / loads and stack frame (bytes) of a kernel, from ``ptxas -v`` (the
    ptxas that ships with Triton's NVIDIA backend); empty if it is not there."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not tool.exists():
        return {}
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.ptx"
        path.write_text(ptx)
        done = subprocess.run(
            [str(tool), "-v", f"-arch=sm_{arch}{suffix}", str(path), "-o", str(Path(folder) / "kernel.cubin")],
            capture_output=True,
            text=True,
        )
    listing = done.stdout + done.stderr
    usage = {}
    found = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", listing)
    if found:
        usage.update(stack=int(found.group(1)), spill_stores=int(found.group(2)), spill_loads=int(found.group(3)))
    found = re.search(r"Used (\d+) registers", listing)
    if found:
        usage["registers"] = int(found.group(1))
    return usage


def occupancy(registers: int, shared: int, num_warps: int, arch: int) -> dict:
    """Blocks and warps resident per SM and the occupancy (resident / maximum warps) that registers per thread,
    shared memory per block and warps per block allow (registers are allocated per warp in units of 256)."""
    limits = SM_LIMITS.get(arch, SM_LIMITS[90])
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_registers = (limits["registers"] // per_warp) // num_warps
    by_shared = limits["shared"] // (shared + 1024)
    by_warps = limits["warps"] // num_warps
    blocks = min(by_registers, by_shared, by_warps, limits["blocks"])
    limiter = min(
        (("registers", by_registers), ("shared memory", by_shared), ("warps", by_warps)), key=lambda item: item[1]
    )[0]
    return {
        "blocks_per_sm": blocks,
        "occupancy": round(blocks * num_warps / limits["warps"], 3),
        "limited_by": limiter,
    }


def compile_variant(variant: Variant, arch: int) -> dict:
    """Compile one variant; returns seconds, shared memory, registers (or the error)."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from simplexvq.scale.triton import kernels
    from simplexvq.scale.triton.launch import block_sizes, knn_slots

    fn = getattr(kernels, variant.kernel)
    dtype = getattr(torch, variant.dtype)
    backward = variant.kernel == "softmax_backward_kernel"
    columns = variant.kernel == "softmax_columns_kernel"
    blocks = block_sizes(torch.device("cuda"), variant.dim, 1 if columns else variant.dim, dtype, backward=backward)
    constants: dict[str, object] = dict(variant.switches, ELEMENTWISE=dtype == torch.float64)
    constants["DOT_PRECISION"] = "tf32" if variant.dtype == "float32" else "ieee"
    constants.update(BLOCK_N=blocks.rows, BLOCK_M=blocks.columns, BLOCK_D=blocks.dim, BLOCK_DV=blocks.value_dim)
    if columns:
        constants.pop("BLOCK_DV")
        constants["BLOCK_K"] = knn_slots(variant.k)
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
    record = {
        "kernel": variant.kernel,
        "dtype": variant.dtype,
        "dim": variant.dim,
        "k": variant.k,
        "switches": dict(variant.switches),
        "tiles": [blocks.rows, blocks.columns],
        "num_warps": blocks.num_warps,
        "num_stages": blocks.num_stages,
    }
    try:
        compiled = triton.compile(
            ASTSource(fn, signature, constexprs=constants),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": blocks.num_warps, "num_stages": blocks.num_stages},
        )
        record.update(shared=compiled.metadata.shared, ok=compiled.metadata.shared <= SHARED_LIMIT.get(arch, 101376))
        record.update(_ptxas_usage(compiled.asm["ptx"], arch))
        if "registers" in record:
            record.update(occupancy(record["registers"], record["shared"], blocks.num_warps, arch))
    except Exception as error:  # noqa: BLE001 - a compile failure is the result to report
        record.update(ok=False, error=f"{type(error).__name__}: {str(error)[:1000]}")
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def markdown(records: list[dict], arch: int) -> str:
    """The records as a Markdown table (one row per variant)."""
    lines = [
        f"Kernels compiled for sm_{arch} without a GPU: `PYTHONPATH=plugin python benchmarks/gpu/compile_check.py "
        "--out benchmarks/results` (Triton's compiler, `ptxas -v`; occupancy from the SM's limits).",
        "",
        "| kernel | dtype | D | K | switches | tiles (rows x keys) | warps | stages | registers | spill st / ld "
        "(bytes) | shared (bytes) | blocks / SM | occupancy | limited by |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        switches = ", ".join(f"{name}={value}" for name, value in r["switches"].items())
        if not r["ok"] and "registers" not in r:
            lines.append(
                f"| {r['kernel']} | {r['dtype']} | {r['dim']} | {r['k'] or ''} | {switches} | "
                f"{r['tiles'][0]} x {r['tiles'][1]} | {r['num_warps']} | {r['num_stages']} | failed: "
                f"{r.get('error', '')[:80]} | | | | | |"
            )
            continue
        lines.append(
            f"| {r['kernel']} | {r['dtype']} | {r['dim']} | {r['k'] or ''} | {switches} | {r['tiles'][0]} x "
            f"{r['tiles'][1]} | {r['num_warps']} | {r['num_stages']} | {r.get('registers', '?')} | "
            f"{r.get('spill_stores', '?')} / {r.get('spill_loads', '?')} | {r['shared']} | "
            f"{r.get('blocks_per_sm', '?')} | {r.get('occupancy', '?')} | {r.get('limited_by', '?')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100 / H200)")
    parser.add_argument("--quick", action="store_true", help="bfloat16, D = 64, the richest switches only")
    parser.add_argument("--out", type=Path, default=None, help="folder for compile_check.json and .md")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("compile_check.py: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
    sys.path.insert(0, str(REPO / "plugin"))
    failures = 0
    records = []
    for variant in variants(args.quick):
        record = compile_variant(variant, args.arch)
        failures += not record["ok"]
        records.append(record)
        print(json.dumps(record), flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        report = {"arch": args.arch, "quick": args.quick, "records": records}
        (args.out / "compile_check.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / "compile_check.md").write_text(markdown(records, args.arch))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
