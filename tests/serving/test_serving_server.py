"""The real bundled tritonserver on a tiny model: per-task gRPC round trips equal PyTorch's answers,
observability endpoints, and clear errors for a taken port or a repository that cannot load."""
from __future__ import annotations

import asyncio
import os
import shutil
import socket
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import TOP_K, torch_topk
from unirank.serving import client as client_module
from unirank.serving.client import AsyncRankerClient, RankerClient
from unirank.serving.model_repository import InvalidModelRepository
from unirank.serving.server import Server, ServerError, free_port


@pytest.fixture(scope="module")
def client(server, repositories):
    with RankerClient.from_model_dir(server.grpc_url, repositories["python"] / "unirank", timeout_s=10) as c:
        yield c


def assert_same_as_pytorch(ranking, arrays, plain_topk, k):
    ids, scores = torch_topk(plain_topk, arrays)
    filled = ids[0] != 0
    expected_ids, expected_scores = ids[0][filled][:k], scores[0][filled][:k]
    np.testing.assert_allclose(ranking.scores, expected_scores, atol=1e-5)
    assert ranking.item_ids.tolist() == expected_ids.tolist()


CALLS = {
    "search": lambda c: ("search", dict(user_history=[4, 8, 15], query_text="waa wab unknownword", k=10)),
    "search_candidates": lambda c: ("search", dict(user_history=[4], query_text="wac", candidates=[3, 4, 5, 99], k=10)),
    "similar": lambda c: ("similar", dict(item=42, k=TOP_K)),
    "similar_candidates": lambda c: ("similar", dict(item=42, candidates=[42, 41, 40], k=5)),
    "recommend": lambda c: ("recommend", dict(user_history=list(range(1, 30)), k=10)),  # longer than max_history
    "recommend_new_user": lambda c: ("recommend", dict(user_history=[], k=3)),
}


def call_case(client, case):
    """(ranking, the request arrays it was built from, kwargs) of one CALLS case."""
    method, kwargs = CALLS[case](client)
    ranking = getattr(client, method)(**kwargs)
    task = {"search": 0, "similar": 1, "recommend": 2}[method]
    arrays = client.builder.build(task, kwargs.get("user_history", ()), kwargs.get("query_text", ""),
                                  kwargs.get("item", 0), kwargs.get("candidates"))
    return ranking, arrays, kwargs


@pytest.mark.parametrize("case", CALLS)
def test_round_trip_matches_pytorch(case, client, plain_topk):
    ranking, arrays, kwargs = call_case(client, case)
    assert_same_as_pytorch(ranking, arrays, plain_topk, kwargs["k"])
    if case == "similar_candidates":
        assert sorted(ranking.item_ids.tolist()) == [40, 41]  # the source item itself is filtered
    elif "candidates" not in case:
        assert len(ranking.item_ids) == kwargs["k"]
    if "user_history" in kwargs:  # not similar-item
        assert not set(kwargs["user_history"][-12:]) & set(ranking.item_ids.tolist())


def test_async_client_concurrent_calls(server, repositories, client, plain_topk):
    async def run():
        async with AsyncRankerClient.from_model_dir(server.grpc_url, repositories["python"] / "unirank") as c:
            return await asyncio.gather(c.recommend([1, 2, 3], k=5), c.search([7], "wad", k=5), c.similar(9, k=5))

    recommended, searched, similar = asyncio.run(run())
    assert recommended.item_ids.tolist() == client.recommend([1, 2, 3], k=5).item_ids.tolist()
    assert searched.item_ids.tolist() == client.search([7], "wad", k=5).item_ids.tolist()
    np.testing.assert_allclose(similar.scores, client.similar(9, k=5).scores, atol=1e-6)


def test_client_rejects_bad_arguments_before_sending(client):
    with pytest.raises(ValueError, match="k: 21 outside"):
        client.recommend([1], k=TOP_K + 1)
    with pytest.raises(ValueError, match="source_item"):
        client.similar(0)


def test_health_metadata_statistics_and_metrics(server, client):
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    assert grpc.is_server_live() and grpc.is_model_ready("unirank")
    metadata = grpc.get_model_metadata("unirank", as_json=True)
    assert [i["name"] for i in metadata["inputs"]][:2] == ["task", "history"]
    client.recommend([5], k=3)
    stats = grpc.get_inference_statistics("unirank", as_json=True)["model_stats"][0]
    assert int(stats["inference_count"]) >= 1
    metrics = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    assert 'nv_inference_request_success{model="unirank"' in metrics
    with urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=5) as response:
        assert response.status == 200


