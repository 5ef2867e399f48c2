"""`unirank serve`: one tritonserver kept answering. Every `poll_s` the supervisor checks

- tritonserver itself: if it exited, its error and last log lines are copied into our log (its own
  log is kept: tritonserver.log.1 ... .5 in the run folder) and it is started again (same ports)
  after a bounded exponential backoff (0.5 s doubling, at most max_backoff_s); a failed start is
  logged and tried again, for as long as the supervisor runs;
- the python-backend stubs (children of tritonserver, one per model version and instance): when one
  dies, Triton keeps reporting the model ready while every request fails ("Stub process ... is not
  healthy"); the supervisor unloads and loads the model, which starts new stubs. A stub counts as
  dead only while its version is still READY: the old version's stubs exit normally during a swap;
- the repository: a new or changed version directory is loaded once its files stopped changing
  for one poll; Triton keeps answering from the old version until the new one is ready.

tritonserver dies with the supervisor (PR_SET_PDEATHSIG, serving/server.py); its stubs are killed
with it (its process group) when it stops or is restarted.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

from unirank.serving.server import Server

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


def stub_pids(pid: int) -> dict[int, tuple[str, str, str]]:
    """{stub pid: (model, version, instance)} of the python-backend stubs that tritonserver `pid`
    started. A stub's command line is `stub <repository>/<model>/<version>/model.py <shm> ... <instance> ...`."""
    stubs = {}
    for child in child_pids(pid):
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if STUB_NAME in argv[0] and len(argv) > 8:
            model_file = Path(argv[1])
            stubs[child] = (model_file.parent.parent.name, model_file.parent.name, argv[8])
    return stubs


