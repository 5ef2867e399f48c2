"""Benchmark: multi-table Triton embedding bag vs F.embedding_bag (one call per table) and FBGEMM TBE.

    python -m unirank.kernels.embedding_bag.benchmark --out docs/bench/kernels/embedding_bag.json   # needs CUDA
    python -m unirank.kernels.embedding_bag.benchmark --smoke                               # CPU run-through

Bag sizes are long-tailed (most bags short, a few near the cap), sum pooling with per-sample
weights. GB/s counts the bytes the op must move at least once: gathered rows, indices, weights
and pooled outputs (forward); the backward adds the output gradient and a read+write of each
gathered gradient row. FBGEMM TBE fuses an SGD step (lr 0 here) into its backward instead of
producing a dense weight gradient, so its fwd+bwd row is indicative, not identical work.
"""
import argparse

import torch
import torch.nn.functional as F

from unirank.kernels.bench_report import add_common_args, device_peaks, percent, report, require_device, time_ms

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_inputs(n_tables, rows, dim, batch, mean_bag, dtype, device, gen):
    weights, indices, offsets, psws = [], [], [], []
    for _ in range(n_tables):
        sizes = torch.exp(torch.randn(batch, generator=gen) + torch.log(torch.tensor(mean_bag / 1.65)))
        sizes = sizes.round().clamp(0, 10 * mean_bag).long()
        nnz = int(sizes.sum())
        weights.append(torch.randn(rows, dim, generator=gen).to(device, dtype).requires_grad_())
        indices.append(torch.randint(0, rows, (nnz,), generator=gen).to(device))
        offsets.append(F.pad(sizes.cumsum(0), (1, 0)).to(device))
        psws.append(torch.rand(nnz, generator=gen).to(device, dtype))
    return weights, indices, offsets, psws


def fbgemm_tbe(weights, indices, offsets, psws, device):
    """A TBE over copies of the same tables, or None when the CUDA/CPU fbgemm_gpu build is absent."""
    try:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import ComputeDevice, EmbeddingLocation, PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen
    except (ImportError, OSError) as err:
        print(f"fbgemm_tbe skipped: {err}")
        return None
    location = (EmbeddingLocation.DEVICE, ComputeDevice.CUDA) if device == "cuda" else (EmbeddingLocation.HOST, ComputeDevice.CPU)
    precision = {torch.float32: SparseType.FP32, torch.float16: SparseType.FP16, torch.bfloat16: SparseType.BF16}
    dtype = precision[weights[0].dtype]
    try:  # the CPU-only fbgemm_gpu build imports fine but cannot place tables on CUDA
        tbe = SplitTableBatchedEmbeddingBagsCodegen(
            [(w.shape[0], w.shape[1], *location) for w in weights], optimizer=EmbOptimType.EXACT_SGD,
            learning_rate=0.0, weights_precision=dtype, output_dtype=dtype, pooling_mode=PoolingMode.SUM,
            device=torch.device(device))
    except (RuntimeError, AssertionError, NotImplementedError) as err:
        print(f"fbgemm_tbe skipped: {err}")
        return None
    for table, w in zip(tbe.split_embedding_weights(), weights):
        table.data.copy_(w.detach())
    # TBE wants one table-major offsets array over the concatenated indices.
    bases = torch.tensor([0] + [i.shape[0] for i in indices[:-1]], device=device).cumsum(0)
    flat_offsets = torch.cat([o[:-1] + b for o, b in zip(offsets, bases)] + [offsets[-1][-1:] + bases[-1]])
    flat_indices, flat_psw = torch.cat(indices), torch.cat(psws).float()
    return lambda: tbe(flat_indices, flat_offsets, per_sample_weights=flat_psw)


def moved_bytes(weights, indices, offsets, with_backward):
    elem = weights[0].element_size()
    nnz, dim = sum(i.shape[0] for i in indices), weights[0].shape[1]
    pooled = sum(o.shape[0] - 1 for o in offsets) * dim * elem
    forward = nnz * dim * elem + nnz * (8 + elem) + pooled
    return forward + (pooled + 2 * nnz * dim * 4 if with_backward else 0)


def bench_case(n_tables, rows, dim, batch, mean_bag, dtype, device, gen):
    from unirank.kernels.embedding_bag import multi_embedding_bag

    weights, indices, offsets, psws = make_inputs(n_tables, rows, dim, batch, mean_bag, dtype, device, gen)
    fns = {
        "triton_multi": lambda: torch.cat(multi_embedding_bag(weights, indices, offsets, psws, impl="triton"), 1),
        "torch_embedding_bag_loop": lambda: torch.cat(multi_embedding_bag(weights, indices, offsets, psws,
                                                                          impl="reference"), 1),
    }
    tbe = fbgemm_tbe(weights, indices, offsets, psws, device)
    if tbe is not None:
        fns["fbgemm_tbe"] = tbe
    peak_gbs = device_peaks(device)[2]
    out_rows = []
    for provider, fn in fns.items():
        grad = torch.randn_like(fn())

        def fwd_bwd(fn=fn, grad=grad):
            fn().backward(grad)
            for w in weights:
                w.grad = None

        for mode, run in (("fwd", fn), ("fwd+bwd", fwd_bwd)):
            with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                ms = time_ms(run, device)
            gbs = moved_bytes(weights, indices, offsets, mode != "fwd") / ms * 1e-6
            out_rows.append(dict(provider=provider, mode=mode, tables=n_tables, rows=rows, dim=dim, batch=batch,
                                 nnz=sum(i.shape[0] for i in indices), ms=ms, gb_per_s=gbs,
                                 pct_peak=percent(gbs, peak_gbs)))
    return out_rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    add_common_args(parser)
    args = parser.parse_args()
    device = require_device(args.smoke)
    dtype = torch.float32 if args.smoke else DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(0)
    # (tables, rows per table, dim, batch, mean bag size)
    cases = [(2, 100, 32, 16, 4)] if args.smoke else [(8, 1_000_000, 64, 8192, 20), (8, 1_000_000, 128, 8192, 20),
                                                     (26, 100_000, 64, 16384, 5), (4, 2_000_000, 128, 4096, 80)]
    rows = []
    for case in cases:
        rows += bench_case(*case, dtype, device, gen)
    report(rows, device, args.out, args.smoke)


if __name__ == "__main__":
    main()
