"""How a request scores an item, and which items a request must never be shown: one place for
training (training/loss.py), offline evaluation (evaluation/evaluate.py), the exported graphs
(serving/export.py, serving/context_export.py) and new-item export (serving/new_items.py).

score(item) = <context, item> (or cosine), divided by the temperature (`vector_scores`)
            + the additive score terms the model holds (`ScoreTerm`, built by `build_terms`):
  lexical          scale * BM25(query, item) on search rows (model.lexical, model/lexical.py);
  text_neighbours  w_task * text cosine of the anchor's K nearest items on similar-item and
                   pre-query rows (model.text_neighbours, model/text_neighbours.py);
  fresh            fresh_boost on every item with at most fresh_max_count training interactions,
                   items added at export included (model.fresh_boost, inference only); with
                   fresh_neighbours M, only on the M such items nearest the row's anchor by text.
A term reads the request as the model reads it (`RequestView`); it scores candidate ids [B, C] or
the whole id space [B, num_items + 2], the training loss's output positions (`per_position`), has
an export form (no sparse tensors), extends to items added at export (`extend`) and says whether a
two-stage index, which retrieves by the context vector alone, can serve it (`two_stage`). An
`inference_only` term calibrates what is shown and is left out of the training loss. A new term is a
ScoreTerm subclass registered in TERMS.

Items a request must not be shown (`hidden_ids`): search and pre-query rows never return an item of
the history they carry, similar-item rows never the source item, and no item task returns an item of
the request's `exclude` list; suggest rows (query ids) filter nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from unirank.model.lexical import LexicalMatch
from unirank.model.request import Task
from unirank.model.text_neighbours import TextNeighbours, neighbour_table


def vector_scores(context: torch.Tensor, items: torch.Tensor, similarity: str, temperature: float) -> torch.Tensor:
    """context [..., d] x items [..., N, d] (or [N, d]) -> scores, with the configured metric."""
    if similarity == "cosine":
        context, items = F.normalize(context, dim=-1), F.normalize(items, dim=-1)
    if items.dim() == 2:
        scores = context @ items.T
    else:
        scores = torch.einsum("...d,...nd->...n", context, items)
    return scores if temperature == 1.0 else scores / temperature


@dataclass
class RequestView:
    """A request batch as the model reads it: the newest max_history items, left-aligned, padding
    zeroed (lengths 0 on similar-item rows), the query cut to max_query_len."""

    task: torch.Tensor  # [B]
    history: torch.Tensor  # [B, L]
    history_lengths: torch.Tensor  # [B]
    query: torch.Tensor  # [B, Q]
    query_lengths: torch.Tensor  # [B]
    source_item: torch.Tensor  # [B]


@dataclass
class AddedItems:
    """Items appended to an exported catalogue (ids num_items + 1 ..): what a term may need of them."""

    titles: list[str]
    attributes: list[list[str]]  # attribute names per item
    tokenizer: object  # the model's tokenizer
    text: torch.Tensor | None = None  # [M, text_dim] their text-encoder vectors (terms with needs_text)
    catalogue_text: torch.Tensor | None = None  # [num_items + 2, text_dim] the trained catalogue's


class ScoreTerm(nn.Module):
    """One additive part of the score beside <context, item>."""

    two_stage = False  # True: a two-stage index (context vector alone) still serves the model
    needs_text = False  # extend() reads the added items' text vectors
    inference_only = False  # True: the training loss leaves it out (evaluation and serving add it)

    def scores(self, view: RequestView, candidates: torch.Tensor | None = None) -> torch.Tensor:
        """[B, C] for candidate ids [B, C] (ids outside the catalogue score 0), or [B, num_items + 2]."""
        raise NotImplementedError

    def per_position(self, view: RequestView, keep: torch.Tensor,
                     row_of: torch.Tensor) -> Callable[[slice], torch.Tensor]:
        """For the training loss: the kept output positions (`keep` [B, P], positions after the TASK
        token; `row_of` [N] each kept position's row) as a function of a slice of them -> [rows,
        num_items + 2]. By default a position scores as its request row."""
        full = self.scores(view)
        return lambda rows: full[row_of[rows]]

    def export_form(self) -> None:
        """Switch to a form the ONNX exporter can trace (same numbers)."""

    def extend(self, added: AddedItems) -> None:
        """Append the added items (ids num_items + 1 ..; the OOV row moves last)."""
        raise NotImplementedError(f"{type(self).__name__} cannot score items added at export")


class LexicalTerm(LexicalMatch, ScoreTerm):
    """scale * BM25 of the query against the items' lexical field, on search rows only."""

    def __init__(self, cfg, lexical_rows: list[list[int]] | None = None, **_):
        super().__init__(cfg.num_items, cfg.num_words, max(cfg.lexical_width, 1), lexical_rows)
        self.field = cfg.lexical

    def scores(self, view: RequestView, candidates: torch.Tensor | None = None) -> torch.Tensor:
        """BM25 of the search rows only (gathered, scored, added back into zeros): other rows cost
        nothing, where scoring every row x the catalogue and masking paid for all of them."""
        rows = torch.nonzero(view.task == Task.SEARCH).squeeze(1)
        lexical = self(view.query[rows], view.query_lengths[rows], None if candidates is None else candidates[rows])
        return lexical.new_zeros(view.task.shape[0], lexical.shape[1]).index_add(0, rows, lexical)

    def extend(self, added: AddedItems) -> None:
        names = [" ".join(a) for a in added.attributes]
        texts = names if self.field == "names" else [f"{t} {n}".strip() for t, n in zip(added.titles, names)]
        super().extend([added.tokenizer.encode(t) for t in texts])


