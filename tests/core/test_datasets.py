"""Dataset loaders: Amazon S3-Rec layout (any category name), MovieLens csv and `::` .dat, synthetic;
malformed files raise DatasetError naming the file (and line)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from unirank.data.datasets import DatasetError, load_dataset
from unirank.data.datasets.synthetic import generate

from core_data import shared_dataset


def _seqs(data):
    return [s.tolist() for s in data.sequences]


# ---------------------------------------------------------------- Amazon layout

def write_amazon(root: Path, name: str = "Toys", sequences: str = "u1 1 2 3\nu2 3 2 4 1\n",
                 item2attrs: dict | None = None, id2attribute: dict | None = None,
                 item2id: dict | None = None, item_text: str | None = "A1 red bricks\nA3 wooden box\n") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{name}.txt").write_text(sequences)
    (root / f"{name}_item2attributes.json").write_text(json.dumps(item2attrs if item2attrs is not None
                                                                  else {"1": [1, 2], "3": [2]}))
    maps = {"id2attribute": id2attribute if id2attribute is not None else {"1": "Lego", "2": "Building Blocks"},
            "item2id": item2id if item2id is not None else {"A1": "1", "A2": "2", "A3": "3", "A4": "4"}}
    (root / "datamaps.json").write_text(json.dumps(maps))
    if item_text is not None:
        (root / "item_text.txt").write_text(item_text)
    return root


@pytest.mark.parametrize("name", ["Toys", "Sports_and_Outdoors"])
def test_amazon_layout_any_category_name(tmp_path, name):
    data = load_dataset(str(write_amazon(tmp_path / "d", name=name)))
    assert data.name == name
    assert _seqs(data) == [[1, 2, 3], [3, 2, 4, 1]]
    assert data.user_keys == ["u1", "u2"]
    assert data.num_items == 4
    assert data.item_attributes == [[], [1, 2], [], [2], []]
    assert data.attribute_names == ["", "Lego", "Building Blocks"]
    assert data.item_text == ["", "red bricks", "", "wooden box", ""]
    assert data.item_attribute_text(1) == "Lego Building Blocks"


def test_amazon_item_text_is_optional(tmp_path):
    data = load_dataset(str(write_amazon(tmp_path / "d", item_text=None)))
    assert data.item_text == [""] * 5


def test_amazon_real_beauty():
    data = load_dataset(str(shared_dataset("amazon-beauty")))
    assert data.name == "Beauty"
    assert len(data.sequences) == 22_363
    assert data.num_items == 12_101
    assert data.sequences[0].tolist() == [1, 2, 3, 4, 5]  # first line of Beauty.txt: "1 1 2 3 4 5"
    assert sum(len(s) for s in data.sequences) > 150_000
    assert min(len(s) for s in data.sequences) >= 1 and all(s.min() >= 1 for s in data.sequences)
    assert sum(bool(a) for a in data.item_attributes) > 10_000
    assert sum(bool(t) for t in data.item_text) > 10_000


def test_amazon_non_integer_item_id_names_file_and_line(tmp_path):
    root = write_amazon(tmp_path / "d", sequences="u1 1 2 3\nu2 3 x7 1\n")
    with pytest.raises(DatasetError, match=r"Toys\.txt:2:.*integer"):
        load_dataset(str(root))


def test_amazon_unknown_asin_names_file_and_line(tmp_path):
    root = write_amazon(tmp_path / "d", item_text="A1 red bricks\nA3 box\nZZZ nothing\n")
    with pytest.raises(DatasetError, match=r"item_text\.txt:3:.*ZZZ"):
        load_dataset(str(root))


def test_amazon_unknown_attribute_id_names_file_and_item(tmp_path):
    root = write_amazon(tmp_path / "d", item2attrs={"1": [1, 9]})
    with pytest.raises(DatasetError, match=r"Toys_item2attributes\.json.*item 1.*9"):
        load_dataset(str(root))


def test_amazon_without_datamaps_attribute_ids_name_themselves(tmp_path):
    root = write_amazon(tmp_path / "d")
    (root / "datamaps.json").unlink()
    for fmt in ("auto", "amazon"):
        data = load_dataset(str(root), fmt=fmt)
        assert _seqs(data) == [[1, 2, 3], [3, 2, 4, 1]]
        assert data.attribute_names == ["", "1", "2"]
        assert data.item_attribute_text(1) == "1 2"
        assert data.item_text == [""] * 5  # item_text.txt is keyed by ASIN: unreadable without item2id


def test_amazon_sequence_file_cut_mid_line_names_file_and_line(tmp_path):
    root = write_amazon(tmp_path / "d", sequences="u1 1 2 3\nu2 3 2 4 1\nu3 4 1")
    with pytest.raises(DatasetError, match=r"Toys\.txt:3:.*cut mid-line"):
        load_dataset(str(root))


def test_amazon_missing_files(tmp_path):
    root = write_amazon(tmp_path / "e")
    (root / "Toys_item2attributes.json").unlink()
    with pytest.raises(DatasetError, match=r"item2attributes"):
        load_dataset(str(root))
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(str(tmp_path / "nowhere"))


def test_amazon_malformed_json_names_file_and_line(tmp_path):
    root = write_amazon(tmp_path / "d")
    (root / "datamaps.json").write_text('{"id2attribute": {},\n "item2id": {oops}}')
    with pytest.raises(DatasetError, match=r"datamaps\.json:2"):
        load_dataset(str(root))


def test_unknown_layout_is_an_error(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match="cannot tell the format"):
        load_dataset(str(tmp_path))


# ---------------------------------------------------------------- MovieLens

def test_movielens_real_csv():
    data = load_dataset(str(shared_dataset("ml-latest-small")))
    assert len(data.sequences) == 610
    assert sum(len(s) for s in data.sequences) == 100_836
    assert data.user_keys[:3] == ["1", "2", "3"]
    assert 9_000 < data.num_items <= 9_742
    assert "Comedy" in data.attribute_names and "(no genres listed)" not in data.attribute_names


DAT_MOVIES = "10::Toy Story (1995)::Animation|Children's\n20::Heat (1995)::Action|Crime\n30::Quiet::(no genres listed)\n"
# user 1: ts 300 (10), 100 (20), 200 (30), 200 (10 again, same ts as the line before: file order kept)
DAT_RATINGS = "1::10::5::300\n1::20::3::100\n1::30::4::200\n1::20::4::200\n2::10::4::5\n"


def test_movielens_dat_release(tmp_path):
    (tmp_path / "movies.dat").write_text(DAT_MOVIES, encoding="latin-1")
    (tmp_path / "ratings.dat").write_text(DAT_RATINGS)
    data = load_dataset(str(tmp_path))
    # items: movieId 10 -> 1, 20 -> 2, 30 -> 3; user 1 ordered by time, ties in file order
    assert data.user_keys == ["1", "2"]
    assert _seqs(data) == [[2, 3, 2, 1], [1]]
    assert data.attribute_names == ["", "Action", "Animation", "Children's", "Crime"]
    assert data.item_attributes == [[], [2, 3], [1, 4], []]
    assert data.item_text == ["", "Toy Story (1995)", "Heat (1995)", "Quiet"]


def test_movielens_csv_quoted_titles(tmp_path):
    (tmp_path / "movies.csv").write_text('movieId,title,genres\n5,"Good, the Bad (1966)",Western\n7,Up,Drama\n')
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n9,7,4.0,20\n9,5,3.5,10\n")
    data = load_dataset(str(tmp_path))
    assert _seqs(data) == [[1, 2]]
    assert data.item_text[1] == "Good, the Bad (1966)"


def test_movielens_malformed_files(tmp_path):
    (tmp_path / "movies.csv").write_text("movieId,title,genres\n5,Up,Drama\n")
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,5,4,10\n1,5,4,soon\n")
    with pytest.raises(DatasetError, match=r"ratings\.csv:3:.*timestamp"):
        load_dataset(str(tmp_path))
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,5,4,10\n1,6,4,11\n")
    with pytest.raises(DatasetError, match=r"ratings\.csv:3:.*movieId 6"):
        load_dataset(str(tmp_path))
    (tmp_path / "movies.csv").unlink()
    with pytest.raises(DatasetError, match=r"movies"):
        load_dataset(str(tmp_path), fmt="movielens")


# ---------------------------------------------------------------- synthetic

def test_synthetic_is_deterministic_by_seed():
    a, b, c = generate(num_users=80, num_items=60, seed=5), generate(num_users=80, num_items=60, seed=5), \
        generate(num_users=80, num_items=60, seed=6)
    assert _seqs(a) == _seqs(b) and a.item_attributes == b.item_attributes and a.item_text == b.item_text
    assert a.attribute_names == b.attribute_names and a.fingerprint() == b.fingerprint()
    assert _seqs(a) != _seqs(c) and a.fingerprint() != c.fingerprint()
    assert len(a.sequences) == 80 and a.num_items == 60
    assert all(len(s) >= 5 and 1 <= s.min() and s.max() <= 60 for s in a.sequences)
    assert all(len(attrs) == 3 for attrs in a.item_attributes[1:])
    via_dispatch = load_dataset("synthetic", num_users=80, num_items=60, seed=5)
    assert _seqs(via_dispatch) == _seqs(a)


def test_interaction_data_rejects_inconsistent_tables():
    with pytest.raises(DatasetError, match="num_items"):
        generate(num_users=5, num_items=10).__class__(
            name="x", sequences=[np.array([1])], num_items=3, item_attributes=[[]] * 2, attribute_names=[""],
            item_text=[""] * 4, user_keys=["0"])