def test_client_imports_without_torch():
    import subprocess
    import sys

    code = ("import sys; import unirank.serving.client; "
            "heavy = {'torch', 'onnxruntime', 'onnx'} & set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_client_reads_limits_and_tokenizer_from_the_server(server, client, repositories):
    with RankerClient.from_server(server.grpc_url, timeout_s=10) as remote:
        assert remote.builder.metadata == client.builder.metadata
        assert remote.builder.tokenizer.to_dict() == client.builder.tokenizer.to_dict()
        ranking = remote.search([4, 8], "waa wab", k=5)
        assert ranking.item_ids.tolist() == client.search([4, 8], "waa wab", k=5).item_ids.tolist()
    with RankerClient.from_server(server.grpc_url, model_version="1", timeout_s=10) as pinned:
        assert pinned.recommend([3], k=3).item_ids.tolist() == client.recommend([3], k=3).item_ids.tolist()
        pinned.model_version = "7"  # not in the repository: refused, not retried
        with pytest.raises(InferenceServerException, match="unirank"):
            pinned.recommend([3], k=3)


def test_a_model_being_healed_is_retried_boundedly(monkeypatch, client):
    """Fault injection: the answers Triton gives while the supervisor heals a dead python-backend
    stub (INTERNAL from the dead stub, then NOT_FOUND while the model is unloaded and loading)."""
    sleeps, real_infer = [], client._client.infer
    monkeypatch.setattr(client_module.time, "sleep", sleeps.append)
    healing = [InferenceServerException("Request for unknown model: 'unirank' has no available versions",
                                        status="StatusCode.NOT_FOUND"),
               InferenceServerException("Stub process 'unirank_0_0' is not healthy.", status="StatusCode.INTERNAL")]
    failures = []

    def flaky(**kwargs):
        if failures:
            raise failures.pop()
        return real_infer(**kwargs)

    monkeypatch.setattr(client._client, "infer", flaky)
    failures[:] = healing
    assert len(client.recommend([3], k=3).item_ids) == 3 and len(sleeps) == 2
    base = client.retry_backoff_s  # jittered exponential: 0.5-1.5 x base, then 1-3 x base
    assert 0.5 * base <= sleeps[0] <= 1.5 * base and base <= sleeps[1] <= 3 * base
    sleeps.clear()
    failures[:] = healing[:1] * (client.retries + 1)  # a heal longer than the backoff: the error surfaces
    with pytest.raises(InferenceServerException, match="has no available versions"):
        client.recommend([3], k=3)
    assert len(sleeps) == client.retries and not failures
    sleeps.clear()
    failures[:] = [InferenceServerException("Request for unknown model: 'unirank' version 7 is not found",
                                            status="StatusCode.NOT_FOUND")]
    with pytest.raises(InferenceServerException, match="version 7 is not found"):  # not retried
        client.recommend([3], k=3)
    assert sleeps == []


def test_only_unavailable_is_retried(monkeypatch, client, repositories):
    sleeps = []
    monkeypatch.setattr(client_module.time, "sleep", sleeps.append)
    nobody = RankerClient.from_model_dir(f"127.0.0.1:{free_port()}", repositories["python"] / "unirank",
                                         retries=2, retry_backoff_s=0.01, timeout_s=2)
    with pytest.raises(InferenceServerException) as err:
        nobody.recommend([1])
    assert err.value.status() == "StatusCode.UNAVAILABLE" and len(sleeps) == 2
    assert 0.005 <= sleeps[0] <= 0.015 and 0.01 <= sleeps[1] <= 0.03  # jittered exponential backoff
    sleeps.clear()
    arrays = client.builder.build(2, [1])
    arrays["task"] = np.array([9])  # server-side INVALID_ARGUMENT (past the client's own check): not retried
    with pytest.raises(InferenceServerException, match=r"task: unknown task id .*got 9") as err:
        client._call(arrays, None)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and sleeps == []


def test_deadline_exceeded_is_retried_within_the_call_deadline(monkeypatch, repositories):
    # Fault injection: a listener that accepts the connection and never answers, so every attempt's
    # deadline fires whatever the machine's speed (a 1 us deadline on the real server raced the reply).
    sleeps = []
    monkeypatch.setattr(client_module.time, "sleep", sleeps.append)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"127.0.0.1:{silent.getsockname()[1]}"
        with RankerClient.from_model_dir(url, repositories["python"] / "unirank", timeout_s=0.3, deadline_s=1.0) as hasty:
            with pytest.raises(InferenceServerException) as err:
                hasty.recommend([1, 2])
    # Each attempt took its 0.3 s (the pauses were not slept): the 1 s deadline ends the call after a few.
    assert err.value.status() == "StatusCode.DEADLINE_EXCEEDED" and 1 <= len(sleeps) < hasty.retries


def test_client_arguments_follow_the_contract(client, repositories):
    """candidates=[] ranks nothing (not the whole catalogue); ids are integers; 0 rows get the contract's message."""
    assert client.similar(42, candidates=[]).item_ids.tolist() == []
    assert client.recommend([1, 2], candidates=[0, 0]).scores.tolist() == []
    assert client.search([4], "waa", candidates=np.array([], np.int64)).item_ids.size == 0
    assert client.similar(np.int64(42), k=3).item_ids.tolist() == client.similar(42, k=3).item_ids.tolist()
    assert len(client.recommend(np.array([1, 2], np.int32), candidates=[np.uint16(3), 4], k=2).item_ids) == 2
    for call, argument in [(lambda: client.similar(40.0), "item"), (lambda: client.similar(True), "item"),
                           (lambda: client.recommend([1, 2.5]), "user_history"),
                           (lambda: client.search([1], "waa", candidates=[3, np.bool_(True)]), "candidates"),
                           (lambda: client.recommend(np.array([1.0])), "user_history")]:
        with pytest.raises(TypeError, match=f"{argument}: ids must be integers"):
            call()
    empty = {name: value[:0] for name, value in client.builder.build(2, [1]).items()}
    with pytest.raises(ValueError, match=r"task: batch size 0 \(send at least one row\)"):
        client.rank(empty)


def test_candidate_buckets_stay_within_the_server_limit(client):
    arrays = client.builder.build(2, [1], candidates=list(range(1, 10_001)))
    assert arrays["candidates"].shape == (1, 10_000)
    with pytest.raises(ValueError, match="candidates: more candidates than the limit 10000, got 10001"):
        client.builder.build(2, [1], candidates=list(range(1, 10_002)))


def test_port_taken_is_reported_before_launch(repositories):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = Server(repositories["python"], grpc_port=free_port(), http_port=port, metrics_port=free_port())
        with pytest.raises(ServerError, match=rf"http port {port} \(held by pid {os.getpid()} \(.*pytest.*\)\) already in use"):
            server.start()
        assert server.process is None


def test_invalid_repository_is_rejected(tmp_path, repositories):
    shutil.copytree(repositories["python"], tmp_path / "offline")
    (tmp_path / "offline" / "unirank" / "1" / "model.onnx").unlink()
    with pytest.raises(InvalidModelRepository, match="model.onnx missing"):
        Server(tmp_path / "offline", free_port(), free_port(), free_port()).start()
    # Passes offline checks but fails to load: the error carries the server log's reason.
    shutil.copytree(repositories["python"], tmp_path / "load")
    model_py = tmp_path / "load" / "unirank" / "1" / "model.py"
    model_py.write_text(model_py.read_text().replace("        model_dir = args", "        raise RuntimeError('boom in initialize')\n        model_dir = args", 1))
    with pytest.raises(ServerError, match="boom in initialize"):
        Server(tmp_path / "load", free_port(), free_port(), free_port(), startup_timeout_s=60).start()


def test_serve_blocks_until_sigterm_and_cleans_up(repositories):
    """`serve()` (behind `unirank serve`): prints the endpoints, exits 0 on SIGTERM, leaves no shm files."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    ports = [free_port() for _ in range(3)]
    code = (f"import sys; from unirank.serving.supervisor import serve; "
            f"sys.exit(serve({str(repositories['python'])!r}, {ports[0]}, {ports[1]}, {ports[2]}))")
    before = set(Path("/dev/shm").glob("triton_python_backend_shm_region_*"))
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = process.stdout.readline()
        assert f"gRPC 127.0.0.1:{ports[0]}" in line, line
        assert grpcclient.InferenceServerClient(f"127.0.0.1:{ports[0]}").is_model_ready("unirank")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=180) == 0  # shutdown of tritonserver + stubs takes > 60 s on a loaded 2-core box
    finally:
        if process.poll() is None:
            process.kill()
    assert not (set(Path("/dev/shm").glob(f"triton_python_backend_shm_region_unirank_{process.pid}_*")) - before)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", ports[0]))  # the port is free again
