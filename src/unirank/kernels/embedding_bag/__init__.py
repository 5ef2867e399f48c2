"""Embedding bag over jagged indices (sum / mean, optional per-sample weights), many tables per launch.

Public API (reference on CPU, Triton on CUDA or under TRITON_INTERPRET=1; see kernels/README.md):
`embedding_bag` (one table) and `multi_embedding_bag` (a list of tables, one Triton launch).
"""
from unirank.kernels.dispatch import choose_impl
from unirank.kernels.embedding_bag.reference import MODES, reference_embedding_bag


def multi_embedding_bag(weights, indices, offsets, per_sample_weights=None, mode="sum", impl="auto"):
    """Lists (one entry per table) of weight [N_t, D_t], indices [nnz_t] int64, offsets [B_t+1] int64
    (offsets[0] == 0, offsets[-1] == nnz_t), optional per-sample weights [nnz_t]. Returns a list of
    [B_t, D_t]. On the Triton path all tables must share a dtype and device.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not (len(weights) == len(indices) == len(offsets)):
        raise ValueError("weights, indices and offsets must have one entry per table")
    if per_sample_weights is not None and len(per_sample_weights) != len(weights):
        raise ValueError("per_sample_weights must have one entry per table")
    if choose_impl(impl, weights[0]) == "reference":
        psws = per_sample_weights if per_sample_weights is not None else [None] * len(weights)
        return [reference_embedding_bag(w, i, o, p, mode)
                for w, i, o, p in zip(weights, indices, offsets, psws)]
    from unirank.kernels.embedding_bag.triton import triton_multi_embedding_bag

    return triton_multi_embedding_bag(weights, indices, offsets, per_sample_weights, mode)


def embedding_bag(weight, indices, offsets, per_sample_weights=None, mode="sum", impl="auto"):
    """weight [N, D], indices [nnz] int64, offsets [B+1] int64 -> [B, D]; empty bags give zeros."""
    psws = None if per_sample_weights is None else [per_sample_weights]
    return multi_embedding_bag([weight], [indices], [offsets], psws, mode, impl)[0]
