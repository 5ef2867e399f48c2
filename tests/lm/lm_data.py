"""Random LM item features for the small rankers of the LM tests (a plain module, imported by name)."""
from __future__ import annotations

import numpy as np
import torch


def random_lm_features(num_items: int, sid_sizes: list[int], text_dim: int,
                       seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([num_items + 2, levels] semantic-ID codes, [num_items + 2, text_dim] text vectors) for items
    1..num_items, rows 0 and num_items + 1 empty; seeds torch's global generator with `seed` first."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    codes = torch.full((num_items + 2, len(sid_sizes)), -1, dtype=torch.int64)
    codes[1: num_items + 1] = torch.from_numpy(np.stack([rng.integers(0, s, num_items) for s in sid_sizes], 1))
    text = torch.zeros(num_items + 2, text_dim)
    text[1: num_items + 1] = torch.randn(num_items, text_dim)
    return codes, text
