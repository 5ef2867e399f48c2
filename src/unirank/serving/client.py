"""Typed gRPC client for the unirank Triton endpoint: search, similar-item, recommendations and
(for a model with a query catalogue) query suggestions.

Needs only numpy and tritonclient (`pip install unirank[client]`; no torch). Limits, names and the
tokenizer come from the server (`from_server`: the model config's parameters) or from a model
directory (`from_model_dir`). Query text is tokenized here with the model's own tokenizer.
Requests follow the model's rules before they leave: the most recent `max_history` items, the first
`max_query_len` query tokens; ids must be integers (Python or numpy, not bool). A history longer than
the model's `max_history` is cut to its newest items and the older ones move into the request's
`exclude` list, so they are still never returned (the explicit `exclude=` ids first, then the older
history newest first, up to MAX_EXCLUDE ids in all; explicit ids beyond the limit are refused).
Lengths are padded to a few buckets so the onnxruntime backend's batcher (equal shapes only) can
merge requests, or to the fixed widths the model config declares (the python flavour).
`candidates=[]` (or only padding ids 0) ranks nothing and gives an empty answer without a call;
`None` ranks the whole catalogue. Every call is idempotent and retried within an overall
`deadline_s` (default 30 s: a dead python-backend stub is healed in ~2 s after Triton's 10 s stub
timeout, a tritonserver restart takes a few seconds): each attempt may take `timeout_s`;
DEADLINE_EXCEEDED, UNAVAILABLE (server restarting, connection refused), an unhealthy model and a
model with no available versions (a stub being replaced) are retried, at most `retries` times, with
jittered exponential backoff capped at `MAX_BACKOFF_S`. Optional TLS; optional version pinning.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from unirank.model.request import MAX_EXCLUDE, QueryTask, Task
from unirank.model.tokenizer import Tokenizer, load_tokenizer, tokenizer_from_dict
from unirank.serving.metadata import (METADATA_FILE, METADATA_PARAMETER, OUTPUT_NAMES, QUERIES_FILE,
                                      QUERIES_PARAMETER, TOKENIZER_FILE, TOKENIZER_PARAMETER, ExportMetadata)
from unirank.serving.request_arrays import FIELDS, ROW_FIELDS, RequestLimits, check_request

RETRYABLE = ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")
MAX_BACKOFF_S = 2.0
# Transient answers while the supervisor heals a model, by status: a dead python-backend stub
# (INTERNAL), then the model unloaded and loading again (NOT_FOUND; an unknown model name or a
# version the server does not have says "is not found" instead and is not retried).
TRANSIENT = {"StatusCode.INTERNAL": "is not healthy", "StatusCode.NOT_FOUND": "has no available versions"}


def retryable(err: InferenceServerException) -> bool:
    status = err.status()
    return status in RETRYABLE or (status in TRANSIENT and TRANSIENT[status] in (err.message() or ""))


def backoff_s(base_s: float, attempt: int) -> float:
    """Exponential, with +-50% jitter so that clients cut off together do not come back together."""
    return min(base_s * 2**attempt, MAX_BACKOFF_S) * random.uniform(0.5, 1.5)


def _ids(argument: str, values: Sequence[int]) -> list[int]:
    """Integer ids (int or a numpy integer; bool and floats refused, naming the argument)."""
    ids = []
    for value in values:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{argument}: ids must be integers, got {value!r} ({type(value).__name__})")
        ids.append(int(value))
    return ids


@dataclass
class Ranking:
    """Best first; only filled slots (an empty catalogue slot has id 0 and is dropped)."""

    item_ids: np.ndarray  # [k] int64
    scores: np.ndarray  # [k] float32


NOTHING_RANKED = Ranking(np.zeros(0, np.int64), np.zeros(0, np.float32))  # the answer to candidates=[]


@dataclass
class Suggestions:
    """Suggested queries, best first: their ids in the model's query catalogue and their text."""

    query_ids: np.ndarray  # [k] int64
    texts: list[str]
    scores: np.ndarray  # [k] float32


def bucket(length: int, limit: int) -> int:
    """Smallest power of two >= length (at least 1), capped at `limit`."""
    return min(1 << max(0, int(length) - 1).bit_length(), limit)


def _padded(values: Sequence[int], width: int) -> np.ndarray:
    row = np.zeros((1, max(width, len(values))), dtype=np.int64)
    row[0, : len(values)] = values
    return row


