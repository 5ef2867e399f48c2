"""Random but schema-valid requests of every task, for export parity checks, tests and benchmarks."""
from __future__ import annotations

import numpy as np

from unirank.serving.request_arrays import pad_and_stack, served_task_ids

TASKS = (0, 1, 2)
SUGGEST = 3


def random_request(rng: np.random.Generator, task: int, num_items: int, vocab_size: int, max_history: int,
                   max_query_len: int, max_candidates: int = 50, num_queries: int = 0) -> dict[str, np.ndarray]:
    """One row: similar-item has a source item and no history; search has a query; a third of the
    rows carry candidates (with some padding; query ids up to `num_queries` on suggest rows), the
    rest rank the whole catalogue."""
    history_len = 0 if task == 1 else int(rng.integers(0, max_history + 1))
    query_len = int(rng.integers(1, max_query_len + 1)) if task == 0 else 0
    num_candidates = int(rng.integers(1, max_candidates + 1)) if rng.random() < 1 / 3 else 0
    candidates = rng.integers(1, (num_queries if task == SUGGEST else num_items) + 1, size=num_candidates)
    candidates[rng.random(num_candidates) < 0.1] = 0
    # a quarter of the item rows exclude a few ids (some of them the row's own candidates)
    num_exclude = int(rng.integers(1, 8)) if task != SUGGEST and rng.random() < 0.25 else 0
    exclude = rng.integers(1, num_items + 1, size=num_exclude)
    if num_exclude and num_candidates:
        exclude[0] = candidates[0]
    row = {
        "task": np.array([task]),
        "history": rng.integers(1, num_items + 1, size=(1, history_len)),
        "history_lengths": np.array([history_len]),
        "query": rng.integers(2, max(vocab_size, 3), size=(1, query_len)),
        "query_lengths": np.array([query_len]),
        "source_item": np.array([int(rng.integers(1, num_items + 1)) if task == 1 else 0]),
        "candidates": candidates.reshape(1, -1),
        "exclude": exclude.reshape(1, -1),
        "exclude_lengths": np.array([num_exclude]),
    }
    return {k: v.astype(np.int64) for k, v in row.items()}


def random_batches(metadata, vocab_size: int, requests: int, batch_size: int = 16, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`requests` rows cycling through the tasks the model serves, padded into batches of mixed
    tasks and lengths."""
    rng = np.random.default_rng(seed)
    num_queries = getattr(metadata, "num_queries", 0)
    tasks = served_task_ids(num_queries)
    rows = [random_request(rng, tasks[i % len(tasks)], metadata.num_items, vocab_size, metadata.max_history,
                           metadata.max_query_len, num_queries=num_queries) for i in range(requests)]
    return [pad_and_stack(rows[i : i + batch_size]) for i in range(0, requests, batch_size)]