def position_anchors(view: RequestView) -> torch.Tensor:
    """[B, 1 + L] the anchor of each output position after the TASK token: the similar-item source at
    the CONTEXT position, the history item just read at a pre-query history position; 0 (none) elsewhere."""
    history = view.history
    valid = torch.arange(history.shape[1], device=history.device).unsqueeze(0) < view.history_lengths.unsqueeze(1)
    prequery = (view.task == Task.PREQUERY).unsqueeze(1)
    items = torch.where(valid & prequery, history, torch.zeros_like(history))
    source = torch.where(view.task == Task.SIMILAR, view.source_item, torch.zeros_like(view.source_item))
    return torch.cat([source.unsqueeze(1), items], dim=1)


def row_anchors(view: RequestView) -> torch.Tensor:
    """[B] each row's anchor: the similar-item source, the newest history item of a pre-query row, 0
    (none) on search and suggest rows."""
    return position_anchors(view).gather(1, view.history_lengths.unsqueeze(1)).squeeze(1)


class NeighbourTerm(TextNeighbours, ScoreTerm):
    """w_task * text cosine of the anchor's K nearest items: the anchor is the similar-item source,
    or the newest history item the model reads for pre-query."""

    needs_text = True

    def __init__(self, cfg, item_text: torch.Tensor | None = None, **_):
        super().__init__(cfg.num_items, cfg.text_neighbours, item_text)

    def scores(self, view: RequestView, candidates: torch.Tensor | None = None) -> torch.Tensor:
        return self(row_anchors(view), view.task, candidates)

    def per_position(self, view, keep, row_of):
        anchors = position_anchors(view)
        anchors = F.pad(anchors, (0, max(0, keep.shape[1] - anchors.shape[1])))[:, : keep.shape[1]][keep]
        return lambda rows: self(anchors[rows], view.task[row_of[rows]])

    def extend(self, added: AddedItems) -> None:
        catalogue, n = added.catalogue_text, self.num_items
        self.rebuild(torch.cat([catalogue[: n + 1], added.text.to(catalogue.dtype), catalogue[n + 1:]]))


