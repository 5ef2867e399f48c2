"""A run's data, prepared once for training, evaluation and the experiments: the dataset, its
leave-one-out split, the tokenizer, the request builder, the items' LM features and lexical rows,
the query catalogue; and from them the model's catalogue (model/catalogue.py) and the ranker."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from unirank.config import Config
from unirank.data.datasets import InteractionData, load_dataset
from unirank.data.examples import (RequestBuilder, Split, fit_tokenizer, item_counts, item_lexical_rows,
                                   item_word_ids, leave_one_out_split)
from unirank.data.lm_features import ItemLMFeatures, item_lm_features
from unirank.data.query_catalogue import QueryCatalogue, build_query_catalogue
from unirank.model.catalogue import Catalogue
from unirank.model.lexical import table_width
from unirank.model.ranker import RankerConfig, UnifiedRanker
from unirank.model.request import TASK_NAMES, QueryTask
from unirank.model.tokenizer import Tokenizer


@dataclass
class Prepared:
    """Everything derived from the data that training, evaluation and export share."""

    data: InteractionData
    split: Split
    tokenizer: Tokenizer
    item_words: list[list[int]]
    builder: RequestBuilder
    lm: ItemLMFeatures | None = None  # text vectors + semantic IDs, when the model config uses them
    excluded_items: np.ndarray | None = None  # item ids training never ranks (cold-start: not yet in the catalogue)
    queries: QueryCatalogue | None = None  # the suggest task's candidates (train.tasks with suggest)
    lexical_rows: list[list[int]] | None = None  # per id, the lexical field's token ids (model.lexical)


def trained_queries(cfg: Config, prep: Prepared) -> QueryCatalogue | None:
    """The query catalogue of a model trained with `cfg`: only a run that trains suggest carries one
    (the item-task twins of a suggest benchmark share its data, not its catalogue)."""
    return prep.queries if TASK_NAMES[QueryTask.SUGGEST] in cfg.train.tasks else None


def prepare(cfg: Config, data: InteractionData | None = None, fit_items: np.ndarray | None = None) -> Prepared:
    """`data` replaces the configured dataset (e.g. a cold-start copy); `fit_items` restricts the
    semantic-ID codebook fit (see item_lm_features)."""
    data = data or load_dataset(cfg.data.path, cfg.data.format, **asdict(cfg.data.synthetic))
    split = leave_one_out_split(data.sequences)
    if len(split.users) == 0:
        raise ValueError(f"{cfg.data.path}: no user has the 3 interactions leave-one-out needs")
    tokenizer = fit_tokenizer(data, cfg.model.tokenizer)
    queries = None
    if TASK_NAMES[QueryTask.SUGGEST] in cfg.train.tasks:
        queries = build_query_catalogue(data, split, cfg.data.zero_shot_modulus)
        if not len(queries):
            raise ValueError(f"{cfg.data.path}: the training split builds no search query: suggest has no candidates")
    builder = RequestBuilder(data, tokenizer, cfg.model.max_history, cfg.model.max_query_len,
                             cfg.data.zero_shot_modulus, queries)
    lm = None
    if cfg.model.text_features or cfg.model.semantic_id_levels:
        lm = item_lm_features(data, cfg.data.cache_dir, cfg.model.semantic_id_levels, cfg.train.seed, fit_items)
    lexical = item_lexical_rows(data, tokenizer, cfg.model.lexical) if cfg.model.lexical != "none" else None
    return Prepared(data, split, tokenizer, item_word_ids(data, tokenizer), builder, lm, queries=queries,
                    lexical_rows=lexical)


def ranker_config(cfg: Config, prep: Prepared) -> RankerConfig:
    lm = prep.lm
    return RankerConfig(num_items=prep.data.num_items, num_attributes=prep.data.num_attributes,
                        num_words=prep.tokenizer.vocab_size, **asdict(cfg.model),
                        text_dim=int(lm.text.shape[1]) if lm is not None and cfg.model.text_features else 0,
                        semantic_id_sizes=lm.level_sizes if lm is not None else [],
                        num_queries=len(trained_queries(cfg, prep) or ()),
                        lexical_width=table_width(prep.lexical_rows) if prep.lexical_rows is not None else 0)


def build_catalogue(cfg: Config, prep: Prepared) -> Catalogue:
    """The catalogue a model trained with `cfg` on `prep` is built from and saved with."""
    lm, data = prep.lm, prep.data
    queries = trained_queries(cfg, prep)
    tokens, lengths = (None, None) if queries is None else queries.token_ids(prep.tokenizer, cfg.model.max_query_len)
    return Catalogue(data.item_attributes, prep.item_words, data.attribute_names, prep.tokenizer.to_dict(),
                     item_keys=data.item_keys, item_text=None if lm is None else lm.text,
                     item_codes=lm.codes if lm is not None and lm.level_sizes else None,
                     lexical_rows=prep.lexical_rows, query_texts=[] if queries is None else list(queries.texts),
                     query_tokens=tokens, query_lengths=lengths,
                     dataset={"name": data.name, "fingerprint": data.fingerprint()},
                     item_counts=torch.from_numpy(item_counts(prep.split.train, data.num_items)))


def build_ranker(cfg: Config, prep: Prepared) -> UnifiedRanker:
    return UnifiedRanker(ranker_config(cfg, prep), build_catalogue(cfg, prep))
