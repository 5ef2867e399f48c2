"""`unirank serve` under faults, through the real tritonserver: kill -9 of a python-backend stub (twice
in a row: each heal must start a stub that can be healed again) and of tritonserver are healed
(correct answers again within RECOVERY_S), a new model version copied
into the repository is served with requests succeeding throughout, and kill -9 of the launcher
leaves no tritonserver, stub or bound port behind (its shared memory is removed by the next start)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from conftest import TOP_K, make_ranker, raw_inputs
from unirank.serving.onnx_graph import export_onnx, onnx_session
from unirank.serving.metadata import MODEL_FILE
from unirank.serving.request_arrays import pad_and_stack
from unirank.serving.server import SHM_DIR, Server, free_port, port_in_use
from unirank.serving.supervisor import child_pids, stub_pids
from unirank.serving.synthetic_requests import random_request

RECOVERY_S = 60  # measured on the shared 2-core box: ~2 s after a stub or a tritonserver kill
REQUEST = pad_and_stack([random_request(np.random.default_rng(3), 2, 300, 60, 12, 6)])


def ask(url: str) -> np.ndarray:
    with grpcclient.InferenceServerClient(url) as client:
        return client.infer("unirank", raw_inputs(REQUEST), client_timeout=10).as_numpy("item_ids")


def wait_for(url: str, expected: np.ndarray, timeout_s: float = RECOVERY_S) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            if np.array_equal(ask(url), expected):
                return time.monotonic() - started
        except Exception:
            pass
        time.sleep(0.2)
    raise AssertionError(f"no correct answer within {timeout_s} s")


def tritonserver_pid(launcher: subprocess.Popen) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for pid in child_pids(launcher.pid):
            if "tritonserver" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                return pid
        time.sleep(0.2)
    raise AssertionError("no tritonserver child")


def gone(pid: int, timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split()[2]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def second_version(tmp_path_factory):
    """model.onnx of another ranker with the same limits: version 2 answers differently."""
    out = tmp_path_factory.mktemp("export_v2")
    export_onnx(make_ranker(seed=1).to_plain(), out, top_k=TOP_K)
    return out / MODEL_FILE


def copy_in_version(repository: Path, onnx_path: Path) -> None:
    staging = repository / "unirank" / "2"
    shutil.copytree(repository / "unirank" / "1", staging, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(onnx_path, staging / MODEL_FILE)


@pytest.mark.slow  # ~40 s alone
def test_faults_are_healed_and_versions_swap(tmp_path, repositories, session, second_version):
    repository = tmp_path / "repo"
    shutil.copytree(repositories["python"], repository)
    ports = [free_port() for _ in range(3)]
    url = f"127.0.0.1:{ports[0]}"
    code = (f"import logging, sys; logging.basicConfig(level=logging.INFO); from unirank.serving.supervisor import serve; "
            f"sys.exit(serve({str(repository)!r}, {ports[0]}, {ports[1]}, {ports[2]}, poll_s=0.3))")
    log_file = open(tmp_path / "serve.log", "w")
    launcher = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=log_file, text=True)
    try:
        assert "supervised" in launcher.stdout.readline()
        expected_v1 = session.run(["item_ids"], REQUEST)[0]
        assert np.array_equal(ask(url), expected_v1)

        server_pid = tritonserver_pid(launcher)
        for attempt in (1, 2):
            stubs = stub_pids(server_pid)
            assert stubs
            os.kill(next(iter(stubs)), signal.SIGKILL)
            print("stub kill -9 #%d -> correct after %.1f s" % (attempt, wait_for(url, expected_v1)))
            assert not set(stub_pids(server_pid)) & set(stubs)  # answered by a new stub

        busy = subprocess.run([sys.executable, "-m", "unirank.cli.main", "serve", "--repository", str(repository),
                               "--grpc-port", str(ports[0]), "--http-port", str(ports[1]), "--metrics-port", str(ports[2])],
                              capture_output=True, text=True, timeout=120)
        assert busy.returncode != 0 and "held by pid" in busy.stderr + busy.stdout and "tritonserver" in busy.stderr + busy.stdout

        os.kill(server_pid, signal.SIGKILL)
        assert gone(server_pid)
        print("tritonserver kill -9 -> correct after %.1f s" % wait_for(url, expected_v1))

        expected_v2 = onnx_session(second_version).run(["item_ids"], REQUEST)[0]
        assert not np.array_equal(expected_v1, expected_v2)
        answers, errors, stop = [], [], threading.Event()

        def keep_asking():
            while not stop.is_set():
                try:
                    answers.append(ask(url))
                except Exception as err:  # counted, must stay 0
                    errors.append(err)

        askers = [threading.Thread(target=keep_asking) for _ in range(2)]  # requests in flight during the swap
        for asker in askers:
            asker.start()
        try:
            time.sleep(1)
            copy_in_version(repository, second_version)
            deadline = time.monotonic() + RECOVERY_S
            while time.monotonic() < deadline and not (answers and np.array_equal(answers[-1], expected_v2)):
                time.sleep(0.2)
            time.sleep(1)
        finally:
            stop.set()
            for asker in askers:
                asker.join()
        assert not errors, errors[:3]
        assert all(np.array_equal(a, expected_v1) or np.array_equal(a, expected_v2) for a in answers)
        assert np.array_equal(answers[-1], expected_v2) and len(answers) > 20

        server_pid = tritonserver_pid(launcher)
        stubs = stub_pids(server_pid)
        launcher.kill()
        launcher.wait()
        assert gone(server_pid) and all(gone(stub) for stub in stubs)
        deadline = time.monotonic() + 30
        while any(port_in_use(p) for p in ports) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(port_in_use(p) for p in ports)
    finally:
        if launcher.poll() is None:
            launcher.kill()
        log_file.close()
        print((tmp_path / "serve.log").read_text()[-3000:])
    leftovers = list(SHM_DIR.glob(f"triton_python_backend_shm_region_unirank_{launcher.pid}_*"))
    with Server(repository, *(free_port() for _ in range(3)), startup_timeout_s=90):
        assert not any(p.exists() for p in leftovers)  # removed by the next start


def test_every_call_to_triton_has_a_deadline_and_a_missed_one_is_a_failed_heal(monkeypatch):
    """A hung tritonserver must not stall the poll loop: the fault (a gRPC call past its deadline)
    is injected by a client stand-in that records the deadlines it was given."""
    from unirank.serving import supervisor as sup

    calls = []

    class HungClient:
        def __init__(self, url):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def get_model_repository_index(self, as_json=False, client_timeout=None):
            calls.append(("index", client_timeout))
            raise grpcclient.InferenceServerException("Deadline Exceeded")

        def unload_model(self, name, client_timeout=None):
            calls.append(("unload", client_timeout))
            raise grpcclient.InferenceServerException("Deadline Exceeded")

        def load_model(self, name, client_timeout=None):
            calls.append(("load", client_timeout))
            raise grpcclient.InferenceServerException("Deadline Exceeded")

    monkeypatch.setattr(grpcclient, "InferenceServerClient", HungClient)

    class FakeServer:
        grpc_url = "localhost:1"

    supervisor = sup.Supervisor(FakeServer(), index_timeout_s=2.0, load_timeout_s=7.0)
    assert supervisor._heal(["unirank"]) == {"unirank"}  # tried again next poll
    supervisor._reload(["unirank"])  # logged, not raised
    with pytest.raises(grpcclient.InferenceServerException):
        sup.version_states(HungClient(""), supervisor.index_timeout_s)
    assert calls == [("unload", 7.0), ("load", 7.0), ("index", 2.0)]


def closed_connection_on(port: int, states: tuple[str, ...] = ("04", "05", "06"), timeout_s: float = 5.0) -> bool:
    """Waits for a closed connection still holding the local port: FIN-WAIT-1/2 (04/05, the peer has
    not closed yet) or TIME-WAIT (06)."""
    deadline = time.monotonic() + timeout_s
    while True:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for row in Path(table).read_text().splitlines()[1:]:
                fields = row.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] in states:
                    return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def plain_bind_fails(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def test_a_port_in_time_wait_is_free_and_a_listener_is_not():
    import socket

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert port_in_use(port)
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the listening side closes first: its end goes to TIME-WAIT
        client.recv(1)
        client.close()
    assert closed_connection_on(port, states=("06",)) and plain_bind_fails(port)  # what refused `unirank serve` for ~60 s
    assert not port_in_use(port)


@pytest.mark.slow  # ~60 s alone
def test_failed_restarts_are_retried_until_one_succeeds(tmp_path, repositories, session, caplog):
    """kill -9 of tritonserver with a client connected (its gRPC port then has a connection in
    TIME-WAIT) while the repository cannot load: restarts fail, are logged and retried with backoff;
    once the repository is repaired, the next restart serves, through the same client. Stop leaves
    no stub, shared-memory file or bound port."""
    import logging

    from unirank.serving.supervisor import Supervisor

    caplog.set_level(logging.INFO)
    repository = tmp_path / "repo"
    shutil.copytree(repositories["python"], repository)
    server = Server(repository, free_port(), free_port(), free_port(), startup_timeout_s=90)
    supervisor = Supervisor(server, poll_s=0.2, max_backoff_s=1.0)
    supervisor.start()
    stop = threading.Event()
    watcher = threading.Thread(target=supervisor.run, args=(stop,))
    watcher.start()
    expected = session.run(["item_ids"], REQUEST)[0]
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        assert np.array_equal(client.infer("unirank", raw_inputs(REQUEST), client_timeout=10).as_numpy("item_ids"), expected)
        first_pid, stubs = server.process.pid, set(stub_pids(server.process.pid))
        graph = repository / "unirank" / "1" / MODEL_FILE
        graph.rename(graph.with_suffix(".away"))
        os.kill(first_pid, signal.SIGKILL)
        deadline = time.monotonic() + RECOVERY_S
        while supervisor.failed_restarts < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert supervisor.failed_restarts >= 2 and supervisor.restarts == 0
        assert "model.onnx missing" in caplog.text and "restart attempt 2 failed" in caplog.text
        assert all(gone(stub) for stub in stubs)  # the dead server's stubs were killed
        assert closed_connection_on(server.ports["grpc"]) and plain_bind_fails(server.ports["grpc"])  # the client's connection
        graph.with_suffix(".away").rename(graph)
        while supervisor.restarts < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert supervisor.restarts == 1 and server.process.pid != first_pid
        assert np.array_equal(client.infer("unirank", raw_inputs(REQUEST), client_timeout=10).as_numpy("item_ids"), expected)
        assert "tritonserver exited with code -9" in caplog.text
        assert (server.run_dir / "tritonserver.log.1").exists()  # the dead server's log, kept
    finally:
        client.close()
        stop.set()
        watcher.join()
        pid, stubs = server.process.pid, set(stub_pids(server.process.pid))
        prefix = server._shm_prefix
        server.stop()
    assert gone(pid) and all(gone(stub) for stub in stubs)
    assert not list(SHM_DIR.glob(f"{prefix}*"))
    assert not any(port_in_use(p) for p in server.ports.values())