class RequestBuilder:
    """Typed arguments -> request arrays ([1, ...] int64 per field), with the model's rules applied."""

    def __init__(self, tokenizer: Tokenizer, metadata: ExportMetadata):
        self.tokenizer, self.metadata = tokenizer, metadata
        self.limits = RequestLimits(metadata.num_items, metadata.max_history, metadata.max_query_len,
                                    num_queries=metadata.num_queries)

    def build(self, task: Task, history: Sequence[int] = (), query_text: str = "", source_item: int = 0,
              candidates: Sequence[int] | None = None, exclude: Sequence[int] = ()) -> dict[str, np.ndarray] | None:
        """None when `candidates` is given but holds no id (nothing to rank)."""
        md = self.metadata
        history = _ids("user_history", history)
        exclude = _exclusions(_ids("exclude", exclude), history[: max(0, len(history) - md.max_history)])
        history = history[-md.max_history:]
        query = self.tokenizer.encode(query_text, max_length=md.max_query_len) if query_text else []
        (source_item,) = _ids("item", [source_item])
        given = None if candidates is None else _ids("candidates", candidates)
        candidates = [c for c in given or () if c != 0]  # 0 is padding
        nothing_to_rank = given is not None and not candidates
        arrays = {
            "task": np.array([int(task)], dtype=np.int64),
            "history": _padded(history, bucket(len(history), md.max_history)),
            "history_lengths": np.array([len(history)], dtype=np.int64),
            "query": _padded(query, bucket(len(query), md.max_query_len)),
            "query_lengths": np.array([len(query)], dtype=np.int64),
            "source_item": np.array([source_item], dtype=np.int64),
            "candidates": _padded(candidates, bucket(len(candidates), self.limits.max_candidates)),
            "exclude": _padded(exclude, bucket(len(exclude), MAX_EXCLUDE)),
            "exclude_lengths": np.array([len(exclude)], dtype=np.int64),
        }
        check_request(arrays, self.limits)  # fail fast, with the server's message, before the network
        return None if nothing_to_rank else arrays


def _exclusions(exclude: list[int], older_history: list[int]) -> list[int]:
    """The exclude list: the caller's ids, then the history items older than the model reads, newest
    first, each once, up to MAX_EXCLUDE ids (the caller's own are never dropped: too many is refused)."""
    out, seen = [], set()
    for position, item in enumerate([*exclude, *reversed(older_history)]):
        if position >= len(exclude) and len(out) >= MAX_EXCLUDE:
            break
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


def fixed_widths(config: dict) -> dict[str, int]:
    """{sequence input: width} of the inputs a model config (as JSON) declares with a fixed width
    (the python flavour: every sequence at its limit; the ONNX Runtime flavour: the history); the
    others take any width."""
    widths = {}
    for tensor in config.get("input", []):
        dims = [int(d) for d in tensor.get("dims", [])]
        if tensor.get("name") not in ROW_FIELDS and dims and dims[-1] > 0:
            widths[tensor["name"]] = dims[-1]
    return widths


