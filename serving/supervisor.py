"""`unirank serve`: one tritonserver kept answering. Every `poll_s` the supervisor checks

- tritonserver itself: if it exited, it is started again (same ports) after a bounded exponential
  backoff, each attempt logged;
- the python-backend stubs (children of tritonserver): when one dies, Triton keeps reporting the
  model ready while every request fails ("Stub process ... is not healthy"); the supervisor
  reloads the model, which starts new stubs;
- the repository: a new or changed version directory is loaded once its files stopped changing
  for one poll; Triton keeps answering from the old version until the new one is ready.

tritonserver dies with the supervisor (PR_SET_PDEATHSIG, serving/server.py).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from unirank.serving.server import Server, ServerError

log = logging.getLogger(__name__)

STUB_NAME = "triton_python_backend_stub"


def child_pids(pid: int) -> set[int]:
    children = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            continue
    return children


def stub_pids(pid: int) -> set[int]:
    """The python-backend stubs that tritonserver `pid` started."""
    stubs = set()
    for child in child_pids(pid):
        try:
            if STUB_NAME in Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace"):
                stubs.add(child)
        except OSError:
            continue
    return stubs


def repository_state(root: Path) -> dict[str, tuple]:
    """{model name: (path, size, mtime) of every file}: what a new version copied in changes."""
    state = {}
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(p for p in model_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        state[model_dir.name] = tuple((str(p.relative_to(model_dir)), *_size_mtime(p)) for p in files)
    return state


def _size_mtime(path: Path) -> tuple[int, int]:
    try:
        stat = path.stat()
    except OSError:
        return (-1, -1)
    return (stat.st_size, stat.st_mtime_ns)


class Supervisor:
    def __init__(self, server: Server, poll_s: float = 0.5, max_backoff_s: float = 30.0, stable_s: float = 60.0):
        self.server = server
        self.poll_s = poll_s
        self.max_backoff_s = max_backoff_s
        self.stable_s = stable_s  # up this long: the next failure starts the backoff afresh
        self.restarts = 0
        self.reloads = 0
        self._stubs: set[int] = set()
        self._loaded: dict[str, tuple] = {}
        self._seen: dict[str, tuple] = {}

    def start(self) -> None:
        self.server.start()
        self._after_start()

    def _after_start(self) -> None:
        self._stubs = stub_pids(self.server.process.pid)
        self._loaded = self._seen = repository_state(self.server.repository)
        self._up_since = time.monotonic()

    def run(self, stop: threading.Event) -> None:
        """Watches until `stop` is set; the server must have been started."""
        failures = 0
        while not stop.wait(self.poll_s):
            if self.server.process.poll() is not None:
                if time.monotonic() - self._up_since > self.stable_s:
                    failures = 0
                failures = self._restart(failures, stop)
                continue
            self._check_stubs()
            self._check_repository()

    def _restart(self, failures: int, stop: threading.Event) -> int:
        code = self.server.process.returncode
        delay = min(self.max_backoff_s, 0.5 * 2 ** failures)
        log.warning("tritonserver exited with code %s; restarting in %.1f s:\n%s", code, delay, self.server.log_excerpt())
        if stop.wait(delay):
            return failures
        self.server.stop()
        try:
            self.server.start()
        except ServerError as err:
            log.error("restart failed: %s", err)
            return failures + 1
        self.restarts += 1
        self._after_start()
        log.warning("tritonserver restarted (%d restarts)", self.restarts)
        return failures + 1

    def _check_stubs(self) -> None:
        alive = stub_pids(self.server.process.pid)
        dead = self._stubs - alive
        if not dead:
            self._stubs |= alive
            return
        log.warning("python backend stub(s) %s died: model(s) not ready; reloading", sorted(dead))
        self._reload(list(self._loaded))
        self._stubs = stub_pids(self.server.process.pid)

    def _check_repository(self) -> None:
        state = repository_state(self.server.repository)
        changed = [name for name in state if state[name] != self._loaded.get(name)]
        stable = [name for name in changed if state[name] == self._seen.get(name)]
        self._seen = state
        if stable:
            log.info("model repository changed: loading %s", stable)
            self._reload(stable)
            self._loaded = {**self._loaded, **{name: state[name] for name in stable}}
            self._stubs = stub_pids(self.server.process.pid)

    def _reload(self, names: list[str]) -> None:
        """Loads each model again; the current version answers until the new instances are ready.
        Triton skips a load whose files did not change, so the model's own config is passed as an
        override: a dead stub is replaced even when nothing changed on disk."""
        import tritonclient.grpc as grpcclient

        with grpcclient.InferenceServerClient(self.server.grpc_url) as client:
            for name in names:
                try:
                    config = client.get_model_config(name, as_json=True)["config"]
                    client.load_model(name, config=json.dumps(config))
                    self.reloads += 1
                    log.info("model %s loaded (%d reloads)", name, self.reloads)
                except Exception as err:  # keep watching; the old version (if any) keeps answering
                    log.error("loading model %s failed: %s", name, err)


def supervise(server: Server, stop: threading.Event, poll_s: float = 0.5) -> Supervisor:
    supervisor = Supervisor(server, poll_s)
    supervisor.start()
    print(f"tritonserver ready: gRPC {server.grpc_url}, HTTP {server.http_url}, metrics {server.metrics_url} "
          f"(supervised, pid {os.getpid()})", flush=True)
    supervisor.run(stop)
    return supervisor
