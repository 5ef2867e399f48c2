"""Run the tritonserver bundled with nvidia-pytriton directly on a standard model repository.

Loopback only; gRPC, HTTP (health, metadata, statistics) and Prometheus metrics ports; waits until
the models are ready; stops with SIGTERM. The python backend's stub lives in an unusual place in
the wheel, so each server gets its own backend directory in a run folder (see SERVING-NOTES).
"""
from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from pathlib import Path

from unirank.serving.model_repository import validate_model_repository

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "triton_python_backend_shm_region_"
STUB_TIMEOUT_S = 10
KEPT_LOGS = 5  # a restart keeps the dead server's log as tritonserver.log.1 (older ones .2 ... .5)


class ServerError(RuntimeError):
    """tritonserver could not be started (or stopped) as asked."""


def triton_home() -> Path:
    """The tritonserver tree inside the nvidia-pytriton wheel."""
    import pytriton

    return Path(pytriton.__file__).parent / "tritonserver"


def port_in_use(port: int, host: str = HOST) -> bool:
    """True while a socket listens on (or is bound to) the port. Binds as tritonserver does, with
    SO_REUSEADDR: a connection of a dead server in TIME-WAIT (60 s after a kill -9 with a client
    connected) does not stop tritonserver from binding, so it does not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def port_owner(port: int) -> str | None:
    """"pid N (command line)" of the process listening on a local TCP port, when /proc tells."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                return f"pid {proc.name} ({command[:200]})"
        except OSError:
            continue
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_shm() -> list[str]:
    """Removes python-backend shared memory of servers whose launcher is gone (a kill -9 leaves it)."""
    removed = []
    for path in SHM_DIR.glob(f"{SHM_PREFIX}unirank_*"):
        match = re.match(rf"{SHM_PREFIX}unirank_(\d+)_", path.name)
        if match and not _pid_alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def _kill_group(pgid: int, timeout_s: float = 10.0) -> None:
    """SIGKILL to a process group (tritonserver runs in its own session) and wait until it is empty."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    """Any process of the group that is not a zombie."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the launcher dies, so that no tritonserver outlives it."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def free_port() -> int:
    """A port the OS considers free right now (for tests and benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _backend_directory(run_dir: Path, home: Path) -> Path:
    """<run_dir>/backends/python/ with the backend library, its utils and the Python 3.11 stub."""
    python_dir = run_dir / "backends" / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(home / "backends" / "python" / name, python_dir / name)
    stub = home / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / "triton_python_backend_stub"
    if not stub.exists():
        raise ServerError(f"no python backend stub for Python {sys.version_info[:2]} at {stub}")
    shutil.copy2(stub, python_dir / stub.name)
    return run_dir / "backends"


def _server_environment(home: Path) -> dict[str, str]:
    """PATH: the venv's bin first (the stub finds site-packages through it); LD_LIBRARY_PATH: the
    wheel's bundled libraries (the copied stub lost its RPATH) and this interpreter's libpython."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.prefix) / "bin"), env.get("PATH", "")])
    libs = [str(home.parent.parent / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR") or ""]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")])
    return env