def wire_arrays(arrays: dict[str, np.ndarray], widths: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """The request's arrays as they travel: row fields as [B, 1] (the config reshapes them to [B]);
    sequences narrower than a fixed `widths` entry right-padded with 0 to it."""
    out = {}
    for name in FIELDS:
        value = np.ascontiguousarray(arrays[name], dtype=np.int64)
        if name in ROW_FIELDS and value.ndim == 1:
            value = value[:, None]
        width = (widths or {}).get(name, 0)
        if value.ndim == 2 and value.shape[1] < width:
            value = np.pad(value, ((0, 0), (0, width - value.shape[1])))
        out[name] = value
    return out


def infer_inputs(arrays: dict[str, np.ndarray], widths: dict[str, int] | None = None) -> list[grpcclient.InferInput]:
    """The gRPC inputs of a request (wire_arrays)."""
    inputs = []
    for name, value in wire_arrays(arrays, widths).items():
        tensor = grpcclient.InferInput(name, list(value.shape), "INT64")
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


def rankings(result, k: int | None = None) -> list[Ranking]:
    """Per-row Rankings from an InferResult, truncated to k and to the filled slots."""
    ids, scores = result.as_numpy("item_ids"), result.as_numpy("scores")
    out = []
    for row_ids, row_scores in zip(ids, scores):
        filled = row_ids != 0
        out.append(Ranking(row_ids[filled][:k], row_scores[filled][:k]))
    return out


def _load_model_files(model_dir: str | Path) -> tuple[Tokenizer, ExportMetadata]:
    model_dir = Path(model_dir)
    return load_tokenizer(model_dir / TOKENIZER_FILE), ExportMetadata.load(model_dir / METADATA_FILE)


def model_files_from_server(url: str, model_name: str = "unirank", model_version: str = "",
                            tls: dict | None = None) -> tuple[Tokenizer, ExportMetadata]:
    """Tokenizer and limits from the model config's parameters (written by build_model_repository)."""
    with grpcclient.InferenceServerClient(url, **(tls or {})) as client:
        config = client.get_model_config(model_name, model_version, as_json=True)["config"]
    parameters = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    missing = [p for p in (METADATA_PARAMETER, TOKENIZER_PARAMETER) if not parameters.get(p)]
    if missing:
        raise ValueError(f"model {model_name!r} config has no {missing} parameters (rebuild its repository)")
    return (tokenizer_from_dict(json.loads(parameters[TOKENIZER_PARAMETER])),
            ExportMetadata(**json.loads(parameters[METADATA_PARAMETER])))


def widths_from_model_dir(model_dir: str | Path) -> dict[str, int]:
    """fixed_widths of the model directory's config.pbtxt."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse((Path(model_dir) / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    return fixed_widths(json_format.MessageToDict(config, preserving_proto_field_name=True))


def widths_from_server(url: str, model_name: str = "unirank", model_version: str = "",
                       tls: dict | None = None) -> dict[str, int]:
    """fixed_widths of the served model's config."""
    with grpcclient.InferenceServerClient(url, **(tls or {})) as client:
        return fixed_widths(client.get_model_config(model_name, model_version, as_json=True)["config"])


def query_texts_from_model_dir(model_dir: str | Path) -> list[str]:
    """The query catalogue (queries.json) of a model directory; [] for a model without one."""
    path = Path(model_dir) / QUERIES_FILE
    return json.loads(path.read_text()) if path.exists() else []


def query_texts_from_server(url: str, model_name: str = "unirank", model_version: str = "",
                            tls: dict | None = None) -> list[str]:
    """The query catalogue from the model config's `queries` parameter; [] for a model without one."""
    with grpcclient.InferenceServerClient(url, **(tls or {})) as client:
        config = client.get_model_config(model_name, model_version, as_json=True)["config"]
    text = config.get("parameters", {}).get(QUERIES_PARAMETER, {}).get("string_value", "")
    return json.loads(text) if text else []


class _TypedCalls:
    """Construction and the per-task surface, shared by the sync and async clients (`_call` differs)."""

    def __init__(self, url: str, tokenizer: Tokenizer, metadata: ExportMetadata, model_name: str = "unirank",
                 timeout_s: float = 2.0, retries: int = 30, retry_backoff_s: float = 0.1, model_version: str = "",
                 tls: dict | None = None, query_texts: Sequence[str] = (), deadline_s: float = 30.0,
                 widths: dict[str, int] | None = None):
        """`model_version` "" lets the server pick (the newest loaded); "2" pins version 2. `tls`:
        tritonclient's TLS arguments, e.g. {"ssl": True, "root_certificates": "ca.pem"}.
        `query_texts`: the model's query catalogue (id = position + 1), for `suggest`. `timeout_s`:
        one attempt; `deadline_s`: the whole call, retries included. `widths`: the config's fixed
        sequence widths (`fixed_widths`; from_model_dir and from_server read them)."""
        if len(query_texts) != metadata.num_queries:
            raise ValueError(f"the model has {metadata.num_queries} queries, got {len(query_texts)} query texts")
        self.query_texts = list(query_texts)
        self.url, self.model_name, self.model_version = url, model_name, model_version
        self.builder = RequestBuilder(tokenizer, metadata)
        self.timeout_s, self.retries, self.retry_backoff_s = timeout_s, retries, retry_backoff_s
        self.deadline_s, self.widths = deadline_s, dict(widths or {})
        self._client = self._connect(url, tls or {})

    @classmethod
    def from_model_dir(cls, url: str, model_dir: str | Path, **kwargs):
        """Tokenizer and limits from a model directory of the repository (e.g. repo/python/unirank)."""
        return cls(url, *_load_model_files(model_dir), model_name=Path(model_dir).name,
                   query_texts=query_texts_from_model_dir(model_dir), widths=widths_from_model_dir(model_dir), **kwargs)

    @classmethod
    def from_server(cls, url: str, model_name: str = "unirank", model_version: str = "", tls: dict | None = None, **kwargs):
        """Tokenizer and limits read from the served model's config: nothing local needed."""
        return cls(url, *model_files_from_server(url, model_name, model_version, tls), model_name=model_name,
                   model_version=model_version, tls=tls,
                   query_texts=query_texts_from_server(url, model_name, model_version, tls),
                   widths=widths_from_server(url, model_name, model_version, tls), **kwargs)

    def _infer_arguments(self, arrays, timeout_s: float) -> dict:
        return dict(model_name=self.model_name, inputs=infer_inputs(arrays, self.widths), model_version=self.model_version,
                    outputs=[grpcclient.InferRequestedOutput(n) for n in OUTPUT_NAMES], client_timeout=timeout_s)

    def _attempts(self):
        """(attempt, its timeout) while the call's deadline leaves time; `_retry_pause` decides on a failure."""
        deadline = time.monotonic() + self.deadline_s
        for attempt in range(self.retries + 1):
            yield attempt, max(0.001, min(self.timeout_s, deadline - time.monotonic()))

    def _retry_pause(self, err: InferenceServerException, attempt: int, started: float) -> float:
        """Seconds to wait before the next attempt; raises `err` when it is not retried."""
        pause = backoff_s(self.retry_backoff_s, attempt)
        if not retryable(err) or attempt >= self.retries or time.monotonic() + pause >= started + self.deadline_s:
            raise err
        return pause

    def _check_k(self, k: int) -> int:
        if not 1 <= k <= self.builder.metadata.top_k:
            raise ValueError(f"k: {k} outside [1, {self.builder.metadata.top_k}] (the exported top_k)")
        return k

    def search(self, user_history: Sequence[int], query_text: str, candidates: Sequence[int] | None = None, k: int = 10,
               exclude: Sequence[int] = ()):
        """Personalized search; the user's history items (all of them, see the module docstring) and
        the `exclude` ids (already bought, blocked, out of stock) are never returned."""
        return self._one(self.builder.build(Task.SEARCH, user_history, query_text, 0, candidates, exclude), k)

    def similar(self, item: int, candidates: Sequence[int] | None = None, k: int = 10, exclude: Sequence[int] = ()):
        """More like `item` (an anonymous item page); `item` itself and the `exclude` ids are never returned."""
        return self._one(self.builder.build(Task.SIMILAR, (), "", item, candidates, exclude), k)

    def recommend(self, user_history: Sequence[int], candidates: Sequence[int] | None = None, k: int = 10,
                  exclude: Sequence[int] = ()):
        """Pre-query recommendations (home page); an empty history is a new user. The history items
        and the `exclude` ids are never returned."""
        return self._one(self.builder.build(Task.PREQUERY, user_history, "", 0, candidates, exclude), k)

    def suggest(self, user_history: Sequence[int], candidates: Sequence[int] | None = None, k: int = 10):
        """Query suggestions before the user types (an empty history is a new user): `Suggestions`
        from the model's query catalogue; `candidates` (query ids) restricts them. Suggestions are
        queries: there is no `exclude` (a past search may come back)."""
        if not self.query_texts:
            raise ValueError("suggest: this model has no query catalogue (it was not trained with the suggest task)")
        return self._suggestions(self._one(self.builder.build(QueryTask.SUGGEST, user_history, "", 0, candidates), k))

    def _texts(self, ranking: Ranking) -> Suggestions:
        return Suggestions(ranking.item_ids, [self.query_texts[int(i) - 1] for i in ranking.item_ids], ranking.scores)

    def rank(self, arrays: dict[str, np.ndarray], k: int | None = None):
        """A prepared (batched) request, e.g. from request_arrays.pad_and_stack; one Ranking per row.
        Checked against the contract before it leaves (a batch of 0 rows: "task: batch size 0 ...")."""
        check_request(arrays, self.builder.limits)
        return self._call(arrays, k)


class RankerClient(_TypedCalls):
    """Synchronous client: `RankerClient.from_model_dir("127.0.0.1:8001", "repo/python/unirank")`."""

    @staticmethod
    def _connect(url: str, tls: dict):
        return grpcclient.InferenceServerClient(url, **tls)

    def _one(self, arrays, k):
        k = self._check_k(k)
        return NOTHING_RANKED if arrays is None else self._call(arrays, k)[0]

    def _suggestions(self, ranking):
        return self._texts(ranking)

    def _call(self, arrays, k):
        started = time.monotonic()
        for attempt, timeout_s in self._attempts():
            try:
                return rankings(self._client.infer(**self._infer_arguments(arrays, timeout_s)), k)
            except InferenceServerException as err:
                time.sleep(self._retry_pause(err, attempt, started))

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "RankerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncRankerClient(_TypedCalls):
    """asyncio client over tritonclient.grpc.aio; the typed calls are coroutines."""

    @staticmethod
    def _connect(url: str, tls: dict):
        return aioclient.InferenceServerClient(url, **tls)

    async def _one(self, arrays, k):
        k = self._check_k(k)
        return NOTHING_RANKED if arrays is None else (await self._call(arrays, k))[0]

    async def _suggestions(self, pending):
        return self._texts(await pending)

    async def _call(self, arrays, k):
        started = time.monotonic()
        for attempt, timeout_s in self._attempts():
            try:
                return rankings(await self._client.infer(**self._infer_arguments(arrays, timeout_s)), k)
            except InferenceServerException as err:
                await asyncio.sleep(self._retry_pause(err, attempt, started))

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> "AsyncRankerClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
