"""Prefix-causal attention for the ranker: a bidirectional task/context prefix, then causal history.

Public API (reference on CPU, Triton on CUDA or under TRITON_INTERPRET=1; see kernels/README.md):
`prefix_causal_attention` (padded [B, H, L, D]) and `jagged_prefix_causal_attention` ([T, H, D]).
"""

from unirank.kernels.attention.reference import (
    jagged_to_padded,
    padded_to_jagged,
    reference_prefix_causal_attention,
)
from unirank.kernels.dispatch import choose_impl


def prefix_causal_attention(q, k, v, lengths, num_prefix, dropout_p=0.0, impl="auto"):
    """q, k, v: [B, H, L, D]; lengths, num_prefix: [B] int64. Returns [B, H, L, D], padding zeroed.

    Query i of sequence b sees key j iff j < lengths[b] and (j < num_prefix[b] or j <= i).
    Scale is 1/sqrt(D). dropout_p applies attention dropout (pass 0.0 at eval); the Triton and
    reference paths draw different masks from torch's RNG, so only their distributions agree.
    """
    if choose_impl(impl, q) == "reference":
        return reference_prefix_causal_attention(q, k, v, lengths, num_prefix, dropout_p)
    from unirank.kernels.attention.triton import triton_padded_prefix_causal_attention

    return triton_padded_prefix_causal_attention(q, k, v, lengths, num_prefix, dropout_p)


def jagged_prefix_causal_attention(q, k, v, offsets, num_prefix, max_len, dropout_p=0.0, impl="auto"):
    """q, k, v: [T, H, D] jagged by offsets [B+1] int64; num_prefix [B] int64. Returns [T, H, D].

    max_len must be >= every sequence length (it sizes the grid; no device sync is made for it).
    """
    if choose_impl(impl, q) == "reference":
        lengths = offsets.diff()
        padded = [jagged_to_padded(x, lengths, max_len) for x in (q, k, v)]
        out = reference_prefix_causal_attention(*padded, lengths, num_prefix, dropout_p)
        return padded_to_jagged(out, lengths)
    from unirank.kernels.attention.triton import triton_jagged_prefix_causal_attention

    return triton_jagged_prefix_causal_attention(q, k, v, offsets, num_prefix, max_len, dropout_p)