class Server:
    """A tritonserver process on `repository`; use as a context manager or start()/stop().

    >>> with Server("runs/repo/python", grpc_port=8001) as server:
    ...     client = RankerClient(server.grpc_url, tokenizer)
    """

    def __init__(self, repository: str | Path, grpc_port: int = 8001, http_port: int = 8000,
                 metrics_port: int = 8002, startup_timeout_s: float = 120.0, log_verbose: int = 0,
                 run_dir: str | Path | None = None):
        self.repository = Path(repository).resolve()
        self.ports = {"grpc": grpc_port, "http": http_port, "metrics": metrics_port}
        self.startup_timeout_s = startup_timeout_s
        self.log_verbose = log_verbose
        self._own_run_dir = run_dir is None
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.process: subprocess.Popen | None = None
        # The launcher's pid in the prefix lets a later launcher remove what a killed one left.
        self._shm_prefix = f"{SHM_PREFIX}unirank_{os.getpid()}_{uuid.uuid4().hex[:8]}_"

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.ports['grpc']}"

    @property
    def http_url(self) -> str:
        return f"{HOST}:{self.ports['http']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.ports['metrics']}/metrics"

    @property
    def log_path(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / "tritonserver.log"

    def _rotate_logs(self) -> None:
        """tritonserver.log -> .1 -> .2 ...; the oldest beyond KEPT_LOGS is dropped."""
        for n in range(KEPT_LOGS - 1, 0, -1):
            older = self.log_path.with_name(f"{self.log_path.name}.{n}")
            if older.exists():
                older.replace(self.log_path.with_name(f"{self.log_path.name}.{n + 1}"))
        if self.log_path.exists():
            self.log_path.replace(self.log_path.with_name(f"{self.log_path.name}.1"))

    def command(self, backend_dir: Path) -> list[str]:
        home = triton_home()
        return [
            str(home / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={backend_dir}",
            f"--cache-directory={home / 'caches'}",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            # A request sent to a dead stub waits this long before failing, and the model's unload
            # (the supervisor's heal) waits for it: Triton's default is 30 s.
            f"--backend-config=python,stub-timeout-seconds={STUB_TIMEOUT_S}",
            f"--grpc-address={HOST}", f"--grpc-port={self.ports['grpc']}",
            f"--http-address={HOST}", f"--http-port={self.ports['http']}",
            f"--metrics-address={HOST}", f"--metrics-port={self.ports['metrics']}",
            "--allow-gpu-metrics=false",
            "--exit-on-error=true",
            # Explicit control: the supervisor (serving/supervisor.py) reloads models (new version,
            # dead stub) through the API while the old version keeps answering.
            "--model-control-mode=explicit", "--load-model=*",
            "--exit-timeout-secs=10",
            f"--log-verbose={self.log_verbose}",
        ]

    def start(self, keep_run_dir: bool = False) -> "Server":
        """Validates the repository, checks the ports, launches, and waits for readiness. A failed
        start stops what it launched; `keep_run_dir` keeps its log (the supervisor's restarts)."""
        validate_model_repository(self.repository)
        remove_stale_shm()
        taken = [f"{kind} port {port}" + (f" (held by {owner})" if (owner := port_owner(port)) else "")
                 for kind, port in self.ports.items() if port_in_use(port)]
        if taken:
            raise ServerError(f"{', '.join(taken)} already in use on {HOST}; choose other ports "
                              f"(e.g. --grpc-port/--http-port/--metrics-port) or stop the other server")
        if self.run_dir is None:
            self.run_dir = Path(tempfile.mkdtemp(prefix="unirank-triton-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._rotate_logs()
        home = triton_home()
        command = self.command(_backend_directory(self.run_dir, home))
        log.info("starting %s", " ".join(command))
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                            env=_server_environment(home), start_new_session=True,
                                            preexec_fn=_die_with_parent)
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop(keep_run_dir=keep_run_dir)
            raise
        return self

    def _wait_until_ready(self) -> None:
        import tritonclient.grpc as grpcclient

        deadline = time.monotonic() + self.startup_timeout_s
        with grpcclient.InferenceServerClient(self.grpc_url) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise ServerError(f"tritonserver exited with code {self.process.returncode} while starting "
                                      f"on {self.repository}:\n{self.log_excerpt()}")
                try:
                    if client.is_server_ready(client_timeout=2):
                        return
                except Exception:  # not listening yet
                    pass
                time.sleep(0.2)
        raise ServerError(f"tritonserver not ready after {self.startup_timeout_s:.0f} s:\n{self.log_excerpt()}")

    def log_excerpt(self, lines: int = 25) -> str:
        """Error lines of the server log (or its tail), for error messages."""
        if self.log_path is None:
            return "(no log)"
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        # CUDA/NVML/DCGM complaints are expected on CPU machines and hide the real error.
        noise = ("CUDA", "cuda", "NVML", "nvml", "DCGM", "GPU metrics", "Pinned memory")
        relevant = [l for l in text if l[:1] == "E" and not any(n in l for n in noise)]
        return "\n".join((relevant or text)[-lines:])

    def log_tail(self, lines: int = 10) -> str:
        """The last lines of the server log (a crash's signal and backtrace are not error lines)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, AttributeError):
            return "(no log)"

    def stop(self, timeout_s: float = 30.0, keep_run_dir: bool = False) -> None:
        """SIGTERM, wait, SIGKILL if needed; then SIGKILL to what is left of its process group (python
        backend stubs outlive a tritonserver killed with -9), and removes this server's shared-memory
        files and (unless `keep_run_dir`: a restart keeps the logs) its run dir."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver ignored SIGTERM for %.0f s; killing it", timeout_s)
                self.process.kill()
                self.process.wait()
        if self.process is not None:
            _kill_group(self.process.pid)
        for leftover in SHM_DIR.glob(f"{self._shm_prefix}*"):
            leftover.unlink(missing_ok=True)
        if self._own_run_dir and self.run_dir is not None and not keep_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
