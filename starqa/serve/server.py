"""The `starqa serve` command: one server per store, the model loaded once, a Unix socket in the store (and TCP
with an API key), uvicorn running the app until SIGTERM or Ctrl-C.

Start-up refuses, each with one line and before the model is loaded: several processes (--nproc > 1: keeping N
ranks alive is not implemented, and a server that silently used one GPU of four would be worse), TCP without an
API key, a second server on the same store (a lock held for the server's life), and a socket path that something
still answers on. A socket file left by a killed server (nothing answers on it) is removed.

Stopping: the first SIGTERM or Ctrl-C stops accepting asks; those waiting are told they were not answered (the CLI
then answers them in its own process), the ones being answered finish; a second signal cancels them. The socket
is removed; the exit code is 0 after SIGTERM, 130 after Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import socket
import stat
import threading
import time
from pathlib import Path

import uvicorn

from starqa import report
from starqa.errors import StarqaError, UsageError
from starqa.serve import protocol

# Seconds a stopping server gives the answers in flight before it cancels them.
GRACE_S = 60


def serve(settings, *, trust_remote_code: bool, host: str | None, port: int | None, api_key: str | None,
          debug: bool) -> int:
    from filelock import FileLock, Timeout

    if host is not None and port is None:
        raise UsageError("--host needs --port (the server listens on its Unix socket only unless given a port)")
    if port is not None:
        if not 1 <= port <= 65535:
            raise UsageError(f"--port must be a TCP port from 1 to 65535, not {port}")
        host = host or "127.0.0.1"
        if not api_key and not _scoped_keys(settings):
            raise UsageError(f"listening on TCP ({host}:{port}) needs an API key: pass --api-key KEY, set "
                             "STARQA_API_KEY, or add a scoped key with `starqa keys add` (without --port the server "
                             "listens on the store's Unix socket only)")
    from starqa.engine.distributed import requested_nproc  # (torch: after the checks above, which are instant)
    from starqa.store.document_store import DocumentStore

    nproc = requested_nproc(settings.nproc, settings.device)
    if nproc > 1:
        raise UsageError(f"starqa serve runs one process on one device, and --nproc {settings.nproc} asks for "
                         f"{nproc}: serving on several GPUs is not supported yet; pass --nproc 1 (and --device "
                         "cuda:N to choose the GPU)")
    store = DocumentStore(settings.store)
    path = protocol.socket_path(store.root)
    lock = FileLock(str(store.root / protocol.LOCK_NAME), mode=0o600)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise StarqaError(f"a starqa server is already running on the store {store.root} (socket {path}); stop it "
                          "first, or ask it questions") from None
    try:
        _remove_stale_socket(path)
        tcp = _listen_tcp(host, port) if port is not None else None  # a busy port fails before the model loads
        try:
            return _run(settings, store, path, tcp, trust_remote_code=trust_remote_code, api_key=api_key,
                        debug=debug)
        finally:
            if tcp is not None:
                tcp.close()
    finally:
        lock.release()


def _run(settings, store, path: Path, tcp: socket.socket | None, *, trust_remote_code: bool, api_key: str | None,
         debug: bool) -> int:
    from starqa.engine.star_engine import StarEngine
    from starqa.governance.keys import KeyRing
    from starqa.serve.access import PeerH11Protocol
    from starqa.serve.app import create_app
    from starqa.serve.worker import Worker

    # The engine thread loads the model, then decodes with it: one thread runs the parallel work, as in `starqa
    # ask`'s own process (see starqa.serve.worker).
    worker = Worker(lambda: StarEngine.from_settings(settings, None, trust_remote_code=trust_remote_code,
                                                     on_status=report.info),
                    settings, store, trust_remote_code=trust_remote_code, log=_log, debug=debug)
    worker.start()
    engine = worker.engine
    unix = _listen_unix(path)
    inode = os.stat(path).st_ino
    try:
        held: dict = {}  # the server, once made: the app counts its open connections (max_connections)
        app = create_app(worker, api_key=api_key, log=_log, keys=KeyRing(store.root, log=_log),
                         open_connections=lambda: len(held["server"].server_state.connections))
        config = uvicorn.Config(app, http=PeerH11Protocol, lifespan="off",
                                log_level="warning", access_log=False, timeout_graceful_shutdown=GRACE_S)
        server = held["server"] = _Server(config, worker)
        where = f"{path}" + (f" and http://{_address(tcp)}" if tcp is not None else "")
        report.info(f"serving {engine.model_name} ({str(engine.dtype).removeprefix('torch.')}, {engine.device}) "
                    f"on {where}; KV memory up to {report.human_bytes(settings.max_kv_memory)}")
        asyncio.run(server.serve(sockets=[unix] + ([tcp] if tcp is not None else [])))
    finally:
        worker.stop(cancel_running=True)
        worker.join(timeout=10)
        unix.close()
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == inode:  # ours (a path reused meanwhile is left alone)
                os.unlink(path)
    if server.stopped_by == signal.SIGINT:
        report.info("stopped (Ctrl-C)")
        return 130
    report.info("stopped")
    return 0


class _Server(uvicorn.Server):
    """uvicorn's Server with our own signal handling: the worker is told first (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, worker) -> None:
        super().__init__(config)
        self.worker = worker
        self.stopped_by: int | None = None

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = asyncio.get_running_loop()

        def handle(signum, frame) -> None:
            second = self.stopped_by is not None
            self.stopped_by = self.stopped_by or signum
            self.should_exit = True
            self.force_exit = second
            # Not in the handler itself, which may have interrupted code that holds the worker's lock.
            loop.call_soon_threadsafe(self.worker.stop, second)

        previous = {signum: signal.signal(signum, handle) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _scoped_keys(settings) -> bool:
    """Whether the store has a scoped key that is not revoked (starqa.governance.keys): TCP may then be served without
    --api-key."""
    from starqa.governance.keys import read_keys
    from starqa.store.root import store_root

    return any(key.revoked is None for key in read_keys(store_root(settings.store)))


def _log(message: str) -> None:
    """One line of the server's log; what a client sent in it is escaped (a path with %0A forges no line)."""
    from starqa.serve.limits import one_line

    report.info(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {one_line(message)}")


def _remove_stale_socket(path: Path) -> None:
    """A socket file nobody answers on (its server was killed) is removed; anything else there is refused."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StarqaError(f"{path} exists and is not a socket: remove it, then start the server again")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(protocol.unix_address(path))
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # left by a server that was killed
        return
    except OSError as exc:
        raise StarqaError(f"cannot tell whether a server answers on {path} ({exc.strerror}); remove it if none "
                          "does, then start the server again") from None
    finally:
        probe.close()
    raise StarqaError(f"another server already answers on {path}; stop it first")


def _listen_unix(path: Path) -> socket.socket:
    """The store's socket, created 0600 (never wider, not even for a moment): only the store's owner connects."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous = os.umask(0o177)
    try:
        sock.bind(protocol.unix_address(path))
    finally:
        os.umask(previous)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


def _listen_tcp(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        raise StarqaError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    if not ipaddress.ip_address(address[0]).is_loopback:
        report.warn(f"listening on {host}:{port}, which other machines can reach: every request needs the API key, "
                    "and nothing is encrypted (put a TLS proxy in front of it beyond a trusted network)")
    return sock


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
