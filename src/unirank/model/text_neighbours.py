"""Text neighbours in the similar-item and pre-query scores: score(item) += w_task * cos(text(anchor),
text(item)) for the K items whose text is nearest the anchor's (0 for every other item).

The anchor is the similar-item source, or the newest history item for pre-query; the cosine is
over the frozen text-encoder vectors of the items' content (the same vectors as the item tower's
text features), so it needs no id row: an item that never appeared in training (cold, new) gets
it exactly as a trained one does. `w_task` (one per task) is learned by the softmax loss with the
rest of the model; search and suggest rows get nothing (search has the lexical match).

The table is [num_items + 2, K] neighbour ids (0 = empty slot) and cosines, rows 0 and
num_items + 1 (padding, OOV) empty; it is built once from the text vectors and rebuilt over the
extended catalogue when new items are exported, so they also appear in the old items' lists.
"""
from __future__ import annotations

import torch
from torch import nn

from unirank.model.request import Task

TASK_SLOTS = {int(Task.SIMILAR): 0, int(Task.PREQUERY): 1}


def neighbour_table(text: torch.Tensor, k: int, chunk: int = 2048,
                    allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """([rows, k] ids, [rows, k] cosines) of each item's k nearest items by text (itself excluded);
    `text` [rows = num_items + 2, dim], rows 0 and rows - 1 are padding / OOV and never neighbours.
    A zero text vector (no text) has no neighbours and is nobody's neighbour. `allowed` [rows] bool:
    only these items may be neighbours (None: every item); empty slots are id 0, cosine 0."""
    rows = text.shape[0]
    n = rows - 2
    k = min(k, max(n - 1, 0))
    vectors = torch.nn.functional.normalize(text[1: n + 1].float(), dim=1)
    has_text = vectors.norm(dim=1) > 0
    targets = has_text if allowed is None else has_text & allowed[1: n + 1].to(has_text.device)
    ids = torch.zeros(rows, k, dtype=torch.int64)
    sims = torch.zeros(rows, k)
    if k == 0:
        return ids, sims
    for start in range(0, n, chunk):
        block = vectors[start: start + chunk] @ vectors.T  # [c, n]
        block[torch.arange(len(block)), torch.arange(start, start + len(block))] = -torch.inf  # not itself
        block[:, ~targets] = -torch.inf
        top, index = block.topk(k, dim=1)
        valid = torch.isfinite(top) & has_text[start: start + chunk].unsqueeze(1)
        ids[1 + start: 1 + start + len(block)] = torch.where(valid, index + 1, torch.zeros_like(index))
        sims[1 + start: 1 + start + len(block)] = torch.where(valid, top, torch.zeros_like(top))
    return ids, sims


class TextNeighbours(nn.Module):
    def __init__(self, num_items: int, k: int, text: torch.Tensor | None = None):
        """`text` [num_items + 2, dim]: the items' text vectors; None leaves zero placeholders of the
        configured shape, to be filled by load_state_dict."""
        super().__init__()
        self.num_items = num_items
        if text is not None:
            if text.shape[0] != num_items + 2:
                raise ValueError(f"text neighbours: expected {num_items + 2} text rows, got {text.shape[0]}")
            ids, sims = neighbour_table(text, k)
        else:
            k = min(k, max(num_items - 1, 0))
            ids, sims = torch.zeros(num_items + 2, k, dtype=torch.int64), torch.zeros(num_items + 2, k)
        self.register_buffer("ids", ids)
        self.register_buffer("sims", sims)
        self.weight = nn.Parameter(torch.ones(len(TASK_SLOTS)))

    def task_weight(self, task: torch.Tensor) -> torch.Tensor:
        """[B] the learned weight of each row's task (0 for search and suggest)."""
        slot = torch.zeros_like(task)
        for t, s in TASK_SLOTS.items():
            slot = torch.where(task == t, torch.full_like(task, s), slot)
        used = (task == int(Task.SIMILAR)) | (task == int(Task.PREQUERY))
        return self.weight[slot] * used.to(self.weight.dtype)

    def forward(self, anchor: torch.Tensor, task: torch.Tensor, candidates: torch.Tensor | None = None) -> torch.Tensor:
        """[B, C] for candidate ids [B, C], or [B, num_items + 2]; `anchor` [B] item ids (ids outside
        1..num_items have no neighbours)."""
        known = (anchor >= 1) & (anchor <= self.num_items)
        anchor = torch.where(known, anchor, torch.zeros_like(anchor))
        ids = self.ids[anchor]  # [B, K]
        sims = self.sims[anchor] * self.task_weight(task).unsqueeze(1)
        if candidates is not None:
            hit = (candidates.unsqueeze(2) == ids.unsqueeze(1)) & (ids.unsqueeze(1) > 0)
            return (hit.to(sims.dtype) * sims.unsqueeze(1)).sum(-1)
        out = torch.zeros(anchor.shape[0], self.ids.shape[0], device=sims.device, dtype=sims.dtype)
        out = out.scatter(1, ids, sims)  # ids are distinct per row; empty slots (id 0) carry 0
        keep = torch.ones(self.ids.shape[0], device=sims.device, dtype=sims.dtype)
        keep[0] = 0.0
        return out * keep

    def rebuild(self, text: torch.Tensor) -> None:
        """The table over a changed catalogue (new items appended: text [num_items' + 2, dim])."""
        ids, sims = neighbour_table(text, self.ids.shape[1])
        self.ids, self.sims = ids.to(self.ids.device), sims.to(self.sims.device)
        self.num_items = text.shape[0] - 2
