"""Embedding bag: hand-computed pooling, then Triton vs reference (forward + weight/psw grads)."""
import pytest
import torch

from unirank.kernels.embedding_bag import embedding_bag, multi_embedding_bag

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16/fp16 kernels need CUDA")
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_hand_computed_bags_with_duplicates_and_an_empty_bag(impl, device):
    weight = torch.arange(12.0, device=device).view(4, 3).requires_grad_()  # row r = [3r, 3r+1, 3r+2]
    indices = torch.tensor([2, 2, 0, 3], device=device)
    offsets = torch.tensor([0, 3, 3, 4], device=device)  # bags: [2, 2, 0], [], [3]
    psw = torch.tensor([1.0, 0.5, 2.0, -1.0], device=device)
    out = embedding_bag(weight, indices, offsets, psw, mode="mean", impl=impl)
    expected = torch.tensor([[(6 + 3 + 0) / 3, (7 + 3.5 + 2) / 3, (8 + 4 + 4) / 3],
                             [0.0, 0.0, 0.0],
                             [-9.0, -10.0, -11.0]])
    torch.testing.assert_close(out.cpu(), expected)
    out.sum().backward()
    # Row 2 is hit twice in bag 0 (weights 1 and 0.5, mean over 3), row 1 never.
    expected_grad = torch.tensor([2 / 3, 0.0, 1.5 / 3, -1.0])[:, None].expand(4, 3)
    torch.testing.assert_close(weight.grad.cpu(), expected_grad)


def random_tables(dims, rows, bag_sizes, dtype, device, with_psw, seed):
    gen = torch.Generator().manual_seed(seed)
    weights, indices, offsets, psws = [], [], [], []
    for dim, n, sizes in zip(dims, rows, bag_sizes):
        weights.append(torch.randn(n, dim, generator=gen).to(device, dtype).requires_grad_())
        # Few rows and many lookups make duplicate indices (within and across bags) certain.
        indices.append(torch.randint(0, n, (sum(sizes),), generator=gen).to(device))
        offsets.append(torch.tensor([0] + sizes, device=device).cumsum(0))
        psws.append(torch.rand(sum(sizes), generator=gen).to(device, dtype).requires_grad_())
    return weights, indices, offsets, (psws if with_psw else None)


def assert_triton_matches_reference(dims, rows, bag_sizes, mode, with_psw, dtype, device, seed=0):
    weights, indices, offsets, psws = random_tables(dims, rows, bag_sizes, dtype, device, with_psw, seed)
    leaves = weights + (psws or [])
    results = {}
    for impl in ("triton", "reference"):
        for x in leaves:
            x.grad = None
        # The reference runs in fp32 so that low-precision runs are judged against the truth. Its
        # outputs pass through the low-precision dtype on the way to the loss, so both paths get
        # the same (rounded) upstream gradient: otherwise that rounding, summed over a row of
        # `dim` terms, is what the comparison measures (seen on an H200 in bf16 sum mode).
        cast = (lambda xs: xs) if impl == "triton" else (lambda xs: xs and [x.float() for x in xs])
        outs = multi_embedding_bag(cast(weights), indices, offsets, cast(psws), mode, impl=impl)
        outs = [out.to(dtype) for out in outs]
        loss = sum((out.float() * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)).sum()
                   for out in outs)
        loss.backward()
        results[impl] = [out.float() for out in outs] + [x.grad.float() for x in leaves]
    tol = TOLERANCE[dtype]
    for got, want in zip(results["triton"], results["reference"]):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("with_psw", [False, True])
def test_one_table_matches_reference(mode, with_psw, device):
    assert_triton_matches_reference([32], [5], [[0, 1, 9, 0, 3]], mode, with_psw, torch.float32, device)


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("with_psw", [False, True])
def test_many_tables_of_mixed_dims_match_reference(mode, with_psw, device):
    # dims 64, 24 (not a power of two) and 32 share one launch; table 3 has only empty bags.
    assert_triton_matches_reference([64, 24, 32], [6, 3, 4], [[2, 0, 5], [7], [0, 0]],
                                    mode, with_psw, torch.float32, device)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
def test_random_tables_match_reference_sweep(seed, device):
    gen = torch.Generator().manual_seed(seed)
    n_tables = 1 + seed % 3
    dims = [int(d) for d in torch.tensor([16, 32, 64, 128])[torch.randint(0, 4, (n_tables,), generator=gen)]]
    bag_sizes = [torch.randint(0, 12, (int(torch.randint(1, 8, (1,), generator=gen)),), generator=gen).tolist()
                 for _ in dims]
    rows = [int(torch.randint(1, 20, (1,), generator=gen)) for _ in dims]
    assert_triton_matches_reference(dims, rows, bag_sizes, ("sum", "mean")[seed % 2], seed % 3 == 0,
                                    torch.float32, device, seed)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_low_precision_matches_reference(dtype, mode, device):
    sizes = torch.randint(0, 40, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    assert_triton_matches_reference([128, 64], [1000, 50], [sizes, sizes[:100]], mode, True, dtype, device)


def test_rejects_unknown_mode(device):
    weight = torch.zeros(2, 32, device=device)
    with pytest.raises(ValueError, match="mode"):
        embedding_bag(weight, torch.tensor([0], device=device), torch.tensor([0, 1], device=device), mode="max")
