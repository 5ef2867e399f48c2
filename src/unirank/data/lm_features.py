"""LM item features from the catalogue's text: frozen text-encoder vectors of every item's content
and RQ-KMeans semantic IDs of those vectors, laid out by item id for the item tower."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from unirank.model.semantic_ids import SemanticIdConfig, SemanticIdTable, semantic_ids
from unirank.model.text_encoder import TextEncoder, format_item_text
from unirank.data.datasets import InteractionData


@dataclass
class ItemLMFeatures:
    text: torch.Tensor  # [num_items + 2, text_dim] float32; rows 0 (padding) and num_items + 1 (OOV) zero
    codes: torch.Tensor  # [num_items + 2, levels + 1] int64 semantic IDs; -1 on padding / OOV rows
    level_sizes: list[int]  # rows per level (K-means levels, then the collision level)


def item_texts(data: InteractionData) -> list[str]:
    """Encoder input per item id 1..N: title, then attribute names."""
    return [format_item_text(data.item_text[i], [data.attribute_names[a] for a in data.item_attributes[i]])
            for i in range(1, data.num_items + 1)]


def item_lm_features(data: InteractionData, cache_dir: str | Path, semantic_id_levels: int, seed: int,
                     fit_items: np.ndarray | None = None, encoder: TextEncoder | None = None) -> ItemLMFeatures:
    """Encode (cached on disk by a hash of model files + texts) and quantise the catalogue.

    `fit_items` (item ids) restricts the K-means fit to those items, e.g. the warm items of a
    cold-start split: new items are then assigned codes the way a production system would, by the
    nearest codewords of a codebook that never saw them. Collisions are numbered over all items.
    """
    encoder = encoder or TextEncoder()
    vectors = encoder.encode_items_cached(item_texts(data), Path(cache_dir).expanduser())
    n, rows = data.num_items, data.num_items + 2
    text = torch.zeros(rows, vectors.shape[1])
    text[1: n + 1] = torch.from_numpy(vectors)
    codes = torch.full((rows, semantic_id_levels + 1 if semantic_id_levels else 0), -1, dtype=torch.int64)
    sizes: list[int] = []
    if semantic_id_levels:
        fit_rows = None if fit_items is None else np.asarray(fit_items, dtype=np.int64) - 1
        all_codes, quantizer = semantic_ids(vectors, SemanticIdConfig(num_levels=semantic_id_levels, seed=seed),
                                            fit_rows=fit_rows)
        sizes = SemanticIdTable.from_quantizer(all_codes, quantizer).level_sizes
        codes[1: n + 1] = torch.from_numpy(all_codes)
    return ItemLMFeatures(text, codes, sizes)
