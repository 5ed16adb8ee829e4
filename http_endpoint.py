"""A tiny HTTP/1.0 GET endpoint on the event loop, for health checks and Prometheus scrapes:
one small response a request, no thread, no dependency. ``answer(path)`` gives the response."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

log = logging.getLogger("http")

REASONS = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}
Answer = tuple[int, bytes, str]  # status, body, content type


def response(code: int, body: bytes, content_type: str = "text/plain") -> bytes:
    return (f"HTTP/1.0 {code} {REASONS.get(code, '')}\r\nContent-Type: {content_type}\r\nContent-Length: "
            f"{len(body)}\r\nConnection: close\r\n\r\n").encode() + body


class Endpoint:
    """Listens on ``host:port`` (``start`` raises OSError when it cannot) and answers each
    GET with ``answer(path)``; the query string is not part of the path."""

    def __init__(self, answer: Callable[[str], Answer], host: str, port: int) -> None:
        self.answer, self.host, self.port = answer, host, port
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            parts = line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else ""
            writer.write(response(*self.answer(path)))
            await writer.drain()
        except (OSError, asyncio.TimeoutError, UnicodeError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
