"""Knowledge distillation from trained rankers (train.distill_from): an ensemble of finished runs
teaches one ranker of the usual size, so what the ensemble ranks better reaches a model that
`unirank export` can serve. The teachers' target at each training position is the ensemble that
EnsembleScorer evaluates, the normalised geometric mean of their softmaxes over the same candidates
as the student's (excluded and masked items stay out), sharpened or softened by the temperature."""
from __future__ import annotations

from pathlib import Path

import torch

from unirank.model.ranker import UnifiedRanker
from unirank.model.request import RankRequest
from unirank.training.checkpoint import CheckpointError, load_checkpoint
from unirank.config import ConfigError


class Teachers:
    """Frozen rankers that score a training batch's positions over the whole catalogue."""

    def __init__(self, rankers: list[UnifiedRanker], weight: float, temperature: float):
        if not rankers:
            raise ValueError("distillation needs at least one teacher")
        self.rankers, self.weight, self.temperature = rankers, weight, temperature
        for ranker in rankers:
            ranker.eval()
            ranker.requires_grad_(False)
        self._items: torch.Tensor | None = None  # [C, sum of the teachers' widths]
        self._context: torch.Tensor | None = None  # [observed positions, same width]

    def to(self, device: torch.device | str) -> "Teachers":
        for ranker in self.rankers:
            ranker.to(device)
        self._items = None
        return self

    def _dot_space(self, ranker: UnifiedRanker, vectors: torch.Tensor, is_context: bool) -> torch.Tensor:
        """Vectors whose plain dot products are the ranker's similarity (its metric and temperature),
        divided by the number of teachers on the context side."""
        if ranker.config.similarity == "cosine":
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        return vectors / (ranker.config.temperature * len(self.rankers)) if is_context else vectors

    @torch.no_grad()
    def observe(self, req: RankRequest, keep: torch.Tensor) -> None:
        """Encode the batch with every teacher; `keep` [B, P] marks the positions that have a target
        (the student's rows, in the same order)."""
        if self._items is None:  # the teachers are frozen: their item vectors never change
            self._items = torch.cat([self._dot_space(r, r.all_item_embeddings()[1: r.num_items + 1], False)
                                     for r in self.rankers], dim=1)
        parts = []
        for ranker in self.rankers:
            hidden, _, _ = ranker.encode(req.task, req.history, req.history_lengths, req.query,
                                         req.query_lengths, req.source_item)
            parts.append(self._dot_space(ranker, hidden[:, 1: 1 + keep.shape[1]][keep], True))
        self._context = torch.cat(parts, dim=1)

    @torch.no_grad()
    def log_targets(self, rows: slice, invalid: torch.Tensor) -> torch.Tensor:
        """Log of the teachers' target distribution for the observed positions `rows` [R, C]: the
        mean of their log-softmaxes over the candidates (`invalid` [R, C]: True = not a candidate),
        divided by the temperature and normalised again. Each log-softmax is its logits less a
        per-row constant, which the final normalisation removes, so the mean of the logits is used:
        one matrix product over the teachers' concatenated vectors."""
        logits = (self._context[rows] @ self._items.T).masked_fill(invalid, -torch.inf)
        return torch.log_softmax(logits / self.temperature, dim=1)

    def loss(self, student_logits: torch.Tensor, rows: slice) -> torch.Tensor:
        """Per-row T^2 * cross-entropy of the student's softmax at temperature T against the
        teachers' target (the KL divergence up to a constant; T^2 keeps the gradient scale)."""
        invalid = ~torch.isfinite(student_logits)
        target = self.log_targets(rows, invalid).exp()
        scaled = student_logits / self.temperature
        picked = (target * scaled.masked_fill(invalid, 0.0)).sum(dim=1)
        return self.temperature ** 2 * (torch.logsumexp(scaled, dim=1) - picked)


def load_teachers(run_dirs: list[str], weight: float, temperature: float, *, fingerprint: str, num_items: int,
                  tokenizer_state: dict, max_history: int) -> Teachers:
    """The best.pt of each finished `unirank train` directory (or a checkpoint file), refused unless it
    was trained on the same data, scores the same catalogue, reads queries with the same tokenizer and
    sees at least the student's history (a shorter window would shift the positions)."""
    rankers = []
    for run in run_dirs:
        path = Path(run)
        if path.is_dir():
            path = path / "best.pt"
        if not path.is_file():
            raise ConfigError(f"train.distill_from: {run} is neither a checkpoint nor a run directory with best.pt")
        loaded = load_checkpoint(path)
        if loaded.metadata.get("fingerprint") != fingerprint:
            raise CheckpointError(f"{path}: the teacher was trained on other data (dataset fingerprint "
                                  f"{loaded.metadata.get('fingerprint')} != {fingerprint})")
        cfg = loaded.ranker.config
        if cfg.num_items != num_items:
            raise CheckpointError(f"{path}: the teacher scores {cfg.num_items} items, the student {num_items}")
        if loaded.tokenizer.to_dict() != tokenizer_state:
            raise CheckpointError(f"{path}: the teacher reads queries with another tokenizer "
                                  "(model.tokenizer must be as in the run that wrote it)")
        if cfg.max_history < max_history:
            raise CheckpointError(f"{path}: the teacher's model.max_history {cfg.max_history} is shorter than "
                                  f"the student's {max_history}")
        rankers.append(loaded.ranker)
    return Teachers(rankers, weight, temperature)
