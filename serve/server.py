"""Run the app under hypercorn (programmatically), with graceful shutdown on SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Awaitable, Callable

from hypercorn.asyncio import serve
from hypercorn.config import Config
from quart import Quart

log = logging.getLogger("flaxchat.server")


def hypercorn_config(host: str, port: int) -> Config:
    """hypercorn's settings. A connection must complete a request's headers within ``keep_alive_timeout``
    (5 s) of going idle, so a client trickling its headers is cut off; a trickled body meets the app's body
    timeout (``ServerSettings.read_timeout``: 408). hypercorn's own ``read_timeout`` stays off: it counts
    silence on the socket even while a request is being answered, and would cut a long generation."""
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.graceful_timeout = 10.0
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


async def run_app(app: Quart, host: str, port: int, shutdown_trigger: Callable[[], Awaitable[None]]) -> None:
    await serve(app, hypercorn_config(host, port), shutdown_trigger=shutdown_trigger)


def serve_until_signalled(app: Quart, host: str, port: int, on_signal: Callable[[], None] | None = None) -> None:
    """Serve until SIGINT/SIGTERM; hypercorn then stops accepting and lets in-flight requests finish (for up to
    its graceful timeout). ``on_signal`` runs first (the engine's ``drain``: queued requests get a 503 at
    once, so their clients can go elsewhere instead of waiting out the timeout)."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def stopping() -> None:
            if on_signal is not None:
                on_signal()
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping)
        await run_app(app, host, port, stop.wait)

    asyncio.run(main())


class BackgroundServer:
    """The real server on a loopback port in a thread (tests, notebooks)."""

    def __init__(self, app: Quart, host: str = "127.0.0.1", port: int = 0):
        import socket

        if port == 0:
            with socket.socket() as probe:
                probe.bind((host, 0))
                port = probe.getsockname()[1]
        self.app, self.host, self.port = app, host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = threading.Event()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()

            @self.app.before_serving
            async def _ready() -> None:
                self._started.set()

            await run_app(self.app, self.host, self.port, self._stop.wait)

        asyncio.run(main())

    def start(self) -> "BackgroundServer":
        """Start serving; returns once the port accepts connections (Quart's startup hook runs before hypercorn
        binds the socket, so a client sent off at that hook alone could be refused)."""
        import socket
        import time

        self._thread.start()
        if not self._started.wait(30):
            raise RuntimeError("server did not start")
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                return self
            except OSError:
                if not self._thread.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not listen on {self.url}") from None
                time.sleep(0.01)

    def stop(self) -> None:
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
