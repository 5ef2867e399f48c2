"""Leave-one-out split (docs/PROTOCOL.md): test = s_n, validation = s_{n-1}, training = s_1 .. s_{n-2}."""
from __future__ import annotations

import numpy as np
import pytest

from unirank.data.examples import leave_one_out_split


def _lists(arrays):
    return [np.asarray(a).tolist() for a in arrays]


SEQUENCES = [
    [1, 2, 3, 4],        # user 0
    [5, 6],              # user 1: < 3 interactions, dropped
    [7, 8, 9],           # user 2: the minimum, training part has one item
    [],                  # user 3: empty, dropped
    [10, 11, 12, 13, 14],  # user 4
    [3],                 # user 5: dropped
]


def test_hand_case_targets_histories_and_train():
    split = leave_one_out_split([np.array(s) for s in SEQUENCES])
    assert split.users.tolist() == [0, 2, 4]
    assert _lists(split.train) == [[1, 2], [7], [10, 11, 12]]
    assert split.valid.targets.tolist() == [3, 8, 13]
    assert _lists(split.valid.histories) == [[1, 2], [7], [10, 11, 12]]
    assert split.test.targets.tolist() == [4, 9, 14]
    assert _lists(split.test.histories) == [[1, 2, 3], [7, 8], [10, 11, 12, 13]]
    assert split.valid.users.tolist() == split.test.users.tolist() == [0, 2, 4]
    assert len(split.valid) == len(split.test) == 3


def test_order_is_kept_and_repeats_are_not_removed():
    # Chronological order is the input order (no sorting, no de-duplication of repeats).
    split = leave_one_out_split([np.array([9, 3, 9, 1, 3, 2])])
    assert _lists(split.train) == [[9, 3, 9, 1]]
    assert split.valid.targets.tolist() == [3]
    assert split.test.targets.tolist() == [2]
    assert _lists(split.test.histories) == [[9, 3, 9, 1, 3]]


def test_training_part_never_contains_validation_or_test_positions():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 50, size=rng.integers(0, 12)) for _ in range(200)]
    split = leave_one_out_split(seqs)
    kept = [u for u, s in enumerate(seqs) if len(s) >= 3]
    assert split.users.tolist() == kept
    for row, u in enumerate(split.users):
        s = seqs[u].tolist()
        assert split.train[row].tolist() == s[:-2]
        assert split.valid.histories[row].tolist() + [int(split.valid.targets[row])] == s[:-1]
        assert split.test.histories[row].tolist() + [int(split.test.targets[row])] == s


def test_min_length_filters_more_users_and_cannot_go_below_three():
    split = leave_one_out_split([np.array(s) for s in SEQUENCES], min_length=4)
    assert split.users.tolist() == [0, 4]
    with pytest.raises(ValueError, match="min_length"):
        leave_one_out_split([np.array(s) for s in SEQUENCES], min_length=2)


def test_no_eligible_user_gives_an_empty_split():
    split = leave_one_out_split([np.array([1, 2]), np.array([3])])
    assert len(split.users) == 0 and len(split.test) == 0 and split.train == []
