"""What every kernel benchmark shares: the timer, device peaks, and the printed table + JSON report.

Numbers are only meaningful on CUDA (triton.testing.do_bench). `--smoke` runs tiny shapes on CPU
under TRITON_INTERPRET=1 to check that a benchmark runs end to end; its timings are marked as such.
"""
import json
import os
import platform
import subprocess
import sys
import time

import torch

# Dense tensor-core peaks (bf16/fp16, no sparsity), fp32 SIMT peaks and HBM bandwidth from the
# vendor datasheets; matched as substrings of torch.cuda.get_device_name().
PEAKS = {  # name: (bf16 TFLOP/s, fp32 TFLOP/s, GB/s)
    "H200": (989.0, 67.0, 4800.0),
    "H100 PCIe": (756.0, 51.0, 2000.0),
    "H100": (989.0, 67.0, 3350.0),
    "A100-SXM4-80GB": (312.0, 19.5, 2039.0),
    "A100": (312.0, 19.5, 1555.0),
    "L4": (121.0, 30.3, 300.0),
}


def add_common_args(parser):
    parser.add_argument("--out", help="write the JSON report here (e.g. docs/bench/kernels/attention.json)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on CPU under TRITON_INTERPRET=1: checks the script, not speed")


def require_device(smoke: bool) -> str:
    """Return the device to benchmark on, or exit non-zero when only meaningless numbers are possible."""
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
        return "cpu"
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: kernel benchmarks need a GPU (use --smoke for a CPU run-through)")
    return "cuda"


def time_ms(fn, device: str) -> float:
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100)
    fn()  # smoke mode: one warm call, then one timed call; only shows that the path runs
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def device_peaks(device: str):
    """(bf16 TFLOP/s, fp32 TFLOP/s, GB/s) of the current GPU, or Nones when unknown."""
    if device != "cuda":
        return None, None, None
    name = torch.cuda.get_device_name()
    for key, peaks in PEAKS.items():
        if key in name:
            return peaks
    return None, None, None


def percent(value, peak):
    return None if value is None or peak is None else round(100.0 * value / peak, 1)


def _git_commit() -> str:
    """HEAD of this checkout, or UNIRANK_GIT_COMMIT where the tree was copied without .git (a
    remote GPU machine)."""
    if os.environ.get("UNIRANK_GIT_COMMIT"):
        return os.environ["UNIRANK_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def report(rows: list, device: str, out_path=None, smoke=False):
    """Print rows (dicts with the same keys) as a table and optionally write them as JSON."""
    columns = list(rows[0])
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join("-" if row[c] is None else (f"{row[c]:.3f}" if isinstance(row[c], float)
                                                    else str(row[c])) for c in columns))
    meta = {
        "command": " ".join([sys.executable, "-m", sys.modules["__main__"].__spec__.name
                             if sys.modules["__main__"].__spec__ else sys.argv[0], *sys.argv[1:]]),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "host": platform.node(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "git_commit": _git_commit(),
        "smoke": smoke,
        "rows": rows,
    }
    if out_path:
        os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
        with open(out_path, "w") as f:
            json.dump(meta, f, indent=2)
        print(f"wrote {out_path}")
