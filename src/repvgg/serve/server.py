"""Running the app under uvicorn until a signal: SIGTERM or SIGINT stops accepting connections, the requests in
flight are answered, and the server exits 0 (a second signal stops at once: 130).

What one client can hold is bounded here, at the transport: a connection has ``header_timeout_s`` to send a
request's headers (idle and slowloris connections are closed, and never count against anything), and a server on a
loopback address answers only requests addressed to it (``Host``) and not posted from another site (``Origin``).
The bounds that protect the model (bodies being received, images being decoded or waiting) live in the app."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import resource
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from repvgg.serve.app import LOAD_THREAD
from repvgg.serve.config import ServeConfig
from repvgg.serve.routes import error_response

__all__ = ["FORCED_STOP", "make_server", "serve", "url"]

log = logging.getLogger(__name__)

#: The exit status after a second signal stopped the server without answering what was in flight (128 + SIGINT).
FORCED_STOP = 130
#: Host names a loopback server answers besides its ``allowed_hosts``.
LOOPBACK_NAMES = ("localhost",)


def serve(app: Any, config: ServeConfig, *, failures: list[str]) -> int:
    """Serve ``app`` on ``config.host:config.port`` until SIGTERM or SIGINT; 0 after a graceful stop,
    [`FORCED_STOP`][repvgg.serve.server.FORCED_STOP] after a second signal, 1 if the model failed to load
    (``failures`` collects what the app's ``on_failure`` reported). The model's runtime shares the cores with the
    server's threads ([`share_cores`][repvgg.io.onnx_run.share_cores])."""
    from repvgg.io.onnx_run import cores_shared, share_cores

    _raise_open_files_limit()
    sock = _bind(config.host, config.port)
    server = make_server(app, config, port=sock.getsockname()[1])
    app.state.stop = lambda: setattr(server, "should_exit", True)
    log.info("listening on %s (Ctrl-C or SIGTERM stops it after the requests in flight)",
             url(*sock.getsockname()[:2]))
    shared = cores_shared()
    share_cores()
    try:
        server.run(sockets=[sock])
    finally:
        share_cores(shared)  # as it was, for whatever else runs in this process
    status = FORCED_STOP if server.force_exit else 1 if failures else 0
    if any(thread.name == LOAD_THREAD and thread.is_alive() for thread in threading.enumerate()):
        _exit_now(status)
    return status


def _exit_now(status: int) -> None:
    """End the process at once, with ``status``: stopped while the model was still loading, whose native work (a
    compile) would abort the interpreter's finalization under it ("terminate called without an active exception")."""
    log.warning("stopped while the model was loading")
    for stream in (*logging.getLogger().handlers, sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def make_server(app: Any, config: ServeConfig, *, port: int) -> Any:
    """The uvicorn server for ``app``: header reads timed out, a loopback server's ``Host`` and ``Origin`` checked
    (``port`` is the one it listens on), signals as [`serve`][repvgg.serve.server.serve] says. Its records go to the
    process's logging as they are: uvicorn's own logging configuration (``dictConfig``) would close every handler the
    process has, another library's writing to a standard stream included."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn re-raises a caught signal after its graceful shutdown, so the process would die of SIGTERM;
            # a drained server has done what SIGTERM asks and exits 0
            if threading.current_thread() is not threading.main_thread():
                yield  # embedded in a thread: whoever started it stops it
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.should_exit:  # a second signal: stop now; the cancelled tasks' tracebacks are no news
                log.warning("stopping now: the requests in flight are dropped")
                logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
                self.force_exit = True
                return
            log.info("stopping: no new connections; answering the requests in flight (a second signal stops now)")
            super().handle_exit(sig, frame)

    if _is_loopback(config.host):
        app = _LoopbackOnly(app, hosts={*LOOPBACK_NAMES, *(h.lower() for h in config.allowed_hosts)})
    protocol = type("HeaderTimeoutProtocol", (_HeaderTimeoutProtocol,), {"header_timeout_s": config.header_timeout_s})
    return Server(uvicorn.Config(app, http=protocol, log_config=None, log_level="warning", timeout_graceful_shutdown=30,
                                 access_log=False, lifespan="on"))


def url(host: str, port: int) -> str:
    """The server's address as a URL (an IPv6 address in brackets)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with one more timer: a connection that has not sent a whole request's headers within
    ``header_timeout_s`` of connecting (or of the first byte of its next request) is closed. uvicorn times out only
    an idle keep-alive connection, so without it a client sending a byte a second holds its socket for ever."""

    header_timeout_s = 5.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        _no_delay(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # a request's headers are still to come (or half here)
            if self._header_timer is None and not self.transport.is_closing():
                self._arm_header_timer()
        else:
            self._cancel_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def _no_delay(transport: asyncio.Transport) -> None:
    """Send each write at once (``TCP_NODELAY``). asyncio sets it only on sockets made with ``IPPROTO_TCP``, not on
    those accepted from a listening socket made the usual way (protocol 0); there, Nagle's algorithm held an answer's
    body until the client acknowledged its headers, which a client delays by up to 40 ms: every request waited 40 ms
    (a lone /predict took 68 ms where the server's work was 22, docs/serving.md)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _LoopbackOnly:
    """ASGI wrapper of a server on a loopback address: a ``Host`` that is not a loopback name or address (nor one of
    ``hosts``) is refused with 421, so a site whose name resolves to 127.0.0.1 cannot read the server (DNS
    rebinding); a request other than GET or HEAD from a page of another origin is refused with 403."""

    def __init__(self, app: Any, *, hosts: set[str]) -> None:
        self.app, self.hosts = app, hosts
        self.state = app.state
        self._judged: dict[str, bool] = {}  # Host headers seen, and whether each is local (bounded)

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] == "http":
            host, origin = "", None
            for key, value in scope.get("headers") or ():
                if key == b"host":
                    host = value.decode("latin-1")
                elif key == b"origin":
                    origin = value
            problem = None
            if host and not self._local(host):
                problem = 421, f"this server answers requests to localhost, not to {host!r} (--allowed-hosts)"
            elif origin is not None and scope["method"] not in ("GET", "HEAD") and \
                    origin.decode("latin-1") != f"{scope.get('scheme', 'http')}://{host}":
                problem = 403, "a request from a page of another site is refused; send it from this server's page"
            if problem is not None:
                response = error_response(*problem)
                response.headers["Connection"] = "close"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _local(self, host: str) -> bool:
        if host not in self._judged:
            if len(self._judged) >= 1024:  # any number of names may be sent: only the latest are remembered
                self._judged.clear()
            self._judged[host] = self._judge(host)
        return self._judged[host]

    def _judge(self, host: str) -> bool:
        try:
            name = (urlsplit("//" + host).hostname or "").lower()
        except ValueError:
            return False
        return name in self.hosts or _is_loopback(name)


def _is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _raise_open_files_limit() -> None:
    """Raise the soft limit on open files to the hard one: every connection is a file, and an idle one holds it
    until its header timeout."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads, so a port in use is told at once (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror or err}; choose another --port or --host") \
            from None
    sock.listen(4096)  # connections are taken from now on (answered once the app has started)
    sock.set_inheritable(True)
    return sock
