"""The unified ranker (UniCoRn-style): one transformer serves search, similar-item and pre-query
(items), and, with a query catalogue, query suggestions.

Token sequence per request:  [TASK] [CONTEXT] [h_1 ... h_n]
  TASK     learned embedding of the surface (model.request.Task, QueryTask)
  CONTEXT  search: pooled query-token bag (+ projected text-encoder vector of the query);
           similar-item: the source item's vector;
           pre-query, suggest: a learned "no context" vector
  h_i      the user's history items through the item tower (empty for similar-item)
TASK and CONTEXT form a bidirectional prefix, the history is causal. The output at the last valid
position is the context vector; score(item) = <context, item tower(item)> (or cosine / temperature);
score(query) = <context, the query through the search query path> for suggest.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from unirank.config import INFERENCE_SETTINGS, ModelConfig
from unirank.kernels.attention import prefix_causal_attention
from unirank.kernels.dispatch import model_impl
from unirank.model.catalogue import Catalogue
from unirank.model.item_tower import ItemTower, PrecomputedItemTower
from unirank.model.request import TASK_NAMES, Task
from unirank.model.scoring import TERMS, RequestView, build_terms, position_term_scores, term_scores, vector_scores
from unirank.model.text_encoder import SentenceEncoder
from unirank.model.tokenizer import OOV_TOKEN_ID

NUM_PREFIX = 2  # TASK + CONTEXT
NUM_TASKS = len(Task)  # the item tasks: the task tokens of a model without a query catalogue
NUM_TASK_IDS = len(TASK_NAMES)  # every task id (per-task loss sums and counts)


@dataclass
class ItemBatch:
    """The item-tower input of one forward, built before the model runs (the training data path):
    the jagged features of the unique ids (a KeyedJaggedTensor when the tables are sharded) and where
    each id of the request (history, source items, then the extra items) sits among them."""

    features: object  # JaggedFeatures | torchrec KeyedJaggedTensor
    item_ids: torch.Tensor  # [U] unique ids
    inverse: torch.Tensor  # [B * L + B + E] index into item_ids
    num_queries: int

    def to(self, device: torch.device | str) -> "ItemBatch":
        return ItemBatch(self.features.to(device), self.item_ids.to(device), self.inverse.to(device), self.num_queries)


@dataclass(kw_only=True)
class RankerConfig(ModelConfig):
    """Hyperparameters + the sizes that come from the data."""

    num_items: int
    num_attributes: int
    num_words: int
    text_dim: int = 0  # width of the item text vectors (0 = no text features)
    semantic_id_sizes: list[int] = field(default_factory=list)  # rows per semantic-ID level (incl. collision level)
    num_queries: int = 0  # size of the suggest task's query catalogue (0 = no suggest task)
    lexical_width: int = 0  # distinct lexical tokens per item row of the BM25 table (model.lexical)

    def to_dict(self) -> dict:
        return asdict(self)


class SelfAttention(nn.Module):
    def __init__(self, cfg: RankerConfig):
        super().__init__()
        self.heads, self.dropout, self.impl = cfg.num_heads, cfg.dropout, cfg.attention_impl
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        y = prefix_causal_attention(q, k, v, lengths, torch.full_like(lengths, NUM_PREFIX), dropout_p=p,
                                    impl=model_impl(self.impl, x))
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate, self.up = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class CausalFilter(nn.Module):
    """Token mixing by a learned low-pass filter over the earlier positions, with its high-frequency
    rest rescaled: low_t = sum_{s <= t} g^(t - s) x_s / sum_{s <= t} g^(t - s) with a decay g in (0, 1)
    per channel, out = low + h * (x - low) with a learned h per channel (h = 1: the identity). BSARec
    (Shin et al. 2024) mixes self-attention with a filter that keeps the low frequencies of the whole
    sequence's Fourier transform; that filter reads later positions, which a model trained on every
    position's next item cannot, so the low pass here is a causal exponential average."""

    def __init__(self, cfg: RankerConfig):
        super().__init__()
        self.decay_logit = nn.Parameter(torch.zeros(cfg.dim))  # g = sigmoid: 0.5 at init
        self.high = nn.Parameter(torch.ones(cfg.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1], device=x.device)
        lag = positions.unsqueeze(1) - positions.unsqueeze(0)  # [T, T]: t - s
        decay = torch.sigmoid(self.decay_logit).view(-1, 1, 1)
        weights = decay ** lag.clamp(min=0).to(x.dtype) * (lag >= 0).to(x.dtype)  # [d, T, T], causal
        low = torch.einsum("dts,bsd->btd", weights / weights.sum(dim=2, keepdim=True), x)
        return low + self.high * (x - low)


