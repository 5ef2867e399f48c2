"""Search query construction (docs/PROTOCOL.md, "Tasks"): 1-3 of the target's attribute names, lowercased,
split on non-letters, duplicate words dropped, seeded by (user id, item id), never the title."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import combinations

import numpy as np

from unirank.model.request import Task
from unirank.model.tokenizer import split_words
from unirank.data.datasets.synthetic import generate
from unirank.data.examples import RequestBuilder, build_search_query, fit_tokenizer

from core_data import REPO, hand_data

ATTRIBUTE_NAMES = ["", "Skin Care", "FACE", "Nars", "skin-care", "Moisturizers & Creams", "Sun2Block"]
ITEM_ATTRIBUTES = [[], [1, 2, 3, 4, 5, 6], [], [3], [2, 2]]
TITLES = ["", "zebra widget deluxe", "plain thing", "solo title", "double face"]
NUM_USERS = 60


def _data():
    return hand_data([[1, 2, 3]] * NUM_USERS, ITEM_ATTRIBUTES, ATTRIBUTE_NAMES, TITLES)


def _possible_queries(attrs: list[int]) -> dict[str, int]:
    """Every query the rule allows -> number of attributes picked (in attribute order)."""
    out = {}
    for k in (1, 2, 3):
        for subset in combinations(attrs, k):
            words = [w for a in subset for w in split_words(ATTRIBUTE_NAMES[a])]
            out.setdefault(" ".join(dict.fromkeys(words)), k)
    return out


def test_every_query_is_an_allowed_subset_of_one_to_three_attributes():
    data = _data()
    allowed = _possible_queries(ITEM_ATTRIBUTES[1])
    sizes = set()
    for user in range(NUM_USERS):
        query = build_search_query(data, user, 1)
        assert query in allowed, query
        assert query == query.lower() and len(query.split()) == len(set(query.split()))
        sizes.add(allowed[query])
    # the subset size itself is random in 1..3
    assert sizes == {1, 2, 3}


def test_words_are_split_on_non_letters_and_deduplicated():
    data = _data()
    assert build_search_query(data, 0, 3) == "nars"
    # item 4 has the attribute FACE twice: one word, lowercased
    assert {build_search_query(data, u, 4) for u in range(NUM_USERS)} == {"face"}
    # "Sun2Block" splits on the digit; "Moisturizers & Creams" on the ampersand
    words = {w for u in range(NUM_USERS) for w in build_search_query(data, u, 1).split()}
    assert {"sun", "block", "moisturizers", "creams"} <= words
    assert not any(ch.isdigit() or ch in "&-" for w in words for ch in w)


def test_never_uses_title_words():
    data = _data()
    for user in range(NUM_USERS):
        for item in (1, 3, 4):
            assert not set(build_search_query(data, user, item).split()) & {"zebra", "widget", "deluxe", "solo", "title", "double"}
    synthetic = generate(num_users=50, num_items=60, seed=3)
    for user in range(50):
        for item in range(1, 61):
            attr_words = set(split_words(synthetic.item_attribute_text(item)))
            assert set(build_search_query(synthetic, user, item).split()) <= attr_words


def test_item_without_attributes_gives_empty_query():
    data = _data()
    assert build_search_query(data, 0, 2) == ""
    builder = RequestBuilder(data, fit_tokenizer(data), max_history=5, max_query_len=8)
    request = builder.build(Task.SEARCH, np.array([0, 1]), [np.array([1]), np.array([1])], np.array([2, 3]))
    assert request.query_lengths.tolist() == [0, 1]
    assert request.query[0].tolist() == [0] * 8


def test_deterministic_by_user_and_item_and_varies_with_them():
    data, again = _data(), _data()
    first = [build_search_query(data, u, 1) for u in range(NUM_USERS)]
    assert first == [build_search_query(data, u, 1) for u in range(NUM_USERS)]
    assert first == [build_search_query(again, u, 1) for u in range(NUM_USERS)]
    assert len(set(first)) >= 5  # another user gets another subset
    # Same user, another item with the same attributes: the item id is part of the seed.
    twin = hand_data([[1]] * NUM_USERS, [[], ITEM_ATTRIBUTES[1], ITEM_ATTRIBUTES[1]], ATTRIBUTE_NAMES)
    assert [build_search_query(twin, u, 1) for u in range(NUM_USERS)] != [build_search_query(twin, u, 2) for u in range(NUM_USERS)]


def test_same_queries_in_another_process_with_another_hash_seed():
    """"Every run builds the same queries": not tied to Python's per-process string hashing."""
    data = _data()
    expected = [build_search_query(data, u, 1) for u in range(NUM_USERS)]
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]);"
        "from test_queries import _data, NUM_USERS;"
        "from unirank.data.examples import build_search_query;"
        "d = _data(); print(json.dumps([build_search_query(d, u, 1) for u in range(NUM_USERS)]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code, str(REPO / "tests" / "core")], capture_output=True,
                         text=True, env=env, check=True, cwd=REPO / "tests" / "core")
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected


def test_request_builder_puts_queries_only_on_search_rows():
    data = _data()
    tokenizer = fit_tokenizer(data)
    builder = RequestBuilder(data, tokenizer, max_history=5, max_query_len=8)
    users, histories, targets = np.array([0, 1]), [np.array([1, 3]), np.array([3])], np.array([1, 4])
    search = builder.build(Task.SEARCH, users, histories, targets)
    for row in range(2):
        n = int(search.query_lengths[row])
        words = " ".join(tokenizer.words[i - 2] for i in search.query[row, :n].tolist())
        assert n >= 1 and words == build_search_query(data, int(users[row]), int(targets[row]))
    for task in (Task.PREQUERY, Task.SIMILAR):
        assert builder.build(task, users, histories, targets).query_lengths.tolist() == [0, 0]
