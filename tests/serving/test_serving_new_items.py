"""New items without retraining: metadata checks (each bad case names its line and leaves no export
behind), the content path of an item with no id row, and ONNX parity of an export with appended rows
(exact graph and two-stage index)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from unirank.cli.main import main as cli
from unirank.serving.onnx_graph import TopKRanker, onnx_session, parity_max_abs_diff
from unirank.serving.export import export_model
from unirank.model.item_tower import ItemTower
from unirank.serving.new_items import NewItemsError, _nearest_codes, new_item_vectors, read_new_items
from unirank.serving.synthetic_requests import random_batches
from unirank.training.checkpoint import load_checkpoint, save_checkpoint
from unirank.config import Config
from unirank.data.prepare import build_catalogue, build_ranker, prepare

OVERRIDES = {"data": {"synthetic": {"num_users": 120, "num_items": 60}},
             "model": {"dim": 16, "num_layers": 1, "num_heads": 2, "max_history": 12, "id_dropout": 0.5}}


def untrained_checkpoint(path, model: dict):
    """An untrained model of the small synthetic dataset with `model` settings on top of OVERRIDES,
    saved with its run config at `path`; returns its Prepared data."""
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(OVERRIDES), OmegaConf.create({"model": model}))
    prep = prepare(OmegaConf.to_object(cfg))
    torch.manual_seed(0)
    run = OmegaConf.to_object(cfg)
    save_checkpoint(path, build_ranker(run, prep).eval(), build_catalogue(run, prep), OmegaConf.to_yaml(cfg), metadata={})
    return prep


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained model of the small synthetic dataset, with its run config (export finds the data)."""
    path = tmp_path_factory.mktemp("new_items") / "ckpt.pt"
    return path, untrained_checkpoint(path, {}).data


def write(path, lines: list) -> str:
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return str(path)


GOOD = {"id": "new-1", "title": "kaqu lomi fresh", "attributes": ["Kaqu"]}
BAD_JSONL = {
    "missing id": ([GOOD, {"title": "x"}], ":2: missing id"),
    "missing title": ([{"id": "a", "attributes": []}], ":1: item 'a' has no title"),
    "duplicate id": ([GOOD, GOOD], ":2: id 'new-1' given twice (first on line 1)"),
    "trained id": ([GOOD, {"id": "item-3", "title": "t"}], ":2: id 'item-3' is already in the trained catalogue"),
    "attributes type": ([{"id": "a", "title": "t", "attributes": [1, 2]}], ":1: attributes must be a list"),
    "not json": ([GOOD, "{oops"], ":2: not a JSON object"),
    "empty": ([], ": no items"),
    "list id": ([{"id": ["a"], "title": "t"}], ":1: id must be a string or a number, got list"),
    "object title": ([{"id": "a", "title": {"en": "t"}}], ":1: title must be a string or a number, got dict"),
}


@pytest.mark.parametrize("case", BAD_JSONL)
def test_bad_jsonl_names_the_line_and_leaves_no_export(case, checkpoint, tmp_path, capsys):
    lines, message = BAD_JSONL[case]
    path = write(tmp_path / "new.jsonl", lines)
    assert cli(["export", "--checkpoint", str(checkpoint[0]), "--out", str(tmp_path / "out"), "--new-items", path]) == 2
    assert f"{path}{message}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["new.jsonl"]


BAD_CSV = {
    "missing id": ("id,title,attributes\nn1,kaqu,Kaqu\n,lomi,\n", ":3: missing id"),
    "missing title": ("id,title,attributes\nn1,,Kaqu\n", ":2: item 'n1' has no title"),
    "duplicate id": ("id,title,attributes\nn1,a,\nn1,b,\n", ":3: id 'n1' given twice (first on line 2)"),
    "trained id": ("id,title,attributes\nitem-7,a,\n", ":2: id 'item-7' is already in the trained catalogue"),
    "no header columns": ("name,attributes\nn1,a\n", ":1: the CSV header needs the columns"),
    "empty": ("", ": no items"),
}


@pytest.mark.parametrize("case", BAD_CSV)
def test_bad_csv_names_the_line(case, checkpoint, tmp_path):
    text, message = BAD_CSV[case]
    path = tmp_path / "new.csv"
    path.write_text(text)
    keys = set(checkpoint[1].item_keys[1:])
    with pytest.raises(NewItemsError) as err:
        read_new_items(path, keys)
    assert f"{path}{message}" in str(err.value)


