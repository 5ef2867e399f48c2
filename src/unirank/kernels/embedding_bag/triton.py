"""Multi-table embedding bag in Triton: forward, backward and the autograd wrapper.

All tables of one call are served by a single launch: the kernel receives a device array of
table base pointers (as in the Triton grouped-GEMM tutorial), so tables are neither copied nor
concatenated, and tables may differ in row count and embedding dim. One program pools one bag.
The weight gradient is a dense fp32 buffer per table filled with atomic adds, which is exact
under duplicate indices (within a bag and across bags) and order-independent up to fp32 rounding.
"""
import torch
import triton
import triton.language as tl

from unirank.kernels.dispatch import triton_interpreting


@triton.jit
def _fwd_kernel(weight_ptrs, dims, bag_table, offsets, indices, psw, OUT, out_stride,
                HAS_PSW: tl.constexpr, MEAN: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bag = tl.program_id(0).to(tl.int64)  # bag * stride can pass 2**31 on big batches
    table = tl.load(bag_table + bag)
    weight = tl.load(weight_ptrs + table).to(tl.pointer_type(OUT.dtype.element_ty))
    dim = tl.load(dims + table)
    start, end = tl.load(offsets + bag), tl.load(offsets + bag + 1)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < dim
    acc = tl.zeros([BLOCK_D], tl.float32)
    for k0 in range(start, end, BLOCK_N):
        ks = k0 + tl.arange(0, BLOCK_N)
        k_ok = ks < end
        idx = tl.load(indices + ks, mask=k_ok, other=0)
        rows = tl.load(weight + idx[:, None] * dim + offs_d[None, :],
                       mask=k_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        if HAS_PSW:
            rows = rows * tl.load(psw + ks, mask=k_ok, other=0.0)[:, None]
        acc += tl.sum(rows, 0)
    if MEAN:
        acc = acc / tl.maximum(end - start, 1).to(tl.float32)
    tl.store(OUT + bag * out_stride + offs_d, acc.to(OUT.dtype.element_ty), mask=d_ok)


@triton.jit
def _bwd_kernel(weight_ptrs, grad_ptrs, dims, bag_table, offsets, indices, psw, GRAD_PSW,
                GRAD_OUT, grad_out_stride,
                HAS_PSW: tl.constexpr, MEAN: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bag = tl.program_id(0).to(tl.int64)  # bag * stride can pass 2**31 on big batches
    table = tl.load(bag_table + bag)
    grad_w = tl.load(grad_ptrs + table).to(tl.pointer_type(tl.float32))
    dim = tl.load(dims + table)
    start, end = tl.load(offsets + bag), tl.load(offsets + bag + 1)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < dim
    g = tl.load(GRAD_OUT + bag * grad_out_stride + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    if MEAN:
        g = g / tl.maximum(end - start, 1).to(tl.float32)
    for k0 in range(start, end, BLOCK_N):
        ks = k0 + tl.arange(0, BLOCK_N)
        k_ok = ks < end
        idx = tl.load(indices + ks, mask=k_ok, other=0)
        mask = k_ok[:, None] & d_ok[None, :]
        upd = tl.broadcast_to(g[None, :], [BLOCK_N, BLOCK_D])
        if HAS_PSW:
            upd = upd * tl.load(psw + ks, mask=k_ok, other=0.0)[:, None]
            # d out / d psw_k = <weight[idx_k], g>: needs the rows, so only this path reads them.
            weight = tl.load(weight_ptrs + table).to(tl.pointer_type(GRAD_OUT.dtype.element_ty))
            rows = tl.load(weight + idx[:, None] * dim + offs_d[None, :], mask=mask, other=0.0)
            tl.store(GRAD_PSW + ks, tl.sum(rows.to(tl.float32) * g[None, :], 1), mask=k_ok)
        tl.atomic_add(grad_w + idx[:, None] * dim + offs_d[None, :], upd, mask=mask)


def _launch_config(max_dim: int) -> dict:
    block_d = triton.next_power_of_2(max_dim)
    # ~4K elements per tile keeps a [BLOCK_N, BLOCK_D] tile in registers for 4 warps; the
    # interpreter uses tiny tiles so that test bags span several of them.
    block_n = 4 if triton_interpreting() else max(1, min(64, 4096 // block_d))
    return dict(BLOCK_N=block_n, BLOCK_D=block_d)


def _pointer_array(tensors, device):
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=device)


class MultiEmbeddingBag(torch.autograd.Function):
    """Inputs: mode, n_tables, then n weights, n indices, n offsets, n (or zero) psw tensors.

    Returns one [total_bags, max_dim] tensor; the caller slices it per table.
    """

    @staticmethod
    def forward(ctx, mode, n, *tensors):
        weights = [w.contiguous() for w in tensors[:n]]
        indices, offsets, psws = tensors[n:2 * n], tensors[2 * n:3 * n], tensors[3 * n:]
        device, dtype = weights[0].device, weights[0].dtype
        if any(w.dtype != dtype for w in weights):
            raise TypeError("all tables of one multi_embedding_bag call must share a dtype")
        dims = [w.shape[1] for w in weights]
        bags = [o.shape[0] - 1 for o in offsets]
        # Shift each table's offsets by the number of indices before it: bag boundaries become
        # positions in the concatenated index array, with no host sync.
        bases = [0]
        for idx in indices[:-1]:
            bases.append(bases[-1] + idx.shape[0])
        flat_offsets = torch.cat([o[:-1] + base for o, base in zip(offsets, bases)]
                                 + [offsets[-1][-1:] + bases[-1]])
        flat_indices = torch.cat(indices)
        # Without weights the kernel never reads psw; a 1-element buffer avoids a null pointer.
        flat_psw = torch.cat([p.float() for p in psws]) if psws else torch.zeros(1, device=device)
        bag_table = torch.repeat_interleave(torch.arange(n, device=device), torch.tensor(bags, device=device),
                                            output_size=sum(bags)).to(torch.int32)
        dims_t = torch.tensor(dims, dtype=torch.int64, device=device)
        weight_ptrs = _pointer_array(weights, device)
        out = torch.empty(sum(bags), max(dims), dtype=dtype, device=device)
        cfg = _launch_config(max(dims))
        if out.shape[0] > 0:
            _fwd_kernel[(out.shape[0],)](weight_ptrs, dims_t, bag_table, flat_offsets, flat_indices,
                                         flat_psw, out, out.stride(0), HAS_PSW=bool(psws),
                                         MEAN=mode == "mean", **cfg)
        ctx.save_for_backward(*weights, dims_t, bag_table, flat_offsets, flat_indices, flat_psw)
        ctx.mode, ctx.n, ctx.has_psw, ctx.cfg = mode, n, bool(psws), cfg
        ctx.psw_sizes = [p.shape[0] for p in psws]
        ctx.psw_dtypes = [p.dtype for p in psws]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        n = ctx.n
        saved = ctx.saved_tensors
        weights = saved[:n]
        dims_t, bag_table, flat_offsets, flat_indices, flat_psw = saved[n:]
        # The kernel reads the weight rows through grad_out's element type, so match them.
        grad_out = grad_out.to(weights[0].dtype).contiguous()
        device = grad_out.device
        grads = [torch.zeros(w.shape, dtype=torch.float32, device=device) for w in weights]
        grad_psw = torch.empty_like(flat_psw)
        if grad_out.shape[0] > 0:
            _bwd_kernel[(grad_out.shape[0],)](
                _pointer_array(weights, device), _pointer_array(grads, device), dims_t, bag_table,
                flat_offsets, flat_indices, flat_psw, grad_psw, grad_out, grad_out.stride(0),
                HAS_PSW=ctx.has_psw, MEAN=ctx.mode == "mean", **ctx.cfg)
        grad_weights = [g.to(w.dtype) for g, w in zip(grads, weights)]
        grad_psws = []
        if ctx.has_psw:
            grad_psws = [g.to(dt) for g, dt in zip(grad_psw.split(ctx.psw_sizes), ctx.psw_dtypes)]
        return (None, None, *grad_weights, *([None] * 2 * n), *grad_psws)


def triton_multi_embedding_bag(weights, indices, offsets, per_sample_weights=None, mode="sum"):
    psws = list(per_sample_weights) if per_sample_weights is not None else []
    out = MultiEmbeddingBag.apply(mode, len(weights), *weights, *indices, *offsets, *psws)
    bags = [o.shape[0] - 1 for o in offsets]
    return [part[:, :w.shape[1]] for part, w in zip(out.split(bags), weights)]
