"""Running the app under uvicorn until a signal: SIGTERM or SIGINT stops accepting connections, the requests in
flight are answered, and the server exits 0."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
from collections.abc import Iterator
from typing import Any

__all__ = ["serve"]

log = logging.getLogger(__name__)


def serve(app: Any, host: str, port: int, *, failures: list[str], max_connections: int) -> int:
    """Serve ``app`` on ``host:port`` until SIGTERM or SIGINT; 0 after a graceful stop, 1 if the model failed to load
    (``failures`` collects what the app's ``on_failure`` reported). Beyond ``max_connections`` open connections a new
    one is answered 503 at once: what the requests' bodies hold in memory is bounded."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn re-raises a caught signal after its graceful shutdown, so the process would die of SIGTERM;
            # a drained server has done what SIGTERM asks and exits 0
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

    sock = _bind(host, port)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30, access_log=False,
                            limit_concurrency=max_connections)
    server = Server(config)
    app.state.stop = lambda: setattr(server, "should_exit", True)
    bound = sock.getsockname()
    log.info("listening on http://%s:%d (Ctrl-C or SIGTERM stops it after the requests in flight)", *bound[:2])
    server.run(sockets=[sock])
    return 1 if failures else 0


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
    sock.listen(2048)  # connections are taken from now on (answered once the app has started)
    sock.set_inheritable(True)
    return sock