def test_unreadable_metadata_is_an_error_naming_the_file_and_line(checkpoint, tmp_path, capsys):
    with pytest.raises(NewItemsError, match="not found"):
        read_new_items(tmp_path)  # a directory
    path = tmp_path / "new.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe\n")
    with pytest.raises(NewItemsError, match=rf"{path}:2: not UTF-8"):
        read_new_items(path)
    previous = tmp_path / "out"
    assert cli(["export", "--checkpoint", str(checkpoint[0]), "--out", str(previous), "--new-items",
                write(tmp_path / "ok.jsonl", [GOOD]), "--top-k", "10"]) == 0
    before = {p.name: p.stat().st_mtime_ns for p in previous.iterdir()}
    assert cli(["export", "--checkpoint", str(checkpoint[0]), "--out", str(previous), "--new-items", str(path)]) == 2
    assert {p.name: p.stat().st_mtime_ns for p in previous.iterdir()} == before  # the previous export is untouched


def test_a_numeric_id_zero_is_an_id(tmp_path):
    items = read_new_items(write(tmp_path / "n.jsonl", [{"id": 0, "title": "t"}, {"id": 17, "title": 5}]))
    assert [(it.key, it.title) for it in items] == [("0", "t"), ("17", "5")]


def test_csv_and_jsonl_read_the_same_items(tmp_path):
    csv = tmp_path / "n.csv"
    csv.write_text('id,title,attributes\nn1,"kaqu, lomi",Kaqu| Lo mi \n')
    jsonl = write(tmp_path / "n.jsonl", [{"id": "n1", "title": "kaqu, lomi", "attributes": ["Kaqu", " Lo mi "]}])
    (from_csv,), (from_jsonl,) = read_new_items(csv), read_new_items(jsonl)
    assert (from_csv.line, from_jsonl.line) == (2, 1)  # the CSV header is line 1
    assert (from_csv.key, from_csv.title, from_csv.attributes) == (from_jsonl.key, from_jsonl.title, ["Kaqu", "Lo mi"])


def test_content_path_scores_depend_on_the_text_alone(checkpoint, tmp_path):
    path, data = checkpoint
    loaded = load_checkpoint(path)
    t, s, b = data.item_attributes[5]
    names = data.attribute_names
    items = read_new_items(write(tmp_path / "n.jsonl", [
        {"id": "a", "title": data.item_text[5], "attributes": [names[t], names[s], names[b]]},
        {"id": "b", "title": data.item_text[5], "attributes": [names[t], names[s], names[b]]},
        {"id": "c", "title": data.item_text[9], "attributes": [names[a] for a in data.item_attributes[9]]}]))
    vectors, unknown = new_item_vectors(loaded.ranker, loaded.catalogue, items)
    assert not unknown and torch.isfinite(vectors).all()
    context = torch.randn(4, vectors.shape[1], generator=torch.Generator().manual_seed(0))
    scores = loaded.ranker.similarity(context, vectors)
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores[:, 0], scores[:, 1])  # same text -> same score
    assert (scores[:, 0] - scores[:, 2]).abs().min() > 1e-4  # different text -> different score
    # no id row: the trained item with the same content differs from it by its id vector
    trained = loaded.ranker.item_tower(torch.tensor([5]))[0][0]
    assert (trained - vectors[0]).abs().max() > 1e-4


