"""A server that answers the probes at once: the share of a measured TTFT that is the probe client's own.

Usage: python bench/null_server.py PORT

``GET .../models`` lists one model; ``POST .../chat/completions`` answers every request with its whole
stream in one write: ``max_tokens`` one-character content chunks, a usage chunk and ``[DONE]``. No model,
no queue, no framework: the time a probe measures against it is what the probe's own client costs on
this machine (a new HTTP connection per request, its threads' share of the CPU), which a real server's
figures include too. ``bench/serve.py`` runs the probes against it beside the two servers.
"""

from __future__ import annotations

import asyncio
import json
import sys

MODEL = {"object": "list", "data": [{"id": "null", "object": "model", "owned_by": "bench"}]}


def chat_stream(request: dict) -> bytes:
    """The reply's whole event stream: ``max_tokens`` content chunks, usage, done."""
    tokens = int(request.get("max_tokens") or 16)
    head = {"id": "chatcmpl-null", "object": "chat.completion.chunk", "created": 0, "model": "null"}
    frames = [{**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]
    frames += [{**head, "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]}] * tokens
    frames.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
    frames.append({**head, "choices": [], "usage": {"prompt_tokens": 0, "completion_tokens": tokens,
                                                    "total_tokens": tokens}})
    return "".join(f"data: {json.dumps(frame)}\n\n" for frame in frames).encode() + b"data: [DONE]\n\n"


def response(status: str, content_type: str, body: bytes) -> bytes:
    return (f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body


async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """HTTP/1.1 requests on one connection, answered in order until the client closes it."""
    try:
        while True:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            method, path = head[0].split(" ")[:2]
            length = next((int(line.split(":", 1)[1]) for line in head[1:] if line.lower().startswith("content-length:")), 0)
            body = await reader.readexactly(length) if length else b""
            if method == "GET" and path.endswith("/models"):
                writer.write(response("200 OK", "application/json", json.dumps(MODEL).encode()))
            elif method == "POST" and path.endswith("/chat/completions"):
                writer.write(response("200 OK", "text/event-stream", chat_stream(json.loads(body))))
            else:
                writer.write(response("404 Not Found", "application/json", b'{"error": {"message": "not found"}}'))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(serve_connection, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
