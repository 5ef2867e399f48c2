"""Kernel tests run the Triton kernels on CPU under the interpreter unless a GPU is present.

Triton reads TRITON_INTERPRET when a kernel module is imported, so it is set here, before any test
module imports one. On a GPU machine the compiled kernels are tested on CUDA instead.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE
