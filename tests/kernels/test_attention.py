"""Prefix-causal attention: hand-computed mask cases, then Triton vs reference (forward + grads)."""
import pytest
import torch

from unirank.kernels.attention import jagged_prefix_causal_attention, prefix_causal_attention
from unirank.kernels.attention.reference import padded_to_jagged, prefix_causal_mask, valid_positions

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16/fp16 kernels need CUDA")
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def random_qkv(batch, heads, max_len, head_dim, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, max_len, head_dim, generator=gen).to(device, dtype).requires_grad_()
            for _ in range(3)]


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_uniform_scores_average_exactly_the_allowed_keys(impl, device):
    # q = 0 makes every allowed score equal, so with v = identity the output row i is
    # 1/|allowed(i)| on the allowed keys and 0 elsewhere: the mask written out by hand.
    length, max_len, prefix, dim = 5, 7, 2, 32
    q = torch.zeros(1, 1, max_len, dim, device=device)
    v = torch.eye(max_len, dim, device=device)[None, None]
    out = prefix_causal_attention(q, torch.randn_like(q), v, torch.tensor([length], device=device),
                                  torch.tensor([prefix], device=device), impl=impl)[0, 0, :, :max_len]
    expected = torch.zeros(max_len, max_len)
    allowed_keys = {0: [0, 1], 1: [0, 1], 2: [0, 1, 2], 3: [0, 1, 2, 3], 4: [0, 1, 2, 3, 4]}
    for i, keys in allowed_keys.items():
        expected[i, keys] = 1.0 / len(keys)
    torch.testing.assert_close(out.cpu(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_empty_and_padded_rows_are_zero_and_finite(impl, device):
    q, k, v = random_qkv(3, 2, 6, 32, torch.float32, device)
    lengths = torch.tensor([0, 2, 6], device=device)
    out = prefix_causal_attention(q, k, v, lengths, torch.tensor([1, 3, 0], device=device), impl=impl)
    out.sum().backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(x.grad).all() for x in (q, k, v))
    assert (out[0] == 0).all() and (out[1, :, 2:] == 0).all()
    assert (out[2] != 0).any()
    assert (q.grad[0] == 0).all() and (k.grad[1, :, 2:] == 0).all()


def assert_triton_matches_reference(lengths, num_prefix, heads, head_dim, dtype, device, seed=0):
    max_len = max(max(lengths), 1)
    lengths = torch.tensor(lengths, device=device)
    num_prefix = torch.tensor(num_prefix, device=device)
    q, k, v = random_qkv(len(lengths), heads, max_len, head_dim, dtype, device, seed)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
    results = {}
    for impl in ("triton", "reference"):
        for x in (q, k, v):
            x.grad = None
        # The reference runs in fp32 so that low-precision runs are judged against the truth.
        inputs = (q, k, v) if impl == "triton" else [x.float() for x in (q, k, v)]
        out = prefix_causal_attention(*inputs, lengths, num_prefix, impl=impl)
        out.backward(grad_out.to(out.dtype))
        results[impl] = [out.float()] + [x.grad.float() for x in (q, k, v)]
    tol = TOLERANCE[dtype]
    for name, got, want in zip(("out", "dq", "dk", "dv"), results["triton"], results["reference"]):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


FAST_CASES = [  # (lengths, num_prefix): 0, 1, tile-boundary and multi-tile lengths; prefixes 0..3
    ([1, 0, 5], [0, 2, 3]),
    ([17, 3], [3, 1]),
    ([33, 16, 2], [2, 0, 3]),
]


@pytest.mark.parametrize("lengths,num_prefix", FAST_CASES)
@pytest.mark.parametrize("heads,head_dim", [(2, 32), (1, 64)])
def test_triton_matches_reference_fp32(lengths, num_prefix, heads, head_dim, device):
    assert_triton_matches_reference(lengths, num_prefix, heads, head_dim, torch.float32, device)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("head_dim", [32, 48, 64, 128])
def test_triton_matches_reference_fp32_sweep(seed, head_dim, device):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 50, (4,), generator=gen).tolist()
    num_prefix = torch.randint(0, 4, (4,), generator=gen).tolist()
    heads = 1 + seed % 3
    assert_triton_matches_reference(lengths, num_prefix, heads, head_dim, torch.float32, device, seed)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_triton_matches_reference_low_precision(dtype, head_dim, device):
    assert_triton_matches_reference([200, 1, 0, 77, 129], [3, 0, 2, 1, 0], 4, head_dim, dtype, device)


