"""Zero-shot search (docs/PROTOCOL.md): names held out by crc32(name) % modulus never reach a training
query; test queries built from them alone form the zero-shot set, evaluated beside the usual one."""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from unirank.model.request import Task
from unirank.model.tokenizer import split_words
from unirank.config import ConfigError, load_config
from unirank.data.datasets.synthetic import generate
from unirank.evaluation.evaluate import ZERO_SHOT, evaluate_all
from unirank.data.examples import (RequestBuilder, TrainingExamples, build_search_query, fit_tokenizer,
                                       held_out_name, leave_one_out_split)

MODULUS = 3  # a third of the synthetic names held out, so both sides are well populated


def _words(data, attrs) -> set[str]:
    return {w for a in attrs for w in split_words(data.attribute_names[a])}


def _sides(data, item):
    held = [a for a in data.item_attributes[item] if held_out_name(data.attribute_names[a], MODULUS)]
    kept = [a for a in data.item_attributes[item] if not held_out_name(data.attribute_names[a], MODULUS)]
    return held, kept


def test_the_rule_is_the_crc32_of_the_name_alone():
    names = ["Makeup", "Nail Polish", "Neutrogena", "Skin Care", "OPI"]
    assert [held_out_name(n, 10) for n in names] == [zlib.crc32(n.encode()) % 10 == 0 for n in names]
    assert not any(held_out_name(n, 0) for n in names)
    data = generate(num_users=50, num_items=60, seed=3)
    flags = [held_out_name(n, MODULUS) for n in data.attribute_names[1:]]
    assert any(flags) and not all(flags)


def test_training_queries_never_use_a_held_out_name_and_zero_shot_queries_only_them():
    data = generate(num_users=80, num_items=60, seed=3)
    for user in range(0, 80, 7):
        for item in range(1, data.num_items + 1):
            held, kept = _sides(data, item)
            train_query = set(build_search_query(data, user, item, "train", MODULUS).split())
            zero_shot = set(build_search_query(data, user, item, "zero_shot", MODULUS).split())
            assert train_query <= _words(data, kept)
            assert zero_shot <= _words(data, held)
            assert bool(zero_shot) == bool(_words(data, held))
            assert build_search_query(data, user, item, "train", MODULUS) == build_search_query(
                data, user, item, "train", MODULUS)
    with pytest.raises(ValueError, match="query pool"):
        build_search_query(data, 0, 1, "test")


def test_training_batches_draw_search_queries_from_the_kept_names():
    data = generate(num_users=80, num_items=60, seed=3)
    tokenizer = fit_tokenizer(data)
    builder = RequestBuilder(data, tokenizer, max_history=8, max_query_len=8, zero_shot_modulus=MODULUS)
    held_words = {w for n in data.attribute_names[1:] if held_out_name(n, MODULUS) for w in split_words(n)}
    kept_words = {w for n in data.attribute_names[1:] if not held_out_name(n, MODULUS) for w in split_words(n)}
    only_held = {tokenizer.encode(w)[0] for w in held_words - kept_words}
    examples = TrainingExamples(leave_one_out_split(data.sequences), builder, batch_size=16, seed=0,
                                tasks=(Task.SEARCH,))
    seen = set()
    for batch in examples.epoch():
        seen |= set(batch.request.query[batch.request.query_lengths > 0].flatten().tolist())
    assert seen and not seen & only_held


def test_evaluate_all_adds_the_zero_shot_set_of_users_with_a_held_out_query():
    data = generate(num_users=80, num_items=60, seed=3)
    split = leave_one_out_split(data.sequences)
    builder = RequestBuilder(data, fit_tokenizer(data), max_history=8, max_query_len=8, zero_shot_modulus=MODULUS)

    class Random:
        name, tasks = "random", (Task.SEARCH,)

        def scores(self, task, request):
            return __import__("torch").rand(request.batch_size, data.num_items + 1)

    results = evaluate_all([Random()], split.test, builder, ks=(10,), num_bootstrap=0)
    expected = sum(bool(_sides(data, int(t))[0]) for t in split.test.targets)
    assert 0 < expected < len(split.test)
    assert results[ZERO_SHOT]["random"]["num_users"] == expected
    assert results["search"]["random"]["num_users"] == len(split.test)
    off = RequestBuilder(data, fit_tokenizer(data), max_history=8, max_query_len=8)
    assert ZERO_SHOT not in evaluate_all([Random()], split.test, off, ks=(10,), num_bootstrap=0)


def test_a_negative_modulus_is_refused():
    with pytest.raises(ConfigError, match="zero_shot_modulus"):
        load_config(None, ["data.zero_shot_modulus=-1"])
    assert np.isclose(load_config(None, []).data.zero_shot_modulus, 10)