def version_states(client, timeout_s: float | None = None) -> dict[tuple[str, str], str]:
    """{(model, version): state} from Triton's repository index (READY, UNLOADING, UNAVAILABLE, ...)."""
    index = client.get_model_repository_index(as_json=True, client_timeout=timeout_s).get("models", [])
    return {(m["name"], m.get("version", "")): m.get("state", "") for m in index}


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
    """Every call to Triton carries a deadline, so a hung server cannot stall the poll loop: the
    repository index `index_timeout_s`, each model load or unload `load_timeout_s` (a load builds
    ONNX Runtime sessions, seconds for a large graph). A call past its deadline counts as failed."""

    def __init__(self, server: Server, poll_s: float = 0.5, max_backoff_s: float = 30.0, stable_s: float = 60.0,
                 index_timeout_s: float = 10.0, load_timeout_s: float = 300.0):
        self.server = server
        self.index_timeout_s, self.load_timeout_s = index_timeout_s, load_timeout_s
        self.poll_s = poll_s
        self.max_backoff_s = max_backoff_s
        self.stable_s = stable_s  # up this long: the next failure starts the backoff afresh
        self.restarts = 0
        self.failed_restarts = 0
        self.reloads = 0
        self.heals = 0
        self._unhealed: set[str] = set()  # a heal that failed is tried again next poll
        self._stubs: dict[int, tuple[str, str, str]] = {}
        self._loaded: dict[str, tuple] = {}
        self._seen: dict[str, tuple] = {}

    def start(self) -> None:
        before = repository_state(self.server.repository)
        self.server.start()
        self._after_start(before)

    def _after_start(self, before: dict[str, tuple]) -> None:
        """`before`: the repository as it was before the start. A version copied in while the
        server was starting may not have been loaded; it differs from `before`, so it is loaded."""
        self._stubs = stub_pids(self.server.process.pid)
        self._unhealed = set()
        self._loaded = self._seen = before
        self._up_since = time.monotonic()

    def run(self, stop: threading.Event) -> None:
        """Watches until `stop` is set; the server must have been started. Nothing but `stop` ends it:
        a poll that fails is logged and the next poll tries again."""
        failures = 0  # failed starts (and crashes within stable_s of a start) since the server was last up for good
        down = False  # the exit was seen and logged; restarts are being tried
        while not stop.wait(self.poll_s):
            try:
                if self.server.process.poll() is not None:
                    if not down:
                        down = True
                        failures = 0 if time.monotonic() - self._up_since > self.stable_s else failures
                        self._log_exit()
                    failures, down = self._restart(failures, stop)
                    continue
                self._check_stubs()
                self._check_repository()
            except Exception:  # keep supervising: a poll that failed is tried again
                log.exception("supervisor poll failed")

    def _log_exit(self) -> None:
        """The dead server's error lines and last lines into our log (its log is kept, rotated)."""
        log.error("tritonserver exited with code %s (its log: %s); error lines:\n%s\nlast lines:\n%s",
                  self.server.process.returncode, self.server.log_path, self.server.log_excerpt(),
                  self.server.log_tail())

    def _restart(self, failures: int, stop: threading.Event) -> tuple[int, bool]:
        """One start attempt after a bounded exponential backoff (0.5 s doubling up to max_backoff_s):
        returns (failures, still down). A failed start (busy port, bad repository, readiness
        timeout) is logged and tried again by the next poll, for as long as the supervisor runs."""
        delay = min(self.max_backoff_s, 0.5 * 2 ** failures)
        log.warning("restarting tritonserver in %.1f s (attempt %d)", delay, failures + 1)
        if stop.wait(delay):
            return failures, True
        self.server.stop(keep_run_dir=True)
        try:
            before = repository_state(self.server.repository)
            self.server.start(keep_run_dir=True)
        except Exception as err:  # anything a start can raise: ServerError, InvalidModelRepository, OSError
            self.failed_restarts += 1
            log.error("restart attempt %d failed (%d failed restarts): %s", failures + 1, self.failed_restarts, err)
            return failures + 1, True
        self.restarts += 1
        self._after_start(before)
        log.warning("tritonserver restarted (%d restarts)", self.restarts)
        return failures + 1, False  # a server that crashes again within stable_s backs off further

    def _check_stubs(self) -> None:
        alive = stub_pids(self.server.process.pid)
        missing = {pid: key for pid, key in self._stubs.items() if pid not in alive}
        if missing or self._unhealed:
            import tritonclient.grpc as grpcclient

            try:
                with grpcclient.InferenceServerClient(self.server.grpc_url) as client:
                    states = version_states(client, self.index_timeout_s)
            except Exception as err:  # server busy or going down: look again next poll
                log.warning("repository index unavailable: %s", err)
                return
            dead = {pid: key for pid, key in missing.items() if states.get(key[:2]) == "READY"}
            if dead:
                log.warning("python backend stub(s) %s died while their version was READY",
                            sorted(f"{pid} {'/'.join(key)}" for pid, key in dead.items()))
            names = sorted({key[0] for key in dead.values()} | self._unhealed)
            if names:
                self._unhealed = self._heal(names)
                alive = stub_pids(self.server.process.pid)
        self._stubs = alive

    def _check_repository(self) -> None:
        state = repository_state(self.server.repository)
        changed = [name for name in state if state[name] != self._loaded.get(name)]
        stable = [name for name in changed if state[name] == self._seen.get(name)]
        self._seen = state
        if stable:
            log.info("model repository changed: loading %s", stable)
            self._reload(stable)
            self._loaded = {**self._loaded, **{name: state[name] for name in stable}}
            self._stubs = stub_pids(self.server.process.pid)  # the old version's stubs may still be exiting

    def _reload(self, names: list[str]) -> None:
        """Loads each changed model; the current version answers until the new one is ready."""
        import tritonclient.grpc as grpcclient

        with grpcclient.InferenceServerClient(self.server.grpc_url) as client:
            for name in names:
                try:
                    client.load_model(name, client_timeout=self.load_timeout_s)
                    self.reloads += 1
                    log.info("model %s loaded (%d reloads)", name, self.reloads)
                except Exception as err:  # keep watching; the old version (if any) keeps answering
                    log.error("loading model %s failed: %s", name, err)

    def _heal(self, names: list[str]) -> set[str]:
        """Unload, then load: Triton skips a load whose files and config did not change, so a
        plain (re)load would leave the dead stub in place. The load is sent at once: an instance
        whose stub died stays UNLOADING for good (measured: still UNLOADING 30 s later), while a
        load sent meanwhile is ready in ~1.5 s. The model answers NOT_FOUND "no available versions"
        in between (the client retries it). Returns the models that could not be healed."""
        import tritonclient.grpc as grpcclient

        failed = set()
        with grpcclient.InferenceServerClient(self.server.grpc_url) as client:
            for name in names:
                started = time.monotonic()
                try:
                    client.unload_model(name, client_timeout=self.load_timeout_s)
                    client.load_model(name, client_timeout=self.load_timeout_s)
                    self.heals += 1
                    log.warning("model %s healed in %.1f s (%d heals)", name, time.monotonic() - started, self.heals)
                except Exception as err:
                    log.error("healing model %s failed (trying again next poll): %s", name, err)
                    failed.add(name)
        return failed

def supervise(server: Server, stop: threading.Event, poll_s: float = 0.5) -> Supervisor:
    supervisor = Supervisor(server, poll_s)
    supervisor.start()
    print(f"tritonserver ready: gRPC {server.grpc_url}, HTTP {server.http_url}, metrics {server.metrics_url} "
          f"(supervised, pid {os.getpid()})", flush=True)
    supervisor.run(stop)
    return supervisor


def serve(repository: str | Path, grpc_port: int = 8001, http_port: int = 8000, metrics_port: int = 8002,
          startup_timeout_s: float = 120.0, log_verbose: int = 0, poll_s: float = 0.5) -> int:
    """Blocking: start tritonserver under a Supervisor (restarts, stub reloads, new versions; see
    serving/supervisor.py), print the endpoints, run until Ctrl-C / SIGTERM, stop cleanly. Returns 0."""
    server = Server(repository, grpc_port, http_port, metrics_port, startup_timeout_s, log_verbose)
    stop = threading.Event()

    def _terminate(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        supervise(server, stop, poll_s)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM, also while starting
        print("tritonserver stopped", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.stop()
    return 0
