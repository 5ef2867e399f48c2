"""Dispatch rule shared by every kernel in `unirank.kernels`: Triton on CUDA, reference on CPU.

`TRITON_INTERPRET=1` (read at call time) lets the Triton path run on CPU tensors under the
interpreter, which is how the tests exercise the kernels on machines without a GPU. Triton reads
the same variable when a kernel module is first imported, so set it before the first call.
"""
import os

IMPLS = ("auto", "reference", "triton")


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def choose_impl(impl: str, tensor) -> str:
    """Resolve `impl` ("auto" | "reference" | "triton") for an input living on `tensor.device`."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    triton_can_run = tensor.is_cuda or triton_interpreting()
    if impl == "triton" and not triton_can_run:
        raise RuntimeError(
            f"impl='triton' needs CUDA tensors or TRITON_INTERPRET=1; got a {tensor.device} tensor"
        )
    if impl == "auto":
        return "triton" if triton_can_run else "reference"
    return impl


def model_impl(impl: str, tensor) -> str:
    """A model's implementation switch: "auto" is the Triton kernel on CUDA and the reference
    elsewhere, also under TRITON_INTERPRET (the interpreter is for kernel tests, far too slow for
    whole models); an explicit "triton" still runs under the interpreter on CPU."""
    if impl == "auto":
        return "triton" if tensor.is_cuda else "reference"
    return choose_impl(impl, tensor)