class TaskHeads(nn.Module):
    """A residual SwiGLU head per task on the blocks' output: y = x + down_t(silu(gate_t x) * up_t x)
    for a row of task t (task-specific capacity beside the shared blocks, as task-specific experts in
    multi-task rankers). The down projections start at zero: at initialisation every task reads the
    shared output. The row's weights are gathered by its task id and applied as batched products, so
    the exported graph is the same computation."""

    def __init__(self, num_tasks: int, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Parameter(torch.randn(num_tasks, dim, hidden) / dim ** 0.5)
        self.up = nn.Parameter(torch.randn(num_tasks, dim, hidden) / dim ** 0.5)
        self.down = nn.Parameter(torch.zeros(num_tasks, hidden, dim))

    def forward(self, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """x [B, T, d], task [B] (ids < num_tasks) -> [B, T, d]."""
        inner = F.silu(torch.bmm(x, self.gate[task])) * torch.bmm(x, self.up[task])
        return x + torch.bmm(inner, self.down[task])


class Block(nn.Module):
    """Pre-LayerNorm transformer block. `block=ligr`: each residual branch is scaled by a sigmoid
    gate read from the residual stream, and the MLP is SwiGLU (LiGR, Borisyuk et al. 2025, as used
    by eSASRec)."""

    def __init__(self, cfg: RankerConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.attn = SelfAttention(cfg)
        self.filter_mix = cfg.filter_mix
        self.filter = CausalFilter(cfg) if cfg.filter_mix > 0 else None
        hidden = cfg.ffn_mult * cfg.dim
        self.ligr = cfg.block == "ligr"
        if self.ligr:
            self.mlp: nn.Module = SwiGLU(cfg.dim, hidden)
            self.gate_attn, self.gate_mlp = nn.Linear(cfg.dim, cfg.dim), nn.Linear(cfg.dim, cfg.dim)
        else:
            self.mlp = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(), nn.Linear(hidden, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)

    def mix(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The token-mixing branch: attention, or its blend with the causal filter (model.filter_mix)."""
        attended = self.attn(h, lengths)
        if self.filter is None:
            return attended
        return self.filter_mix * self.filter(h) + (1.0 - self.filter_mix) * attended

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.ligr:
            x = x + torch.sigmoid(self.gate_attn(x)) * self.drop(self.mix(self.ln1(x), lengths))
            return x + torch.sigmoid(self.gate_mlp(x)) * self.drop(self.mlp(self.ln2(x)))
        x = x + self.drop(self.mix(self.ln1(x), lengths))
        return x + self.drop(self.mlp(self.ln2(x)))


class UnifiedRanker(nn.Module):
    def __init__(self, cfg: RankerConfig, catalogue: Catalogue):
        """Built from its config and its catalogue alone (model/catalogue.py): the items' attribute
        and word bags, and, where the config uses them, the semantic-ID codes and frozen text vectors
        (ItemTower), the lexical field's tokens (model.lexical) and the query catalogue's token ids
        (suggest). A part the catalogue lacks becomes a zero placeholder of the configured shape, to
        be filled by load_state_dict."""
        super().__init__()
        if catalogue.num_items != cfg.num_items:
            raise ValueError(f"the catalogue has {catalogue.num_items} items, the model config {cfg.num_items}")
        self.config, self.num_items = cfg, cfg.num_items
        item_text = catalogue.item_text if cfg.text_features else None
        item_codes = catalogue.item_codes if cfg.semantic_id_sizes else None
        lexical_rows = catalogue.lexical_rows if cfg.lexical != "none" else None
        query_tokens = catalogue.query_token_ids if cfg.num_queries else None
        self.item_tower: ItemTower | PrecomputedItemTower = ItemTower(
            cfg.num_items, catalogue.item_attributes, cfg.num_attributes, catalogue.item_words, cfg.num_words, cfg.dim,
            use_attributes=cfg.use_attributes, use_words=cfg.use_words, bag_impl=cfg.embedding_bag_impl,
            semantic_id_sizes=cfg.semantic_id_sizes, item_codes=item_codes,
            text_dim=cfg.text_dim if cfg.text_features else 0, item_text=item_text, id_dropout=cfg.id_dropout)
        if cfg.query_encoder != "none":
            self.query_encoder = SentenceEncoder(trainable=cfg.query_encoder == "finetune")
            if cfg.tie_text_projection:
                # The query and the items' content are encoded by the same sentence encoder: one
                # projection keeps them in one space, so a query lands next to items whose text matches.
                if cfg.text_dim != self.query_encoder.dim:
                    raise ValueError(f"model.tie_text_projection: item text vectors are {cfg.text_dim}-d, "
                                     f"the query encoder's {self.query_encoder.dim}-d (not the same encoder)")
                self.query_proj = self.item_tower.text_proj
            else:
                self.query_proj = nn.Linear(self.query_encoder.dim, cfg.dim, bias=False)
        # The additive score terms beside <context, item> (model/scoring.py), in the order they are summed.
        self.terms = build_terms(cfg, lexical_rows=lexical_rows, item_text=item_text, item_counts=catalogue.item_counts)
        self._register_load_state_dict_pre_hook(_renamed_term_keys)
        # A model without a query catalogue keeps the item tasks' table (and its initialisation) as it was.
        num_task_ids = NUM_TASK_IDS if cfg.num_queries else NUM_TASKS
        self.task_embedding = nn.Embedding(num_task_ids, cfg.dim)
        self.no_context = nn.Parameter(torch.zeros(cfg.dim))
        self.position = nn.Embedding(NUM_PREFIX + cfg.max_history, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.dim)
        self.task_heads = TaskHeads(num_task_ids, cfg.dim, cfg.task_heads) if cfg.task_heads else None
        self.drop = nn.Dropout(cfg.dropout)
        for emb in (self.task_embedding, self.position):
            nn.init.normal_(emb.weight, std=0.02)
        if cfg.num_queries:
            rows = cfg.num_queries + 2
            tokens, lengths = query_tokens or (torch.zeros(rows, cfg.max_query_len, dtype=torch.int64),
                                               torch.zeros(rows, dtype=torch.int64))
            if tuple(tokens.shape) != (rows, cfg.max_query_len) or tuple(lengths.shape) != (rows,):
                raise ValueError(f"query_tokens must be [{rows}, {cfg.max_query_len}] and [{rows}], "
                                 f"got {list(tokens.shape)} and {list(lengths.shape)}")
            self.register_buffer("query_tokens", tokens.to(torch.int64).clone())
            self.register_buffer("query_token_lengths", lengths.to(torch.int64).clone())

    def _last_items(self, history: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep each row's most recent max_history items, left-aligned."""
        keep = self.config.max_history
        lengths = lengths.clamp(0, history.shape[1])
        if history.shape[1] <= keep:
            return history, lengths
        start = (lengths - keep).clamp(min=0).unsqueeze(1)
        return history.gather(1, start + torch.arange(keep, device=history.device).unsqueeze(0)), lengths.clamp(max=keep)

    def _clip(self, task, history, history_lengths, query, query_lengths):
        """The request as the model reads it: the newest max_history items (none for similar-item),
        padding zeroed, the query cut to max_query_len with unknown word ids mapped to OOV."""
        history, hist_len = self._last_items(history, history_lengths)
        hist_len = torch.where(task == Task.SIMILAR, torch.zeros_like(hist_len), hist_len)
        valid = torch.arange(history.shape[1], device=history.device).unsqueeze(0) < hist_len.unsqueeze(1)
        history = torch.where(valid, history, torch.zeros_like(history))
        query = query[:, : self.config.max_query_len]
        query_lengths = query_lengths.clamp(0, query.shape[1])
        query = torch.where((query >= 0) & (query < self.config.num_words), query, torch.full_like(query, OOV_TOKEN_ID))
        return history, hist_len, valid, query, query_lengths

    def item_batch(self, task: torch.Tensor, history: torch.Tensor, history_lengths: torch.Tensor,
                   query: torch.Tensor, query_lengths: torch.Tensor, source_item: torch.Tensor,
                   extra_items: torch.Tensor | None = None, id_dropout_seed: int | None = None) -> ItemBatch:
        """The item-tower input of `encode` for this request (buffers only, no weights)."""
        history, _, _, query, query_lengths = self._clip(task, history, history_lengths, query, query_lengths)
        ids = [history.reshape(-1), source_item.reshape(-1)] + ([] if extra_items is None else [extra_items.reshape(-1)])
        uniq, inverse = torch.unique(torch.cat(ids), return_inverse=True)
        features = self.item_tower.features(uniq, query, query_lengths, id_dropout_seed=id_dropout_seed)
        return ItemBatch(features, uniq, inverse, query.shape[0])

    def encode(self, task: torch.Tensor, history: torch.Tensor, history_lengths: torch.Tensor,
               query: torch.Tensor, query_lengths: torch.Tensor, source_item: torch.Tensor,
               extra_items: torch.Tensor | None = None, items: ItemBatch | None = None):
        """Hidden states [B, T, d] for every position, sequence lengths [B], and the tower vectors
        of `extra_items` (training targets/negatives share the same lookup), or None. `items`: the
        prebuilt tower input of this request and `extra_items` (item_batch); else built here."""
        history, hist_len, valid, query, query_lengths = self._clip(task, history, history_lengths, query,
                                                                    query_lengths)
        b, n_hist = history.shape
        if items is not None:
            unique_vecs, query_vec = self.item_tower.pool(items.features, items.item_ids, items.num_queries)
            vecs = unique_vecs[items.inverse]
        else:
            ids = [history.reshape(-1), source_item.reshape(-1)]
            if extra_items is not None:
                ids.append(extra_items.reshape(-1))
            vecs, query_vec = self.item_tower(torch.cat(ids), query, query_lengths)
        hist_vec = vecs[: b * n_hist].view(b, n_hist, self.config.dim) * valid.unsqueeze(-1)
        source_vec = vecs[b * n_hist: b * n_hist + b]
        if extra_items is not None:
            extra_vec = vecs[b * n_hist + b:].view(*extra_items.shape, self.config.dim)
        else:  # with a prebuilt `items`, the extra ids it carries (flat), if any
            extra_vec = vecs[b * n_hist + b:] if items is not None and len(vecs) > b * n_hist + b else None

        task = task.clamp(0, self.task_embedding.num_embeddings - 1)
        if self.config.query_encoder != "none":
            query_vec = self._search_context(task, query, query_lengths, query_vec)
        context = torch.where((task == Task.SEARCH).unsqueeze(1), query_vec,
                              torch.where((task == Task.SIMILAR).unsqueeze(1), source_vec,
                                          self.no_context.expand(b, -1)))
        x = torch.cat([self.task_embedding(task).unsqueeze(1), context.unsqueeze(1), hist_vec], dim=1)
        x = self.drop(x + self.position.weight[: x.shape[1]].unsqueeze(0))
        lengths = hist_len + NUM_PREFIX
        for block in self.blocks:
            x = block(x, lengths)
        x = self.ln_f(x)
        if self.task_heads is not None:
            x = self.task_heads(x, task)
        return x, lengths, extra_vec

    def _search_context(self, task: torch.Tensor, query: torch.Tensor, query_lengths: torch.Tensor,
                        bag: torch.Tensor) -> torch.Tensor:
        """Query-token bag (if configured) + projected text-encoder vector, the encoder run on the
        search rows only."""
        rows = torch.nonzero(task == Task.SEARCH).squeeze(1)
        encoded = self.query_proj(self.query_encoder(query[rows], query_lengths[rows]))
        base = bag if self.config.query_bag else torch.zeros_like(bag)
        return base.index_add(0, rows, encoded.to(base.dtype))

    def query_vectors(self, query: torch.Tensor, query_lengths: torch.Tensor) -> torch.Tensor:
        """[N, d] vectors of query token rows through the search query path: the pooled token bag
        (if configured) + the projected text-encoder vector (if configured)."""
        _, bag = self.item_tower(query.new_zeros(0), query, query_lengths)
        vec = bag if self.config.query_bag else torch.zeros_like(bag)
        if self.config.query_encoder != "none":
            vec = vec + self.query_proj(self.query_encoder(query, query_lengths)).to(vec.dtype)
        return vec

    def all_query_embeddings(self) -> torch.Tensor:
        """[num_queries + 2, d]: row = query id (rows 0 and num_queries + 1 are never ranked)."""
        if hasattr(self, "query_table"):  # the export form (to_plain)
            return self.query_table
        if not self.config.num_queries:
            raise ValueError("this model has no query catalogue (it was not trained with the suggest task)")
        return self.query_vectors(self.query_tokens, self.query_token_lengths)

    def score_queries(self, context: torch.Tensor, candidates: torch.Tensor | None = None,
                      queries: torch.Tensor | None = None) -> torch.Tensor:
        """[B, C] scores of candidate query ids, or [B, num_queries + 2] over every query id;
        `queries`: all_query_embeddings(), when the caller already has them."""
        queries = self.all_query_embeddings() if queries is None else queries
        if candidates is None:
            return self.similarity(context, queries)
        return self.similarity(context, queries[candidates.clamp(0, len(queries) - 1)])

    def forward(self, task: torch.Tensor, history: torch.Tensor, history_lengths: torch.Tensor,
                query: torch.Tensor, query_lengths: torch.Tensor, source_item: torch.Tensor) -> torch.Tensor:
        """Context vector [B, d] (the output at each row's last valid position)."""
        hidden, lengths, _ = self.encode(task, history, history_lengths, query, query_lengths, source_item)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]

    def similarity(self, context: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """context [..., d] x items [..., N, d] (or [N, d]) -> the vector part of the score."""
        return vector_scores(context, items, self.config.similarity, self.config.temperature)

    def all_item_embeddings(self) -> torch.Tensor:
        return self.item_tower.all_items()

    def view(self, task: torch.Tensor, history: torch.Tensor, history_lengths: torch.Tensor, query: torch.Tensor,
             query_lengths: torch.Tensor, source_item: torch.Tensor) -> RequestView:
        """The request as the model reads it (what the score terms read)."""
        history, hist_len, _, query, query_lengths = self._clip(task, history, history_lengths, query, query_lengths)
        return RequestView(task, history, hist_len, query, query_lengths, source_item)

    def score(self, context: torch.Tensor, candidates: torch.Tensor | None = None,
              inputs: tuple | None = None) -> torch.Tensor:
        """[B, C] final scores of candidate ids, or [B, num_items + 2] over the whole id space
        (columns 0 and num_items + 1 are padding / OOV: callers mask them). `inputs`: the request
        (task, history, history_lengths, query, query_lengths, source_item); with it, the score
        terms (model/scoring.py) are added to the vector score."""
        if candidates is None:
            scores = self.similarity(context, self.all_item_embeddings())
        else:
            cand_vec, _ = self.item_tower(candidates)
            scores = self.similarity(context, cand_vec)
        terms = None if inputs is None else term_scores(self.terms, self.view(*inputs), candidates)
        return scores if terms is None else scores + terms.to(scores.dtype)

    def position_logits(self, request, keep: torch.Tensor, h: torch.Tensor, items: torch.Tensor,
                        candidates: torch.Tensor | None = None, log_q: torch.Tensor | None = None,
                        chunk_bytes: int = 16 << 20):
        """Training logits of the kept output positions (`keep` [B, P] after the TASK token, h [N, d]
        their hidden states) against item vectors `items` [C, d]: ids 1..num_items (the catalogue),
        or `candidates` [C] (a sampled set, minus `log_q` [C]), the score terms included (not the
        inference-only ones: model/scoring.py). A function of a
        slice of the positions -> [rows, C] (the full softmax runs in row chunks)."""
        view = self.view(request.task, request.history, request.history_lengths, request.query,
                         request.query_lengths, request.source_item)
        terms = position_term_scores(self.terms, view, keep)
        n = self.num_items

        def logits(rows: slice) -> torch.Tensor:
            out = self.similarity(h[rows], items)
            if log_q is not None:
                out = out - log_q.unsqueeze(0)
            if terms is None:
                return out
            if candidates is None:
                return out + terms(rows)[:, 1: n + 1].to(out.dtype)
            # in row chunks: one [positions, catalogue] matrix would be tens of MB
            first, last = rows.indices(h.shape[0])[:2]
            step = max(1, chunk_bytes // (4 * (n + 1)))
            bias = torch.cat([terms(slice(s, min(s + step, last)))[:, candidates] for s in range(first, last, step)])
            return out + bias.to(out.dtype)

        return logits

    def set_inference_settings(self, item_counts: torch.Tensor | None, **settings) -> None:
        """Change the inference-only settings (config.INFERENCE_SETTINGS: model.fresh_boost,
        model.fresh_max_count, model.fresh_neighbours) of a built or trained model: its
        inference-only score terms are rebuilt from `item_counts` (the catalogue's training counts;
        None: unknown) and summed after the others; the weights and the other terms are kept."""
        unknown = set(settings) - set(INFERENCE_SETTINGS)
        if unknown:
            raise ValueError(f"not inference-only settings: {sorted(unknown)} (allowed: {list(INFERENCE_SETTINGS)})")
        cfg = replace(self.config, **settings)
        counts = None if item_counts is None else item_counts.to(self.no_context.device)
        text = getattr(self.item_tower, "item_text", None)  # the full tower's frozen text vectors, if any
        kept = {name: term for name, term in self.terms.items() if not term.inference_only}
        rebuilt = {name: cls(cfg, item_counts=counts, item_text=text) for name, (cls, used) in TERMS.items()
                   if cls.inference_only and used(cfg)}
        self.terms = nn.ModuleDict({**kept, **rebuilt}).to(self.no_context.device)
        self.config = cfg

    def to_plain(self) -> "UnifiedRanker":
        """An eval-mode copy for export: no TorchRec modules (the item tower is precomputed into
        one table) and plain-torch attention."""
        plain = copy.deepcopy(self).eval()
        if self.config.num_queries:
            with torch.no_grad():  # every catalogue query through the query path, once
                plain.register_buffer("query_table", plain.all_query_embeddings().detach().clone())
        plain.item_tower = PrecomputedItemTower(plain.item_tower)
        for term in plain.terms.values():
            term.export_form()  # e.g. ONNX has no sparse matrix product
        plain.config = replace(plain.config, attention_impl="reference", embedding_bag_impl="torch")
        if plain.config.query_encoder != "none":
            plain.query_encoder.memoize = False  # the graph runs the encoder itself
        for block in plain.blocks:
            block.attn.impl = "reference"
        return plain

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The weights an optimizer treats apart, by role: `encoder`, the pretrained query encoder's
        (a fine-tuned encoder takes a much smaller step); `item_ids`, the item-id table (its own
        decay), local or the TorchRec sharded collection's.
        Every other weight is the freshly initialised rest."""
        encoder = list(self.query_encoder.parameters()) if self.config.query_encoder != "none" else []
        return {"encoder": encoder, "item_ids": [self.item_tower.id_table()]}


def _renamed_term_keys(state_dict, prefix, *_):
    """Checkpoints written before the score terms were one ModuleDict kept them at the top level."""
    for name in ("lexical", "text_neighbours"):
        for key in [k for k in state_dict if k.startswith(f"{prefix}{name}.")]:
            state_dict[f"{prefix}terms.{key[len(prefix):]}"] = state_dict.pop(key)