def test_jagged_entry_point_matches_padded(device):
    q, k, v = random_qkv(2, 2, 9, 32, torch.float32, device)
    lengths, num_prefix = torch.tensor([9, 4], device=device), torch.tensor([2, 1], device=device)
    offsets = torch.tensor([0, 9, 13], device=device)
    padded = prefix_causal_attention(q, k, v, lengths, num_prefix, impl="reference")
    jagged = jagged_prefix_causal_attention(*(padded_to_jagged(x, lengths) for x in (q, k, v)),
                                            offsets, num_prefix, max_len=9, impl="triton")
    torch.testing.assert_close(jagged, padded_to_jagged(padded, lengths), atol=2e-5, rtol=2e-5)


def triton_dropout_keep_mask(lengths, num_prefix, heads, max_len, head_dim, dropout_p, seed, device):
    # q = 0 gives uniform attention over the allowed keys and v = identity exposes each weight,
    # so out[b, h, i, j] * |allowed(i)| * (1 - p) is the kernel's keep bit for key j.
    q = torch.zeros(len(lengths), heads, max_len, head_dim, device=device)
    v = torch.eye(max_len, head_dim, device=device).expand_as(q)
    torch.manual_seed(seed)
    out = prefix_causal_attention(q, q, v, lengths, num_prefix, dropout_p, impl="triton")[..., :max_len]
    query_valid = valid_positions(lengths, max_len)[:, None, :, None]
    allowed = prefix_causal_mask(lengths, num_prefix, max_len)[:, None] & query_valid
    return (out * allowed.sum(-1, keepdim=True) * (1 - dropout_p)).round().bool() & allowed, allowed


def test_triton_dropout_matches_reference_with_the_same_mask(device):
    lengths, num_prefix = torch.tensor([24, 13], device=device), torch.tensor([3, 0], device=device)
    heads, max_len, head_dim, p = 2, 24, 32, 0.3
    keep, allowed = triton_dropout_keep_mask(lengths, num_prefix, heads, max_len, head_dim, p, 7, device)
    assert abs(1 - keep.sum() / allowed.expand_as(keep).sum() - p) < 0.06  # drop rate ~ p

    q, k, v = random_qkv(2, heads, max_len, head_dim, torch.float32, device)
    grad_out = torch.randn_like(q)
    torch.manual_seed(7)
    out = prefix_causal_attention(q, k, v, lengths, num_prefix, p, impl="triton")
    out.backward(grad_out)
    got = [out] + [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    query_valid = valid_positions(lengths, max_len)[:, None, :, None]
    seen = allowed | ~query_valid  # padded rows see everything (then get zeroed) to stay finite
    scores = (q @ k.transpose(-1, -2) / head_dim ** 0.5).masked_fill(~seen, float("-inf"))
    probs = scores.softmax(-1) * keep / (1 - p)
    want = (probs @ v) * query_valid
    want.backward(grad_out)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, [want] + [x.grad for x in (q, k, v)]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=lambda m: f"{name}: {m}")

    torch.manual_seed(8)
    assert not torch.equal(prefix_causal_attention(q, k, v, lengths, num_prefix, p, impl="triton"), out)


def test_reference_dropout_changes_the_output(device):
    q, k, v = random_qkv(1, 1, 4, 32, torch.float32, device)
    lengths, num_prefix = torch.tensor([4], device=device), torch.tensor([1], device=device)
    dropped = prefix_causal_attention(q, k, v, lengths, num_prefix, dropout_p=0.5, impl="reference")
    assert not torch.allclose(dropped, prefix_causal_attention(q, k, v, lengths, num_prefix, impl="reference"))


def test_reference_exports_to_onnx_with_dynamic_batch_and_length(tmp_path):
    # The reference is what runs inside the exported ranker; an empty sequence must not give NaN.
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")

    class Attention(torch.nn.Module):
        def forward(self, q, k, v, lengths, num_prefix):
            return prefix_causal_attention(q, k, v, lengths, num_prefix, impl="reference")

    batch, length = torch.export.Dim("batch"), torch.export.Dim("length", max=4096)
    qkv_dims = {0: batch, 2: length}
    q, k, v = (torch.randn(3, 2, 7, 32) for _ in range(3))
    torch.onnx.export(Attention(), (q, k, v, torch.tensor([0, 3, 7]), torch.tensor([1, 2, 0])),
                      str(tmp_path / "attention.onnx"), dynamo=True,
                      dynamic_shapes=(qkv_dims, qkv_dims, qkv_dims, {0: batch}, {0: batch}))
    session = ort.InferenceSession(str(tmp_path / "attention.onnx"))
    inputs = (torch.randn(2, 2, 11, 32), torch.randn(2, 2, 11, 32), torch.randn(2, 2, 11, 32),
              torch.tensor([11, 0]), torch.tensor([3, 0]))
    got = session.run(None, {arg.name: x.numpy() for arg, x in zip(session.get_inputs(), inputs)})[0]
    torch.testing.assert_close(torch.from_numpy(got), Attention()(*inputs), atol=1e-5, rtol=1e-5)
