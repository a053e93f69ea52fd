"""Running the application under uvicorn on a socket bound beforehand (so a taken port is a
one-line user error, and --port 0 picks a free one), with a graceful SIGTERM: uvicorn stops
accepting, lets the requests in flight finish, then the app's worker drains its queue."""

from __future__ import annotations

import signal
import socket

from clipkit.config import ConfigError

BACKLOG = 2048  # uvicorn's default


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say
    # they are TCP, and with Nagle on, a response's body waits ~40 ms for the ACK of its headers.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.listen(BACKLOG)  # from now on connections wait in the backlog until uvicorn accepts
    sock.set_inheritable(True)
    return sock


def run_server(app, sock: socket.socket, log_level: str = "warning", access_log: bool = False):
    """Serve until SIGTERM / SIGINT; returns after a clean shutdown."""
    import uvicorn

    config = uvicorn.Config(
        app, log_level=log_level, access_log=access_log, timeout_graceful_shutdown=30
    )
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal it handled once it has shut down; with these handlers that
    # re-raise is a no-op, so a server stopped by SIGTERM / Ctrl-C exits 0 instead of dying by
    # the signal after its clean shutdown.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
