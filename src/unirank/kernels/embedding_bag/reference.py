"""Plain-PyTorch embedding bag: the parity target of the Triton kernel and the CPU path.

Semantics (shared with the kernel): bag b pools rows weight[indices[offsets[b]:offsets[b+1]]],
each scaled by its per-sample weight if given; "sum" adds them, "mean" divides that sum by the
bag size; an empty bag gives zeros.
"""
import torch.nn.functional as F

MODES = ("sum", "mean")


def reference_embedding_bag(weight, indices, offsets, per_sample_weights=None, mode="sum"):
    """weight [N, D], indices [nnz] int64, offsets [B+1] int64 -> [B, D]."""
    # torch only accepts per_sample_weights in "sum" mode, so pool as a sum and divide for "mean".
    pooled = F.embedding_bag(indices, weight, offsets, mode="sum",
                             per_sample_weights=per_sample_weights, include_last_offset=True)
    if mode == "mean":
        pooled = pooled / offsets.diff().clamp(min=1).to(pooled.dtype)[:, None]
    return pooled