class FreshTerm(ScoreTerm):
    """fresh_boost on the fresh items, those whose training count is <= fresh_max_count: items the
    model has little or no evidence for (new items, cold items) get a fair chance against the learned
    popularity of the warm ones. Inference only; the counts come from the catalogue (None: unknown, no
    item is fresh) and items added at export count 0.

    fresh_neighbours = 0: every fresh item on every row. It depends on the item alone, so a two-stage
    index serves it as one more column of the item vectors (serving/item_index.py).
    fresh_neighbours = M > 0: the candidate union. Only the M fresh items whose text is nearest the
    row's anchor (`row_anchors`: the similar-item source, the newest pre-query history item) get the
    boost, so the model's own ranking meets the anchor's content-nearest fresh items in one score and a
    fresh item unrelated to the context is not pushed into it; search rows get none (the lexical match
    places fresh items there). The table [num_items + 2, M] is built from the items' text vectors and
    rebuilt over the catalogue when items are added at export."""

    inference_only = True

    def __init__(self, cfg, item_counts: torch.Tensor | None = None, item_text: torch.Tensor | None = None, **_):
        super().__init__()
        self.boost, self.max_count = float(cfg.fresh_boost), int(cfg.fresh_max_count)
        self.neighbours = int(cfg.fresh_neighbours)
        self.two_stage = self.neighbours == 0  # the union depends on the request
        self.needs_text = self.neighbours > 0
        rows = cfg.num_items + 2
        counts = torch.full((rows,), -1, dtype=torch.int64) if item_counts is None else item_counts.to(torch.int64)
        if counts.shape != (rows,):
            raise ValueError(f"item_counts must be [{rows}] (ids 0..num_items + 1), got {list(counts.shape)}")
        self.register_buffer("counts", counts.clone(), persistent=False)  # -1: unknown
        self.register_buffer("bonus", self._bonus(self.counts), persistent=False)
        if self.neighbours:
            if item_text is None:
                raise ValueError("model.fresh_neighbours needs the items' text vectors (model.text_features=true)")
            if item_text.shape[0] != rows:
                raise ValueError(f"item_text must have {rows} rows, got {item_text.shape[0]}")
            self.register_buffer("nearest", self._nearest(item_text), persistent=False)

    def _bonus(self, counts: torch.Tensor) -> torch.Tensor:
        """[num_items + 2] the boost at fresh catalogue ids, 0 elsewhere (padding, OOV, unknown counts)."""
        ids = torch.arange(counts.shape[0], device=counts.device)
        fresh = (counts >= 0) & (counts <= self.max_count) & (ids > 0) & (ids < counts.shape[0] - 1)
        return fresh.to(torch.float32) * self.boost

    def _nearest(self, text: torch.Tensor) -> torch.Tensor:
        """[num_items + 2, M] each anchor's M text-nearest fresh items (0: empty slot)."""
        ids, _ = neighbour_table(text.cpu(), self.neighbours, allowed=self.bonus.cpu() != 0)
        return ids.to(self.counts.device)

    def scores(self, view: RequestView, candidates: torch.Tensor | None = None) -> torch.Tensor:
        if self.neighbours:
            return self._union_scores(view, candidates)
        if candidates is None:
            return self.bonus.unsqueeze(0).expand(view.task.shape[0], -1)
        last = self.bonus.shape[0] - 1
        inside = (candidates >= 0) & (candidates <= last)
        zero = torch.zeros_like(candidates, dtype=self.bonus.dtype)
        return torch.where(inside, self.bonus[candidates.clamp(0, last)], zero)

    def _union_scores(self, view: RequestView, candidates: torch.Tensor | None) -> torch.Tensor:
        rows = self.nearest.shape[0]
        anchor = row_anchors(view)
        anchor = torch.where((anchor > 0) & (anchor < rows - 1), anchor, torch.zeros_like(anchor))
        ids = self.nearest[anchor]  # [B, M]; row 0 (no anchor) is empty
        boost = self.bonus[ids]  # [B, M]; an empty slot (id 0) carries bonus[0] = 0
        if candidates is not None:
            hit = candidates.unsqueeze(2) == ids.unsqueeze(1)
            return (hit.to(boost.dtype) * boost.unsqueeze(1)).sum(-1)
        out = torch.zeros(anchor.shape[0], rows, device=boost.device, dtype=boost.dtype)
        return out.scatter(1, ids, boost)  # ids distinct per row; empty slots (id 0) carry 0

    def extend(self, added: AddedItems) -> None:
        counts, n = self.counts, self.counts.shape[0] - 2
        new = torch.zeros(len(added.titles), dtype=counts.dtype, device=counts.device)
        self.counts = torch.cat([counts[: n + 1], new, counts[n + 1:]])
        self.bonus = self._bonus(self.counts)
        if self.neighbours:
            catalogue = added.catalogue_text
            self.nearest = self._nearest(torch.cat([catalogue[: n + 1], added.text.to(catalogue.dtype),
                                                    catalogue[n + 1:]]))


# name -> (term class, whether a model config switches it on); the order is the order of the sum
TERMS: dict[str, tuple[type[ScoreTerm], Callable]] = {
    "lexical": (LexicalTerm, lambda cfg: cfg.lexical != "none"),
    "text_neighbours": (NeighbourTerm, lambda cfg: bool(cfg.text_neighbours)),
    "fresh": (FreshTerm, lambda cfg: cfg.fresh_boost != 0.0),
}


def build_terms(cfg, **features) -> nn.ModuleDict:
    """The terms `cfg` (a RankerConfig) switches on; `features` (lexical_rows, item_text,
    item_counts): the data they are built from (None: placeholders filled by load_state_dict)."""
    return nn.ModuleDict({name: cls(cfg, **features) for name, (cls, used) in TERMS.items() if used(cfg)})


