"""Cold-start item split: held-out items vanish from training, and are exactly the eval targets."""
import numpy as np
import pytest

from unirank.experiments.cold_start import ColdStartCase, cold_start_split


def random_sequences(num_users=300, num_items=200, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, num_items + 1, size=rng.integers(5, 12)).tolist() for _ in range(num_users)]


def test_cold_items_never_in_training():
    sequences = random_sequences()
    split = cold_start_split(sequences, seed=3, fraction=0.1)
    cold = set(split.cold_items)
    num_items = len({i for s in sequences for i in s})
    assert len(cold) == round(0.1 * num_items)
    assert len(split.train_sequences) == len(sequences)
    assert not cold & {i for s in split.train_sequences for i in s}
    # only cold interactions were removed, order preserved
    for seq, train in zip(sequences, split.train_sequences):
        assert train == [i for i in seq if i not in cold]


def test_eval_cases_are_last_items_with_cold_free_history():
    sequences = random_sequences()
    split = cold_start_split(sequences, seed=3, fraction=0.1)
    cold = set(split.cold_items)
    assert cold <= {s[-1] for s in sequences}
    users_with_cold_last = [u for u, s in enumerate(sequences) if s[-1] in cold]
    assert [c.user_index for c in split.eval_cases] == users_with_cold_last  # no history emptied here
    assert {c.target for c in split.eval_cases} == cold
    for case in split.eval_cases:
        seq = sequences[case.user_index]
        assert case.target == seq[-1]
        assert case.history == [i for i in seq[:-1] if i not in cold] and case.history


def test_deterministic_given_seed():
    sequences = random_sequences()
    assert cold_start_split(sequences, seed=5) == cold_start_split(sequences, seed=5)
    assert cold_start_split(sequences, seed=5).cold_items != cold_start_split(sequences, seed=6).cold_items


def test_small_hand_case():
    sequences = [[1, 2, 3], [3, 4], [2, 4, 1], [5]]
    split = cold_start_split(sequences, seed=0, fraction=0.2)  # 5 items -> 1 cold, among {3, 4, 1}
    (cold,) = split.cold_items
    assert cold in {1, 3, 4}
    expected = {
        1: [ColdStartCase(2, [2, 4], 1)],
        3: [ColdStartCase(0, [1, 2], 3)],
        4: [ColdStartCase(1, [3], 4)],
    }[cold]
    assert split.eval_cases == expected
    assert split.train_sequences[3] == [5]


def test_user_with_only_cold_history_is_dropped():
    sequences = [[7, 9], [9, 7], [1, 2]]  # with 7 and 9 both cold, neither user keeps a history
    split = cold_start_split(sequences, seed=0, fraction=0.99)
    assert set(split.cold_items) == {7, 9, 2}
    assert split.eval_cases == [ColdStartCase(2, [1], 2)]
    assert split.train_sequences == [[], [], [1]]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        cold_start_split([[1, 2]], seed=0, fraction=fraction)
