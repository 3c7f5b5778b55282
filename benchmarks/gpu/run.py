"""One prepared GPU check: the CUDA tests, then timings and peak memory of the softmax + KNN-CE layer.

Run from the repository root on a machine with one GPU (no package registry needed)::

    OUT=/some/folder PYTHONPATH=plugin python benchmarks/gpu/run.py [--quick]

It writes ``$OUT/gpu_benchmark.json`` and ``$OUT/gpu_benchmark.md``. Stages:

1. Tests: ``tests/test_triton_backend.py`` on CUDA tensors (``SIMPLEXVQ_TRITON_TEST_DEVICE=cuda``) and the core
   test files' CUDA cases (``-k "cuda or gpu"``), each in a subprocess with a time limit.
2. Timings: forward + backward (CUDA events, median after warm-up; peak ``torch.cuda.max_memory_allocated``) of
   the six-GEMM floor, the dense path, the reference backend (``simplexvq.scale.reference_streamed_softmax_quantize``),
   the Triton backend with and without KNN-CE, the ``ProductQuantizer`` layer (dense, and with the Triton
   backend), and vector-quantize-pytorch's ``VectorQuantize``, at the sizes of
   the issue, in float32 and bfloat16. Every measurement is guarded: an error (out of memory, a kernel that does
   not compile, a missing package) is recorded and the script goes on. A time budget skips what would overrun.

``--dry-run`` runs the whole script on the CPU at tiny sizes (Triton in its interpreter) to check it without a
GPU. vector-quantize-pytorch and its pure-Python dependencies come from wheels in ``benchmarks/gpu/wheels/``
(see README.md), unpacked on first use; without them that column records the error.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WHEELS = Path(__file__).resolve().parent / "wheels"
FULL_SIZES = [(16384, 1024, 256), (65536, 8196, 64), (65536, 65536, 64), (262144, 16384, 64)]
QUICK_SIZES = [(16384, 1024, 256), (65536, 8196, 64)]
DRY_SIZES = [(40, 24, 16), (33, 20, 8)]
KNN_K = 8
TEMPERATURE = 0.1
METHODS = [
    "six-GEMM floor",
    "dense",
    "reference",
    "triton",
    "triton, no KNN",
    "layer, dense",
    "layer, triton",
    "vector-quantize-pytorch",
]
LAYER_METHODS = {"layer, dense": False, "layer, triton": True}  # memory_efficient


@dataclass
class Measurement:
    """One (method, size, dtype) timing: median milliseconds of forward + backward, peak MiB, or the error."""

    method: str
    n: int
    m: int
    d: int
    dtype: str
    ms: float | None = None
    all_ms: list[float] = field(default_factory=list)
    peak_mib: float | None = None
    error: str | None = None


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two sizes, fewer repetitions, tests without -x")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (Triton interpreter)")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="output folder (default: $OUT)")
    parser.add_argument("--skip-tests", action="store_true", help="timings only")
    parser.add_argument("--budget-s", type=float, default=None, help="wall-clock budget of the whole script")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------------------
# Environment: the checkout's core, the peer from wheels
# --------------------------------------------------------------------------------------------------------------


def _use_checkout() -> None:
    plugin = str(REPO / "plugin")
    if plugin not in sys.path:
        sys.path.insert(0, plugin)


def _use_wheels() -> str:
    """Make vector-quantize-pytorch importable: installed already, or unpacked from ``wheels/*.whl``."""
    try:
        import vector_quantize_pytorch  # noqa: F401

        return "installed"
    except ImportError:
        pass
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        return f"no wheels in {WHEELS}"
    site = WHEELS / "site"
    for wheel in wheels:  # pure-Python wheels are zip files of the package folders
        marker = site / f".{wheel.name}.unpacked"
        if not marker.exists():
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(site)
            marker.touch()
    sys.path.insert(0, str(site))
    return f"unpacked {len(wheels)} wheels"


# --------------------------------------------------------------------------------------------------------------
# Stage 1: tests
# --------------------------------------------------------------------------------------------------------------


def _pytest(args: list[str], env: dict[str, str], timeout: float) -> dict:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as expired:
        output, code = f"timed out after {timeout} s\n{expired.stdout or ''}", None
    summary = [line for line in output.splitlines() if " passed" in line or " failed" in line or " error" in line]
    return {
        "command": " ".join(command[1:]),
        "returncode": code,
        "seconds": round(time.perf_counter() - started, 1),
        "summary": summary[-1] if summary else "",
        "tail": output[-4000:],
    }


def run_tests(dry_run: bool, quick: bool) -> list[dict]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "plugin"), env.get("PYTHONPATH")]))
    if dry_run:  # the interpreter on CPU tensors; one cheap case proves the harness
        return [_pytest(["tests/test_triton_backend.py", "-k", "triton_available"], env, 120)]
    env["SIMPLEXVQ_TRITON_TEST_DEVICE"] = "cuda"
    env.pop("TRITON_INTERPRET", None)
    limit = 90 if quick else 150
    core = [str(p.relative_to(REPO)) for p in sorted((REPO / "tests").glob("test_*.py"))]
    wanted = ("test_functional", "test_knn_scale", "test_quantizer", "test_backends", "test_sync_free", "test_compile")
    core = [p for p in core if Path(p).stem in wanted]
    return [
        _pytest(["tests/test_triton_backend.py"], env, limit),
        _pytest([*core, "-k", "cuda or gpu", "--continue-on-collection-errors"], env, limit),
    ]


# --------------------------------------------------------------------------------------------------------------
# Stage 2: timings
# --------------------------------------------------------------------------------------------------------------


def _inputs(n: int, m: int, d: int, dtype, device):
    import torch

    generator = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(n, 1, d, generator=generator).to(device=device, dtype=dtype).requires_grad_(True)
    codebook = torch.randn(1, m, d, generator=generator).to(device=device, dtype=dtype).requires_grad_(True)
    temperature = torch.full((1,), TEMPERATURE, device=device, dtype=dtype, requires_grad=True)
    return z, codebook, temperature


def _step_of(method: str, n: int, m: int, d: int, dtype, device) -> Callable[[], None]:
    """A closure running one forward + backward of ``method`` on fixed inputs (gradients returned, not kept)."""
    import torch

    from simplexvq import functional as VQF
    from simplexvq.scale import reference_streamed_softmax_quantize

    z, codebook, temperature = _inputs(n, m, d, dtype, device)
    inputs = [z, codebook, temperature]

    if method == "six-GEMM floor":  # the products of a softmax attention layer, nothing else
        q, k = z.detach()[:, 0], codebook.detach()[0]
        upstream = torch.randn_like(q)

        def step() -> None:
            logits = q @ k.t()
            _ = logits @ k  # output
            grad_logits = upstream @ k.t()
            _ = logits.t() @ upstream  # values
            _ = grad_logits @ k  # queries
            _ = grad_logits.t() @ q  # keys

        return step

    if method == "dense":

        def step() -> None:
            log_pi = torch.log_softmax(VQF.cosine_logits(z, codebook, temperature), dim=-1)
            out = torch.einsum("ngm,gmd->ngd", log_pi.exp(), codebook)
            loss = out.float().square().mean() + VQF.knn_loss(log_pi, KNN_K, "ce").float()
            torch.autograd.grad(loss, inputs)

        return step

    if method == "reference":

        def step() -> None:
            result = reference_streamed_softmax_quantize(z, codebook, temperature, knn_k=KNN_K)
            loss = result.quantized.float().square().mean() + result.knn_loss.float()
            torch.autograd.grad(loss, inputs)

        return step

    if method in ("triton", "triton, no KNN"):
        from simplexvq.scale.triton import triton_streamed_softmax_quantize

        k = KNN_K if method == "triton" else None

        def step() -> None:
            result = triton_streamed_softmax_quantize(z, codebook, temperature, knn_k=k)
            loss = result.quantized.float().square().mean()
            if k is not None:
                loss = loss + result.knn_loss.float()
            torch.autograd.grad(loss, inputs)

        return step

    if method in LAYER_METHODS:  # the whole ProductQuantizer (softmax-knn_ce), as users run it
        import dataclasses

        import simplexvq

        config = simplexvq.quantizer_config("softmax-knn_ce", dim=d, groups=1, codebook_size=m, knn_k=KNN_K)
        fields = {f.name for f in dataclasses.fields(config)}
        if LAYER_METHODS[method]:
            if "backend" not in fields:
                raise RuntimeError("QuantizerConfig has no backend field: the backend seam is not in this checkout")
            config = dataclasses.replace(config, memory_efficient=True, backend="triton")
        layer = simplexvq.ProductQuantizer(config).to(device)
        x = z.detach().reshape(n, d).requires_grad_(True)
        parameters = [p for p in layer.parameters() if p.requires_grad]

        def step() -> None:
            out = layer(x)
            loss = out.quantized.float().square().mean() + out.loss.float()
            torch.autograd.grad(loss, [x, *parameters])

        return step

    if method == "vector-quantize-pytorch":
        from vector_quantize_pytorch import VectorQuantize

        layer = VectorQuantize(dim=d, codebook_size=m).to(device)
        x = z.detach().float().reshape(1, n, d).requires_grad_(True)
        autocast = dtype != torch.float32

        def step() -> None:
            with torch.autocast(device_type=device.type, dtype=dtype, enabled=autocast):
                quantized, _, loss = layer(x)
                total = quantized.float().square().mean() + loss.float().sum()
            torch.autograd.grad(total, [x, *[p for p in layer.parameters() if p.requires_grad]], allow_unused=True)

        return step

    raise ValueError(f"unknown method {method!r}")


def measure(method: str, size: tuple[int, int, int], dtype, device, warmup: int, reps: int) -> Measurement:
    import torch

    n, m, d = size
    record = Measurement(method, n, m, d, str(dtype).replace("torch.", ""))
    cuda = device.type == "cuda"
    try:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        step = _step_of(method, n, m, d, dtype, device)
        started = time.perf_counter()
        step()  # first call: compilation, caches
        if cuda:
            torch.cuda.synchronize()
        if time.perf_counter() - started > 5.0:  # slow method: one more timed call is enough
            warmup, reps = 0, 1
        for _ in range(warmup):
            step()
        times = []
        for _ in range(reps):
            if cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                step()
                end.record()
                torch.cuda.synchronize()
                times.append(begin.elapsed_time(end))
            else:
                begin_s = time.perf_counter()
                step()
                times.append(1000.0 * (time.perf_counter() - begin_s))
        record.ms, record.all_ms = statistics.median(times), times
        if cuda:
            record.peak_mib = torch.cuda.max_memory_allocated() / 2**20
    except Exception as error:  # noqa: BLE001 - every failure is a result to report
        record.error = f"{type(error).__name__}: {error}"[:500]
        if not isinstance(error, (ImportError, MemoryError)) and "out of memory" not in str(error):
            record.error += "\n" + traceback.format_exc(limit=3)[-1500:]
    finally:
        if cuda:
            torch.cuda.empty_cache()
    return record


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def _cell(record: Measurement | None) -> str:
    if record is None:
        return "-"
    if record.error is not None:
        first = record.error.splitlines()[0]
        return "OOM" if "out of memory" in first else f"error ({first[:60]})"
    peak = "" if record.peak_mib is None else f" / {record.peak_mib:,.0f} MiB"
    return f"{record.ms:.2f} ms{peak}"


def markdown(report: dict) -> str:
    records = [Measurement(**r) for r in report["measurements"]]
    lines = [
        "# GPU check of the softmax + KNN-CE layer",
        "",
        f"Device: {report['device']}; torch {report['torch']}, triton {report['triton']}; "
        f"K = {KNN_K}, G = 1, cosine logits, temperature {TEMPERATURE}; {report['mode']} mode.",
        "Times: forward + backward, median over CUDA events after warm-up; memory: peak allocated.",
        "",
        "## Tests",
        "",
    ]
    for test in report["tests"]:
        lines.append(f"- `{test['command']}`: rc {test['returncode']}, {test['summary'] or 'no summary'}")
    for dtype in sorted({r.dtype for r in records}):
        lines += ["", f"## {dtype}", "", "| N, M, D | " + " | ".join(METHODS) + " |", "|---" * (len(METHODS) + 1) + "|"]
        sizes = sorted({(r.n, r.m, r.d) for r in records if r.dtype == dtype}, key=lambda s: s[0] * s[1])
        for size in sizes:
            row = {r.method: r for r in records if r.dtype == dtype and (r.n, r.m, r.d) == size}
            lines.append(
                f"| {size[0]}, {size[1]}, {size[2]} | " + " | ".join(_cell(row.get(m)) for m in METHODS) + " |"
            )
        lines += ["", "Goals (Triton backend): within 2x of the floor, faster than dense, KNN-CE overhead < 10%.", ""]
        for size in sizes:
            row = {r.method: r for r in records if r.dtype == dtype and (r.n, r.m, r.d) == size and r.ms is not None}
            triton = row.get("triton")
            if triton is None:
                continue
            parts = []
            if "six-GEMM floor" in row:
                parts.append(f"{triton.ms / row['six-GEMM floor'].ms:.2f}x the floor")
            if "dense" in row:
                parts.append(f"dense / triton = {row['dense'].ms / triton.ms:.2f}")
            if "triton, no KNN" in row:
                parts.append(f"KNN-CE overhead {100 * (triton.ms / row['triton, no KNN'].ms - 1):+.1f}%")
            lines.append(f"- {size}: " + ", ".join(parts))
    errors = [r for r in records if r.error]
    if errors:
        lines += ["", "## Errors", ""]
        lines += [f"- {r.method} {r.n, r.m, r.d} {r.dtype}: {r.error.splitlines()[0]}" for r in errors]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    started = time.perf_counter()
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    if args.out is None:
        raise SystemExit("run.py: name an output folder with --out or $OUT")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _use_checkout()
    wheels = _use_wheels()
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "missing"
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        raise SystemExit("run.py: no CUDA device; use --dry-run to check the script on the CPU")
    device = torch.device("cuda" if cuda else "cpu")
    budget = args.budget_s or (60.0 if args.dry_run else 450.0)
    report: dict = {
        "mode": "dry-run" if args.dry_run else ("quick" if args.quick else "full"),
        "device": torch.cuda.get_device_name() if cuda else "cpu (dry run)",
        "torch": torch.__version__,
        "triton": triton_version,
        "python": sys.version.split()[0],
        "wheels": wheels,
        "tests": [],
        "measurements": [],
    }

    def save() -> None:
        (out / "gpu_benchmark.json").write_text(json.dumps(report, indent=1))
        (out / "gpu_benchmark.md").write_text(markdown(report))

    if not args.skip_tests:
        report["tests"] = run_tests(args.dry_run, args.quick)
        save()
    sizes = DRY_SIZES if args.dry_run else (QUICK_SIZES if args.quick else FULL_SIZES)
    dtypes = [torch.float32, torch.float16 if args.dry_run else torch.bfloat16]
    warmup, reps = (1, 1) if args.dry_run else ((1, 3) if args.quick else (2, 5))
    for dtype in dtypes:
        for size in sizes:
            for method in METHODS:
                if time.perf_counter() - started > budget:
                    record = Measurement(method, *size, str(dtype).replace("torch.", ""), error="skipped: time budget")
                else:
                    record = measure(method, size, dtype, device, warmup, reps)
                report["measurements"].append(asdict(record))
                print(f"{method:24s} {size} {dtype}: {_cell(record)}", flush=True)
            save()
    report["seconds"] = round(time.perf_counter() - started, 1)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