def term_scores(terms: nn.ModuleDict, view: RequestView, candidates: torch.Tensor | None = None) -> torch.Tensor | None:
    """The sum of the terms' scores ([B, C] or [B, num_items + 2]); None when there are none."""
    total = None
    for term in terms.values():
        part = term.scores(view, candidates)
        total = part if total is None else total + part
    return total


def position_term_scores(terms: nn.ModuleDict, view: RequestView,
                         keep: torch.Tensor) -> Callable[[slice], torch.Tensor] | None:
    """The sum of the terms the training loss reads (inference-only terms left out) at the kept
    output positions, as a function of a slice of them -> [rows, num_items + 2]; None when there are none."""
    trained = [term for term in terms.values() if not term.inference_only]
    if not trained:
        return None
    row_of = torch.arange(keep.shape[0], device=keep.device).unsqueeze(1).expand_as(keep)[keep]
    parts = [term.per_position(view, keep, row_of) for term in trained]

    def total(rows: slice) -> torch.Tensor:
        out = parts[0](rows)
        for part in parts[1:]:
            out = out + part(rows)
        return out

    return total


# ---- items a request must not be shown ----

def hidden_ids(task: torch.Tensor, history: torch.Tensor, history_lengths: torch.Tensor, source_item: torch.Tensor,
               exclude: torch.Tensor | None = None, exclude_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """[..., L + 1 (+ X)] ids that must not be shown, 0 elsewhere: the valid history (search,
    pre-query), the source item (similar-item), and the valid `exclude` ids (every item task). Any
    leading shape: task, history_lengths, source_item, exclude_lengths [...]; history [..., L];
    exclude [..., X]."""
    positions = torch.arange(history.shape[-1], device=history.device)
    personalized = (task != int(Task.SIMILAR)).unsqueeze(-1)
    in_history = positions < history_lengths.unsqueeze(-1)
    parts = [torch.where(in_history & personalized, history, torch.zeros_like(history))]
    source = source_item.unsqueeze(-1)
    parts.append(torch.where(~personalized, source, torch.zeros_like(source)))
    if exclude is not None:
        valid = torch.arange(exclude.shape[-1], device=exclude.device) < exclude_lengths.unsqueeze(-1)
        parts.append(torch.where(valid, exclude, torch.zeros_like(exclude)))
    return torch.cat(parts, dim=-1)


def hidden_catalogue(hidden: torch.Tensor, num_items: int) -> torch.Tensor:
    """[N, num_items + 1] True at the catalogue ids (column = id, 1..num_items) of each row of
    `hidden` [N, K]; padding and ids outside the catalogue mark nothing. A per-row table keeps this
    O(N * num_items) whatever K (and exports to ONNX: no bool scatter)."""
    known = torch.where((hidden >= 1) & (hidden <= num_items), hidden, torch.zeros_like(hidden))
    table = torch.zeros(hidden.shape[0], num_items + 1, device=hidden.device)
    table = table.scatter(1, known, torch.ones_like(known, dtype=table.dtype))
    # Column 0 collected padding and unknown ids: it never marks anything.
    return (table * (torch.arange(num_items + 1, device=hidden.device) > 0).to(table.dtype)) > 0


def hidden_candidates(candidates: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """[B, C] True for candidates among the row's hidden ids [B, K] (0 = padding, marks nothing),
    compared id by id so that ids unknown to the model are filtered too.

    Two sorts of each row's hidden and candidate ids together instead of a [B, C, K] comparison:
    O(B (C + K) log(C + K)) time and O(B (C + K)) memory, so a request with 10,000 candidates and
    1,000 excluded ids costs what its inputs cost. Keys are 2 * id for a hidden id and 2 * id + 1
    (2 * id - 1 in the second sort) for a candidate; the running count of hidden ids then reads, at
    a candidate, how many hidden ids are <= id (first sort) and < id (second). Ids are clamped to
    +-2^61 first so the keys cannot overflow: two distinct ids beyond that (outside any catalogue)
    compare equal, which can only hide more."""
    bound = 2 ** 61
    hid = hidden.clamp(-bound, bound)
    cand = candidates.clamp(-bound, bound)
    counts = (hidden != 0).long()
    flags = torch.cat([counts, torch.zeros_like(cand)], dim=1)

    def hidden_up_to(candidate_offset: int) -> torch.Tensor:
        keys = torch.cat([2 * hid, 2 * cand + candidate_offset], dim=1)
        _, order = keys.sort(dim=1)
        running = flags.gather(1, order).cumsum(dim=1)
        return torch.zeros_like(running).scatter(1, order, running)[:, hid.shape[1]:]

    return (hidden_up_to(1) - hidden_up_to(-1)) > 0
