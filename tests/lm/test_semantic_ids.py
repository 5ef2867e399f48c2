"""RQ-KMeans semantic IDs: determinism, uniqueness after the collision level, shrinking residuals."""
import numpy as np
import pytest
import torch

from unirank.model.semantic_ids import (
    SemanticIdConfig, SemanticIdTable, default_codebook_size, kmeans,
    resolve_collisions, semantic_id_stats, semantic_ids)


def clustered_embeddings(num_items=400, dim=16, seed=0):
    """Unit vectors around a few centres, with exact duplicates so the collision level has work."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(8, dim))
    x = centres[rng.integers(8, size=num_items)] + 0.3 * rng.normal(size=(num_items, dim))
    x[num_items - 6:] = x[:6]  # six items share their text with six others
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_same_seed_same_codes():
    x = clustered_embeddings()
    config = SemanticIdConfig(num_levels=3, codebook_size=12, seed=7)
    codes_a, _ = semantic_ids(x, config)
    codes_b, _ = semantic_ids(x.copy(), config)
    assert codes_a.dtype == np.int64 and codes_a.shape == (len(x), 4)
    assert np.array_equal(codes_a, codes_b)
    codes_other_seed, _ = semantic_ids(x, SemanticIdConfig(num_levels=3, codebook_size=12, seed=8))
    assert not np.array_equal(codes_a, codes_other_seed)


def test_codes_unique_after_collision_level():
    x = clustered_embeddings()
    codes, quantizer = semantic_ids(x, SemanticIdConfig(num_levels=2, codebook_size=6))
    assert len(np.unique(codes, axis=0)) == len(x)
    assert len(np.unique(codes[:, :-1], axis=0)) < len(x)  # the prefix alone does collide here
    # identical embeddings get the same prefix and 0, 1, ... in item order
    for i in range(6):
        j = len(x) - 6 + i
        assert np.array_equal(codes[i, :-1], codes[j, :-1]) and codes[i, -1] < codes[j, -1]
    stats = semantic_id_stats(codes, quantizer)
    assert stats["max_items_per_tuple"] == codes[:, -1].max() + 1
    assert 0 < stats["collision_rate"] <= 1


def test_resolve_collisions_by_hand():
    codes = np.array([[1, 2], [0, 0], [1, 2], [1, 2], [0, 1], [0, 0]])
    assert resolve_collisions(codes).tolist() == [0, 0, 1, 2, 0, 1]


def test_residual_error_decreases_with_levels():
    x = clustered_embeddings(num_items=600, dim=24)
    codes, quantizer = semantic_ids(x, SemanticIdConfig(num_levels=4, codebook_size=10))
    errors = [quantizer.input_mse] + quantizer.residual_mse
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    reconstruction = quantizer.reconstruct(codes[:, :-1])
    measured = float(((x - reconstruction) ** 2).sum(1).mean())
    assert measured == pytest.approx(quantizer.residual_mse[-1], rel=1e-5)


def test_quantize_reproduces_fit_assignments():
    x = clustered_embeddings()
    codes, quantizer = semantic_ids(x, SemanticIdConfig(num_levels=2, codebook_size=8))
    assert np.array_equal(quantizer.quantize(x), codes[:, :-1])


def test_kmeans_separates_obvious_clusters():
    x = np.array([[0.0, 0.0], [0.1, 0.0], [10.0, 10.0], [10.1, 10.0], [0.0, 10.0], [0.1, 10.0]])
    centroids, assign = kmeans(x, k=3, seed=0)
    assert assign[0] == assign[1] and assign[2] == assign[3] and assign[4] == assign[5]
    assert len(set(assign.tolist())) == 3
    # more codes than distinct points must not crash
    _, assign_dup = kmeans(np.ones((5, 3)), k=4, seed=0)
    assert assign_dup.shape == (5,)


def test_default_codebook_size_scales_with_items():
    assert default_codebook_size(12101) == 110
    assert default_codebook_size(10_000_000) == 256
    assert default_codebook_size(1) == 2
    with pytest.raises(ValueError, match="codebook_size"):
        SemanticIdConfig(codebook_size=1)


def test_table_offsets_put_levels_in_disjoint_ranges():
    x = clustered_embeddings()
    codes, quantizer = semantic_ids(x, SemanticIdConfig(num_levels=2, codebook_size=6))
    table = SemanticIdTable.from_quantizer(codes, quantizer)
    assert table.level_sizes[:2] == [6, 6] and table.level_sizes[2] == codes[:, -1].max() + 1
    ids = table.global_ids(torch.arange(len(x)))
    assert ids.shape == (len(x), 3) and ids.dtype == torch.int64
    for level in range(3):
        low = int(table.offsets[level])
        assert ((ids[:, level] >= low) & (ids[:, level] < low + table.level_sizes[level])).all()
    assert int(ids.max()) < table.num_embeddings == sum(table.level_sizes)
    rows = torch.tensor([[3, 1], [0, 2]])
    assert table.level_ids(rows).shape == (2, 2, 3)
    assert torch.equal(table.global_ids(rows) - table.offsets, table.level_ids(rows))


def test_table_rejects_codes_outside_sizes():
    with pytest.raises(ValueError, match="level_sizes"):
        SemanticIdTable(np.array([[0, 5], [1, 0]]), level_sizes=[2, 3])
