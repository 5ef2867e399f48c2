"""Plain-PyTorch prefix-causal attention (padded), plus the padded <-> jagged layout moves.

This is the reference the Triton kernel is tested against and also the path that runs inside the
exported ONNX model, so it sticks to ops that export: SDPA with a boolean mask, no data-dependent
Python control flow.
"""
import torch
import torch.nn.functional as F


def prefix_causal_mask(lengths: torch.Tensor, num_prefix: torch.Tensor, max_len: int) -> torch.Tensor:
    """[B, L, L] bool: query i may see key j iff j < len and (j < num_prefix or j <= i)."""
    pos = torch.arange(max_len, device=lengths.device)
    i, j = pos[None, :, None], pos[None, None, :]
    key_valid = j < lengths[:, None, None]
    return key_valid & ((j < num_prefix[:, None, None]) | (j <= i))


def reference_prefix_causal_attention(q, k, v, lengths, num_prefix, dropout_p=0.0):
    """q, k, v: [B, H, L, D]; returns [B, H, L, D] with zeros at padded query rows."""
    max_len = q.shape[-2]
    allowed = prefix_causal_mask(lengths, num_prefix, max_len)
    pos = torch.arange(max_len, device=q.device)
    query_valid = pos[None, :] < lengths[:, None]  # [B, L]
    # A padded query row of an empty sequence sees no key at all and SDPA would return NaN there;
    # letting every padded row see key 0 keeps the softmax finite, and the row is zeroed below.
    allowed = allowed | (~query_valid[:, :, None] & (pos[None, None, :] == 0))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], dropout_p=dropout_p)
    return out * query_valid[:, None, :, None].to(out.dtype)


def valid_positions(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """[B, L] bool: position l of sequence b is a real token."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def padded_to_jagged(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] -> [T, H, D], tokens of sequence b at rows offsets[b]:offsets[b+1]."""
    return x.transpose(1, 2)[valid_positions(lengths, x.shape[2])]


def jagged_to_padded(x: torch.Tensor, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """[T, H, D] -> [B, H, L, D] with zeros at padded positions (differentiable)."""
    flat_rows = valid_positions(lengths, max_len).flatten().nonzero().squeeze(1)
    padded = x.new_zeros(lengths.shape[0] * max_len, *x.shape[1:]).index_copy(0, flat_rows, x)
    return padded.view(lengths.shape[0], max_len, *x.shape[1:]).transpose(1, 2)