@pytest.mark.parametrize("index", [None, "flat"])
def test_export_with_new_items_matches_pytorch(index, checkpoint, tmp_path):
    path, data = checkpoint
    new = write(tmp_path / "n.jsonl", [GOOD, {"id": "new-2", "title": data.item_text[3], "attributes": ["Unheard"]}])
    args = ["export", "--checkpoint", str(path), "--out", str(tmp_path / "out"), "--new-items", new, "--top-k", "10"]
    assert cli(args + (["--index", index] if index else [])) == 0
    listed = json.loads((tmp_path / "out" / "new_items.json").read_text())
    n = data.num_items
    assert [(i["item_id"], i["external_id"]) for i in listed["items"]] == [(n + 1, "new-1"), (n + 2, "new-2")]
    assert listed["unknown_attributes"] == {"Kaqu": 1, "Unheard": 1}  # reported, not fatal
    assert (tmp_path / "out" / "repository" / "python" / "unirank" / "new_items.json").exists()
    # the PyTorch reference: the trained model's plain form with the two content rows appended
    from unirank.serving.new_items import add_new_items

    loaded = load_checkpoint(path)
    plain = loaded.ranker.to_plain().eval()
    add_new_items(loaded, plain, new)
    assert plain.num_items == n + 2
    report_meta = json.loads((tmp_path / "out" / "export.json").read_text())
    assert report_meta["num_items"] == n + 2
    from unirank.serving.metadata import ExportMetadata

    batches = random_batches(ExportMetadata.load(tmp_path / "out" / "export.json"), loaded.tokenizer.vocab_size,
                             requests=64, seed=1)
    assert any(((b["history"] > n) | (b["source_item"][:, None] > n)).any() for b in batches)
    diff = parity_max_abs_diff(TopKRanker(plain, 10).eval(), onnx_session(tmp_path / "out" / "model.onnx"), batches)
    assert diff <= 1e-4
    if index:
        from unirank.serving.item_index import ItemIndex

        assert len(ItemIndex.load(tmp_path / "out")) == n + 2  # the index holds the new items too


def test_new_items_join_the_lexical_match_of_a_lexical_model(tmp_path):
    """model.lexical: a new item with the attribute names of trained item 7 gets item 7's BM25 weights
    (the training catalogue's idf and length norm) for a search naming them, in PyTorch and ONNX."""
    from unirank.model.request import Task
    from unirank.serving.new_items import add_new_items

    prep = untrained_checkpoint(tmp_path / "ckpt.pt", {"lexical": "names"})
    data, source = prep.data, 7
    names = [data.attribute_names[a] for a in data.item_attributes[source]]
    new = write(tmp_path / "n.jsonl", [{"id": "new-1", "title": "zzqx", "attributes": names}])
    report = export_model(tmp_path / "ckpt.pt", tmp_path / "out", top_k=10, parity_requests=64, new_items=new)
    assert report.max_abs_diff <= 1e-4 and report.metadata.num_items == data.num_items + 1
    loaded = load_checkpoint(tmp_path / "ckpt.pt")
    plain = loaded.ranker.to_plain().eval()
    add_new_items(loaded, plain, new)
    query = torch.tensor([loaded.tokenizer.encode(" ".join(names), max_length=plain.config.max_query_len)])
    with torch.no_grad():
        empty = torch.zeros(1, 1, dtype=torch.long)
        view = plain.view(torch.tensor([int(Task.SEARCH)]), empty, empty[:, 0], query, torch.tensor([query.shape[1]]),
                          empty[:, 0])
        lexical = plain.terms["lexical"].scores(view)
    new_id = data.num_items + 1
    assert lexical[0, new_id] > 0
    torch.testing.assert_close(lexical[0, new_id], lexical[0, source])


def test_new_items_join_the_text_neighbour_lists_of_the_trained_items(tmp_path):
    """model.text_neighbours: a new item with trained item 7's title and names is item 7's nearest
    text neighbour in the export (and 7 is its), so similar-item on 7 boosts it; ONNX parity holds."""
    from unirank.serving.new_items import add_new_items

    prep = untrained_checkpoint(tmp_path / "ckpt.pt", {"text_features": True, "text_neighbours": 10})
    data, source = prep.data, 7
    names = [data.attribute_names[a] for a in data.item_attributes[source]]
    new = write(tmp_path / "n.jsonl", [{"id": "new-1", "title": data.item_text[source], "attributes": names}])
    report = export_model(tmp_path / "ckpt.pt", tmp_path / "out", top_k=10, parity_requests=64, new_items=new)
    assert report.max_abs_diff <= 1e-4
    loaded = load_checkpoint(tmp_path / "ckpt.pt")
    plain = loaded.ranker.to_plain().eval()
    add_new_items(loaded, plain, new)
    new_id = data.num_items + 1
    table = plain.terms["text_neighbours"]
    assert table.ids.shape[0] == new_id + 2
    assert int(table.ids[source, 0]) == new_id and int(table.ids[new_id, 0]) == source
    assert float(table.sims[source, 0]) > 0.99


