"""Jagged prefix-causal flash attention in Triton: forward, backward and the autograd wrapper.

Layout: q, k, v, out are [T, H, D] with the tokens of sequence b at rows starts[b]:ends[b]: a
jagged batch (starts, ends = offsets[:-1], offsets[1:]) spends no FLOPs or bytes on padding, and a
padded batch [B, H, L, D] is read in place (starts[b] = b * L, ends[b] = starts[b] + length).
One program owns one (sequence, head, block of rows).
Mask: query i sees key j iff j < len and (j < num_prefix or j <= i), i.e. a bidirectional
task/context prefix followed by causal history. Attention dropout draws one Philox number per
(token, head, key position) from a per-call seed, so the backward pass regenerates the same mask.
"""
import torch
import triton
import triton.language as tl

from unirank.kernels.dispatch import triton_interpreting

LOG2E = 1.4426950408889634


@triton.jit
def _allowed(rows, cols, seq_len, prefix):
    # rows: query positions [M, 1] (or [1, M]), cols: key positions broadcastable against them.
    return (rows < seq_len) & (cols < seq_len) & ((cols < prefix) | (cols <= rows))


@triton.jit
def _keep(seed, token, h, H, key_pos, max_len, dropout_p):
    # token is the global row (start + i): offsets are unique across sequences, heads and keys.
    return tl.rand(seed, (token * H + h) * max_len + key_pos) >= dropout_p


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, starts, ends, num_prefix, qk_scale, H, D, max_len, dropout_p, seed,
                DROPOUT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                PRECISION: tl.constexpr):
    bh, pid_m = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    start = tl.load(starts + b)
    seq_len = (tl.load(ends + b) - start).to(tl.int32)
    m0 = pid_m * BLOCK_M
    if m0 >= seq_len:  # the grid is sized for max_len; shorter sequences exit at once
        return
    prefix = tl.load(num_prefix + b).to(tl.int32)
    row_stride = H * D
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_ptrs = Q + (start + offs_m)[:, None] * row_stride + h * D + offs_d[None, :]
    q_mask = (offs_m < seq_len)[:, None] & d_ok[None, :]
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Keys beyond both the prefix and the last row of this block are masked for every row here,
    # so the loop stops there: causal blocks do about half the work of a full row.
    hi = tl.minimum(seq_len, tl.maximum(prefix, m0 + BLOCK_M))
    for n0 in range(0, hi, BLOCK_N):
        cols = n0 + offs_n
        kv_mask = (cols < seq_len)[:, None] & d_ok[None, :]
        kv_off = (start + cols)[:, None] * row_stride + h * D + offs_d[None, :]
        k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(_allowed(offs_m[:, None], cols[None, :], seq_len, prefix), s, float("-inf"))
        # Key 0 is visible to every real row and sits in the first tile, so m_new is finite for
        # real rows from then on; rows past seq_len in the last tile see nothing and get 0 here
        # instead of -inf so that exp2(-inf - -inf) never makes a NaN.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)  # the normaliser uses the undropped probabilities
        if DROPOUT:
            keep = _keep(seed, start + offs_m[:, None], h, H, cols[None, :], max_len, dropout_p)
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    tl.store(O + (start + offs_m)[:, None] * row_stride + h * D + offs_d[None, :],
             (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=q_mask)
    # The log-sum-exp (base 2) lets the backward pass rebuild P without a second softmax pass.
    tl.store(LSE + (start + offs_m) * H + h, m_i + tl.log2(l_safe), mask=offs_m < seq_len)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, starts, ends, num_prefix, qk_scale, sm_scale, H, D,
                     max_len, dropout_p, seed, DROPOUT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     PRECISION: tl.constexpr):
    # One program per block of keys, looping over the queries that see them: dK and dV are
    # written once, with no atomics.
    bh, pid_n = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    start = tl.load(starts + b)
    seq_len = (tl.load(ends + b) - start).to(tl.int32)
    n0 = pid_n * BLOCK_N
    if n0 >= seq_len:
        return
    prefix = tl.load(num_prefix + b).to(tl.int32)
    row_stride = H * D
    offs_m = tl.arange(0, BLOCK_M)
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_mask = (cols < seq_len)[:, None] & d_ok[None, :]
    kv_off = (start + cols)[:, None] * row_stride + h * D + offs_d[None, :]
    k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # Prefix keys are seen by every query; history keys only by queries at or after them.
    lo = tl.where(n0 < prefix, 0, n0)
    for m0 in range(lo, seq_len, BLOCK_M):
        rows = m0 + offs_m
        row_ok = rows < seq_len
        q_off = (start + rows)[:, None] * row_stride + h * D + offs_d[None, :]
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + q_off, mask=q_mask, other=0.0)
        do = tl.load(DO + q_off, mask=q_mask, other=0.0)
        lse = tl.load(LSE + (start + rows) * H + h, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + (start + rows) * H + h, mask=row_ok, other=0.0)
        # Work on the transposed scores [keys, queries] so dK/dV come out of plain dots.
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        ok = _allowed(rows[None, :], cols[:, None], seq_len, prefix)
        p_t = tl.where(ok, tl.exp2(s_t - lse[None, :]), 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        p_used_t = p_t
        if DROPOUT:
            # With O = (P * Z) V, dV uses the dropped P and dP is masked the same way; delta is
            # still rowsum(dO * O), so the softmax Jacobian step below is unchanged.
            keep = _keep(seed, start + rows[None, :], h, H, cols[:, None], max_len, dropout_p)
            p_used_t = tl.where(keep, p_t / (1.0 - dropout_p), 0.0)
            dp_t = tl.where(keep, dp_t / (1.0 - dropout_p), 0.0)
        dv += tl.dot(p_used_t.to(do.dtype), do, input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    tl.store(DK + kv_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, starts, ends, num_prefix, qk_scale, sm_scale, H, D,
                   max_len, dropout_p, seed, DROPOUT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   PRECISION: tl.constexpr):
    # One program per block of queries, same key range as the forward pass.
    bh, pid_m = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    start = tl.load(starts + b)
    seq_len = (tl.load(ends + b) - start).to(tl.int32)
    m0 = pid_m * BLOCK_M
    if m0 >= seq_len:
        return
    prefix = tl.load(num_prefix + b).to(tl.int32)
    row_stride = H * D
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    row_ok = rows < seq_len
    q_off = (start + rows)[:, None] * row_stride + h * D + offs_d[None, :]
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)
    do = tl.load(DO + q_off, mask=q_mask, other=0.0)
    lse = tl.load(LSE + (start + rows) * H + h, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + (start + rows) * H + h, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = tl.minimum(seq_len, tl.maximum(prefix, m0 + BLOCK_M))
    for n0 in range(0, hi, BLOCK_N):
        cols = n0 + offs_n
        kv_mask = (cols < seq_len)[:, None] & d_ok[None, :]
        kv_off = (start + cols)[:, None] * row_stride + h * D + offs_d[None, :]
        k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        ok = _allowed(rows[:, None], cols[None, :], seq_len, prefix)
        p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            keep = _keep(seed, start + rows[:, None], h, H, cols[None, :], max_len, dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


def _launch_config(head_dim: int, dtype: torch.dtype) -> dict:
    # 64x64 tiles keep q, k, v and the fp32 accumulator of a D<=128 head in registers/SMEM on
    # A100/H100; the interpreter gets 16x16 so short test sequences still span several tiles.
    if triton_interpreting():
        block_m = block_n = 16
    else:
        block_m, block_n = 64, (64 if head_dim <= 64 else 32)
    # fp32 inputs keep full-precision dots; bf16/fp16 already use tensor cores.
    precision = "ieee" if dtype == torch.float32 else "tf32"
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(head_dim),
                PRECISION=precision)


class PrefixCausalAttention(torch.autograd.Function):
    """Sequence b is rows starts[b]:ends[b] of q, k, v [T, H, D]. With `padded`, rows that belong
    to no sequence get zeros in the output and the gradients (a jagged batch has no such rows, so
    it skips the fill)."""

    @staticmethod
    def forward(ctx, q, k, v, starts, ends, num_prefix, max_len, dropout_p, padded):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        total, heads, head_dim = q.shape
        batch = starts.shape[0]
        cfg = _launch_config(head_dim, q.dtype)
        sm_scale = head_dim ** -0.5
        ctx.alloc = torch.zeros_like if padded else torch.empty_like
        out = ctx.alloc(q)
        lse = torch.empty(total, heads, device=q.device, dtype=torch.float32)
        # Drawn from torch's CPU generator: torch.manual_seed reproduces it and no GPU sync occurs.
        seed = int(torch.randint(0, 2**31 - 1, ())) if dropout_p > 0.0 else 0
        ctx.dropout = (max_len, float(dropout_p), seed, dropout_p > 0.0)
        grid = (batch * heads, triton.cdiv(max_len, cfg["BLOCK_M"]))
        if total > 0:
            _fwd_kernel[grid](q, k, v, out, lse, starts, ends, num_prefix, sm_scale * LOG2E,
                              heads, head_dim, *ctx.dropout, **cfg)
        ctx.save_for_backward(q, k, v, out, lse, starts, ends, num_prefix)
        ctx.max_len, ctx.sm_scale, ctx.cfg = max_len, sm_scale, cfg
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse, starts, ends, num_prefix = ctx.saved_tensors
        d_out = d_out.contiguous()
        total, heads, head_dim = q.shape
        batch, cfg = starts.shape[0], ctx.cfg
        # delta_i = sum_j P_ij dP_ij = <dO_i, O_i>: the softmax-Jacobian term, one value per row.
        delta = (out.float() * d_out.float()).sum(-1).contiguous()
        dq, dk, dv = ctx.alloc(q), ctx.alloc(k), ctx.alloc(v)
        if total > 0:
            args = (starts, ends, num_prefix, ctx.sm_scale * LOG2E, ctx.sm_scale, heads, head_dim, *ctx.dropout)
            grid_n = (batch * heads, triton.cdiv(ctx.max_len, cfg["BLOCK_N"]))
            _bwd_dkdv_kernel[grid_n](q, k, v, d_out, lse, delta, dk, dv, *args, **cfg)
            grid_m = (batch * heads, triton.cdiv(ctx.max_len, cfg["BLOCK_M"]))
            _bwd_dq_kernel[grid_m](q, k, v, d_out, lse, delta, dq, *args, **cfg)
        return dq, dk, dv, None, None, None, None, None, None


def triton_jagged_prefix_causal_attention(q, k, v, offsets, num_prefix, max_len, dropout_p=0.0):
    """q, k, v: [T, H, D]; offsets: [B+1] int64; num_prefix: [B] int64; max_len >= every length."""
    return PrefixCausalAttention.apply(q, k, v, offsets[:-1], offsets[1:], num_prefix, max_len, dropout_p, False)


def triton_padded_prefix_causal_attention(q, k, v, lengths, num_prefix, dropout_p=0.0):
    """q, k, v: [B, H, L, D]; lengths, num_prefix: [B] int64 -> [B, H, L, D], zeros past lengths.

    The kernels read the padded batch in place as [B * L, H, D] rows, sequence b starting at row
    b * L: no packing, no device sync. A batch made [B, L, H, D] and transposed is that layout
    already and is not copied; any other layout (the model's packed q/k/v) is copied once."""
    batch, heads, max_len, head_dim = q.shape
    rows = [x.transpose(1, 2).reshape(batch * max_len, heads, head_dim) for x in (q, k, v)]
    starts = torch.arange(0, batch * max_len, max_len, device=q.device, dtype=torch.int64)
    out = PrefixCausalAttention.apply(*rows, starts, starts + lengths.clamp(max=max_len), num_prefix, max_len,
                                      dropout_p, True)
    return out.view(batch, max_len, heads, head_dim).transpose(1, 2)
