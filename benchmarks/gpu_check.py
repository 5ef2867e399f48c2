"""One-command GPU check of the trainer (`make gpu-check`, a few minutes on one GPU):

1. the kernel tests with the compiled Triton kernels (TRITON_INTERPRET=0) on CUDA;
2. 200 training steps of the quickstart config on CUDA (fp32, TF32 off) against the same 200 steps
   on the CPU: the per-step losses must agree within LOSS_RTOL;
3. samples/s on CUDA with the Triton kernels on (the default there) and off (SDPA + F.embedding_bag),
   bf16 autocast, and on the CPU.

    python benchmarks/gpu_check.py [--out docs/bench/training/gpu_check.json] [--steps 200] [key=value ...]

Needs no TorchRec / FBGEMM: one process trains the plain-PyTorch tables. Writes JSON with the device,
the commit and every number; exits non-zero if a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOSS_RTOL = 2e-3  # fp32 on CUDA vs CPU over 200 AdamW steps: reduction order and fused kernels only


def run_steps(device: str, steps: int, overrides: list[str], out: Path) -> dict:
    from unirank.config import load_config
    from unirank.training.train import train

    cfg = load_config("quickstart", [f"train.device={device}", f"train.stop_after_steps={steps}",
                                     "train.max_epochs=1000", f"train.out_dir={out}", *overrides])
    t0 = time.perf_counter()
    train(cfg, quiet=True)
    result = json.loads((out / "train_result.json").read_text())
    return {"losses": result["losses"], "samples_per_s": result["samples_per_s"], "steps": result["steps"],
            "wall_s": round(time.perf_counter() - t0, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench" / "training" / "gpu_check.json"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    report: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                    "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                             text=True).stdout.strip()}
    tests = subprocess.run([str(Path(sys.executable).with_name("pytest")), "-q", str(ROOT / "tests" / "kernels")],
                           env={**os.environ, "TRITON_INTERPRET": "0"}, capture_output=True, text=True)
    report["kernel_tests"] = {"returncode": tests.returncode, "summary": tests.stdout.strip().splitlines()[-1:]}
    print("kernel tests:", report["kernel_tests"], flush=True)
    with tempfile.TemporaryDirectory(prefix="unirank-gpu-") as tmp:
        fp32 = ["train.precision=fp32", *args.overrides]
        cpu = run_steps("cpu", args.steps, fp32, Path(tmp) / "cpu")
        cuda = run_steps("cuda", args.steps, fp32, Path(tmp) / "cuda")
        rel = max(abs(a - b) / max(abs(a), 1e-9) for a, b in zip(cpu["losses"], cuda["losses"]))
        report["parity"] = {"steps": args.steps, "max_rel_loss_diff": rel, "rtol": LOSS_RTOL,
                            "cpu_first_last": [cpu["losses"][0], cpu["losses"][-1]],
                            "cuda_first_last": [cuda["losses"][0], cuda["losses"][-1]]}
        print("parity:", report["parity"], flush=True)
        speed = {"cpu_fp32": cpu["samples_per_s"], "cuda_fp32_kernels": cuda["samples_per_s"]}
        for name, extra in (("cuda_bf16_kernels", []),
                            ("cuda_bf16_reference", ["model.attention_impl=reference", "model.embedding_bag_impl=torch"])):
            speed[name] = run_steps("cuda", args.steps, ["train.precision=bf16", *extra, *args.overrides],
                                    Path(tmp) / name)["samples_per_s"]
        report["samples_per_s"] = speed
        print("samples/s:", speed, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0 if tests.returncode == 0 and len(cpu["losses"]) == len(cuda["losses"]) and rel <= LOSS_RTOL else 1


if __name__ == "__main__":
    sys.exit(main())
