"""A small synthetic dataset with planted structure, the embedded default for the quickstart and
fast tests: Zipf popularity, latent topics with topic words and brands as attributes, sticky topic
transitions in user sequences and "follow-up" items (item i is often followed by a fixed partner)."""
from __future__ import annotations

import numpy as np

from unirank.data.datasets.catalog import InteractionData

_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "qu", "do"]


def _word(rng: np.random.Generator, n: int) -> str:
    return "".join(rng.choice(_SYLLABLES, size=n))


def generate(num_users: int = 600, num_items: int = 400, num_topics: int = 8, num_brands: int = 30,
             mean_length: float = 12.0, seed: int = 0) -> InteractionData:
    rng = np.random.default_rng(seed)
    topic_names = [_word(rng, 3) for _ in range(num_topics)]
    sub_names = [[_word(rng, 2) + " " + _word(rng, 3) for _ in range(3)] for _ in range(num_topics)]
    brand_names = [_word(rng, 2).capitalize() for _ in range(num_brands)]
    attribute_names = [""] + topic_names + [s for subs in sub_names for s in subs] + brand_names
    sub_base, brand_base = 1 + num_topics, 1 + num_topics + 3 * num_topics

    item_topic = rng.integers(0, num_topics, size=num_items + 1)
    item_sub = rng.integers(0, 3, size=num_items + 1)
    item_brand = rng.integers(0, num_brands, size=num_items + 1)
    popularity = 1.0 / np.arange(1, num_items + 1) ** 0.8
    popularity = rng.permutation(popularity)
    partner = rng.permutation(np.arange(1, num_items + 1))  # planted item-to-item follow-ups

    items_by_topic = [np.flatnonzero(item_topic[1:] == t) + 1 for t in range(num_topics)]
    item_attributes: list[list[int]] = [[]]
    item_text = [""]
    for i in range(1, num_items + 1):
        t = item_topic[i]
        item_attributes.append([1 + t, sub_base + 3 * t + item_sub[i], brand_base + item_brand[i]])
        item_text.append(f"{brand_names[item_brand[i]].lower()} {sub_names[t][item_sub[i]]} {_word(rng, 2)}")

    seqs = []
    for _ in range(num_users):
        prefs = rng.dirichlet(np.full(num_topics, 0.3))
        length = max(5, int(rng.poisson(mean_length)))
        topic, seq = rng.choice(num_topics, p=prefs), []
        for _ in range(length):
            if seq and rng.random() < 0.3:
                item = int(partner[seq[-1] - 1])
            else:
                if rng.random() < 0.2:
                    topic = rng.choice(num_topics, p=prefs)
                pool = items_by_topic[topic]
                p = popularity[pool - 1] / popularity[pool - 1].sum()
                item = int(rng.choice(pool, p=p))
            seq.append(item)
        seqs.append(np.array(seq, dtype=np.int64))
    return InteractionData(
        name="synthetic", sequences=seqs, num_items=num_items, item_attributes=item_attributes,
        attribute_names=attribute_names, item_text=item_text, user_keys=[str(u) for u in range(num_users)],
        item_keys=[""] + [f"item-{i}" for i in range(1, num_items + 1)],
    )
