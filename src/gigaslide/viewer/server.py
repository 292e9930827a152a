"""Run the viewer with uvicorn on a socket bound here first (so a port in use is one clear line)."""

from __future__ import annotations

import errno
import socket
import threading
import time
from collections.abc import Callable

from gigaslide.errors import GigaslideError


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port`` 0 picks a free one)."""
    if not 0 <= int(port) <= 65535:  # getaddrinfo would wrap 70000 to 4464 and call -1 an unknown host
        raise GigaslideError(f"port {port} is not a TCP port (0-65535)",
                             fix="pass e.g. --port 8765 (0 picks a free one)")
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise GigaslideError(f"cannot resolve host '{host}' ({e.strerror})", fix="use --host 127.0.0.1") from None
    sock = socket.socket(info[0], socket.SOCK_STREAM, socket.IPPROTO_TCP)
    # no Nagle: a tile answer is written as headers + body, and the client's delayed ACK would add ~40 ms to each
    # (asyncio sets this only on sockets it creates; accepted sockets inherit it from this one on Linux)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind(info[4])
        sock.listen(128)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise GigaslideError(f"port {port} on {host} is already in use",
                                 fix=f"pass another port (--port {port + 1}) or stop the program using it") from None
        raise GigaslideError(f"cannot listen on {host}:{port} ({e.strerror})", fix="use --host 127.0.0.1 and a port above 1024") from None
    return sock


class Server:
    """uvicorn serving ``app`` on an already bound socket; :meth:`run` blocks until Ctrl-C,
    :meth:`start` runs it in a thread (tests, benchmarks) and :meth:`stop` ends it."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 8765, log_level: str = "warning"):  # noqa: ANN001
        import uvicorn  # the server only when one is started

        self.sock = bind(host, port)
        self.host = host
        self.port = int(self.sock.getsockname()[1])
        self._server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="off"))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self, on_ready: Callable[[str], None] | None = None) -> None:
        if on_ready:
            on_ready(self.url)
        try:
            self._server.run(sockets=[self.sock])
        finally:
            self.sock.close()

    def start(self) -> Server:
        # uvicorn installs no signal handlers outside the main thread
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self._thread.start()
        t0 = time.monotonic()
        while not self._server.started and time.monotonic() - t0 < 20:
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.sock.close()
