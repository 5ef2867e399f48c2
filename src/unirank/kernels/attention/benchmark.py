"""Benchmark: jagged prefix-causal Triton attention vs PyTorch SDPA, forward and forward+backward.

    python -m unirank.kernels.attention.benchmark --out docs/bench/kernels/attention.json   # needs CUDA
    python -m unirank.kernels.attention.benchmark --smoke                           # CPU run-through

Dense shapes compare against SDPA's causal flash path (num_prefix = 0, so the math is identical);
jagged shapes draw long-tailed lengths and compare against padded SDPA with the boolean
prefix-causal mask (the reference) and, as a lower bound for padding, padded causal flash SDPA.
TFLOP/s counts only the useful (unmasked, unpadded) score entries for every provider.
"""
import argparse

import torch
import torch.nn.functional as F

from unirank.kernels.bench_report import add_common_args, device_peaks, percent, report, require_device, time_ms

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def long_tailed_lengths(batch: int, max_len: int, gen: torch.Generator) -> torch.Tensor:
    # Log-normal around max_len/8: most histories are short, a few hit the cap (as in real logs).
    raw = torch.exp(torch.randn(batch, generator=gen) + torch.log(torch.tensor(max_len / 8.0)))
    lengths = raw.round().clamp(1, max_len).long()
    lengths[0] = max_len  # the padded baselines always pay for the full max_len
    return lengths


def useful_pairs(lengths: torch.Tensor, num_prefix: torch.Tensor) -> int:
    # Row i of a sequence sees max(num_prefix, i + 1) keys (capped at the length).
    total = 0
    for n, p in zip(lengths.tolist(), num_prefix.tolist()):
        rows = torch.arange(n)
        total += int(torch.clamp(torch.maximum(torch.full_like(rows, min(p, n)), rows + 1), max=n).sum())
    return total


def providers(q, k, v, lengths, num_prefix):
    from unirank.kernels.attention import jagged_prefix_causal_attention, prefix_causal_attention
    from unirank.kernels.attention.reference import padded_to_jagged

    max_len = q.shape[2]
    offsets = F.pad(torch.cumsum(lengths, 0), (1, 0))
    jq, jk, jv = (padded_to_jagged(x, lengths).detach().requires_grad_() for x in (q, k, v))
    return {
        "triton_jagged": ((jq, jk, jv), lambda: jagged_prefix_causal_attention(
            jq, jk, jv, offsets, num_prefix, max_len, impl="triton")),
        "triton_padded_api": ((q, k, v), lambda: prefix_causal_attention(
            q, k, v, lengths, num_prefix, impl="triton")),
        "sdpa_masked_reference": ((q, k, v), lambda: prefix_causal_attention(
            q, k, v, lengths, num_prefix, impl="reference")),
        "sdpa_causal_padded": ((q, k, v), lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
    }


def bench_case(name, lengths, num_prefix, heads, head_dim, dtype, device):
    batch, max_len = lengths.shape[0], int(lengths.max())
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, max_len, head_dim, generator=gen).to(device, dtype).requires_grad_()
               for _ in range(3))
    lengths, num_prefix = lengths.to(device), num_prefix.to(device)
    fwd_flops = 4.0 * head_dim * heads * useful_pairs(lengths.cpu(), num_prefix.cpu())
    peak = device_peaks(device)[1 if dtype == torch.float32 else 0]
    rows = []
    for provider, (leaves, fn) in providers(q, k, v, lengths, num_prefix).items():
        grad = torch.randn_like(fn())

        def fwd_bwd(fn=fn, grad=grad, leaves=leaves):
            fn().backward(grad)
            for x in leaves:
                x.grad = None

        for mode, run, flops in (("fwd", fn, fwd_flops), ("fwd+bwd", fwd_bwd, 3.5 * fwd_flops)):
            with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                ms = time_ms(run, device)
            tflops = flops / ms * 1e-9
            rows.append(dict(case=name, provider=provider, mode=mode, batch=batch, heads=heads,
                             head_dim=head_dim, max_len=max_len, mean_len=float(lengths.float().mean()),
                             ms=ms, tflops=tflops, pct_peak=percent(tflops, peak)))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    add_common_args(parser)
    args = parser.parse_args()
    device = require_device(args.smoke)
    dtype = torch.float32 if args.smoke else DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(0)
    if args.smoke:
        dense, jagged, heads, head_dims = [(2, 32)], [(4, 40)], 2, [32]
    else:
        dense, jagged, heads, head_dims = [(32, 512), (8, 2048)], [(512, 200), (256, 512), (128, 1024)], 4, [64, 128]
    rows = []
    for head_dim in head_dims:
        for batch, length in dense:
            rows += bench_case("dense_causal", torch.full((batch,), length), torch.zeros(batch, dtype=torch.long),
                               heads, head_dim, dtype, device)
        for batch, max_len in jagged:
            rows += bench_case("jagged_longtail", long_tailed_lengths(batch, max_len, gen),
                               torch.full((batch,), 3), heads, head_dim, dtype, device)
    report(rows, device, args.out, args.smoke)


if __name__ == "__main__":
    main()