@pytest.mark.slow
def test_tritonserver_serves_a_new_item_for_its_search_query_and_a_related_item(tmp_path):
    """A small model trained with id dropout (about 50 s on 2 cores): a new item with the brand and
    sub-category of trained item 40 (a title word the vocabulary lacks) comes back over gRPC for a
    search naming its brand and sub-category and for similar-item on item 40."""
    from unirank.data.datasets.synthetic import generate
    from unirank.serving.client import RankerClient
    from unirank.serving.server import Server, free_port

    run = tmp_path / "run"
    assert cli(["train", "--config", "quickstart", "--quiet", "data.synthetic.num_users=300",
                "data.synthetic.num_items=150", "model.dim=32", "model.num_layers=1", "model.id_dropout=0.5",
                "train.max_epochs=20", "train.eval_every=20", "eval.num_bootstrap=0", f"train.out_dir={run}"]) == 0
    data, source = generate(num_users=300, num_items=150), 40
    topic, sub, brand = (data.attribute_names[a] for a in data.item_attributes[source])
    new = write(tmp_path / "n.jsonl", [{"id": "new-1", "title": f"{brand.lower()} {sub} zzqx",
                                        "attributes": [topic, sub, brand]}])
    assert cli(["export", "--checkpoint", str(run / "best.pt"), "--out", str(tmp_path / "out"), "--new-items", new,
                "--top-k", "50"]) == 0
    new_id = data.num_items + 1
    repository = tmp_path / "out" / "repository" / "python"
    with Server(repository, free_port(), free_port(), free_port(), startup_timeout_s=90) as server, \
            RankerClient.from_model_dir(server.grpc_url, repository / "unirank", timeout_s=10) as client:
        searched = client.search([], f"{brand.lower()} {sub}", k=50).item_ids.tolist()
        similar = client.similar(source, k=50).item_ids.tolist()
    ranks = {name: ids.index(new_id) + 1 if new_id in ids else None for name, ids in
             (("search", searched), ("similar", similar))}
    print(f"new item {new_id} of {new_id}: rank {ranks} (top-50 answers)")
    assert ranks["search"] is not None and ranks["search"] <= 10
    assert ranks["similar"] is not None and ranks["similar"] <= 10


def test_new_items_keep_the_query_catalogue_of_a_suggest_model(tmp_path):
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(OVERRIDES),
                                              OmegaConf.create({"train": {"tasks": ["search", "suggest"]}})))
    prep = prepare(cfg)
    catalogue = build_catalogue(cfg, prep)
    texts = catalogue.query_texts
    save_checkpoint(tmp_path / "ckpt.pt", build_ranker(cfg, prep).eval(), catalogue,
                    OmegaConf.to_yaml(OmegaConf.structured(cfg)), metadata={})
    report = export_model(tmp_path / "ckpt.pt", tmp_path / "out", top_k=10, parity_requests=64,
                          new_items=write(tmp_path / "n.jsonl", [GOOD]))
    assert report.max_abs_diff <= 1e-4 and report.metadata.num_items == prep.data.num_items + 1
    assert report.metadata.num_queries == len(texts) > 0
    assert json.loads((tmp_path / "out" / "queries.json").read_text()) == texts


def test_semantic_ids_of_a_new_item_are_its_nearest_trained_items_with_collision_code_0():
    text = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    codes = torch.tensor([[-1, -1, -1], [0, 1, 0], [1, 0, 1], [1, 1, 0], [-1, -1, -1]])
    tower = ItemTower(3, [[]] * 4, 1, [[]] * 4, 2, dim=4, semantic_id_sizes=[2, 2, 2], item_codes=codes,
                      text_dim=3, item_text=text)
    new = torch.tensor([[0.1, 0.9, 0.0], [0.0, 0.2, 2.0]])  # nearest: item 2, item 3 (cosine)
    assert _nearest_codes(tower, tower.item_text, new).tolist() == [[1, 0, 0], [1, 1, 0]]
    vectors = tower.content_vectors([[], []], [[], []], new, _nearest_codes(tower, tower.item_text, new))
    assert vectors.shape == (2, 4) and torch.isfinite(vectors).all() and not torch.equal(vectors[0], vectors[1])
