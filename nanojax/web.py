"""A ChatGPT-like web page for a chat model, served by the standard library's HTTP server.

    server = make_server(Engine(model, tokenizer), "127.0.0.1", 8000)
    server.serve_forever()

The API is nanochat's chat_web's, so either side's page works with the other's server:
- GET /            the page (nanojax/web_ui.html)
- GET /health      {"status": "ok", "ready": true}
- POST /chat/completions  {"messages": [{"role": "user"|"assistant", "content": str}, ...],
  "temperature"?, "top_k"?, "max_tokens"?} answers as server-sent events, one per piece of text,
  `data: {"token": "..."}`, then `data: {"done": true}`; a bad request is a 400 with {"detail": "..."}.

One model answers one request at a time (the others wait for it); an answer whose client has gone stops.
"""

import errno
import json
import random
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from nanojax.common import UserError

PAGE = Path(__file__).with_name("web_ui.html")

# nanochat's limits on a request: a public page must not let one visitor hold the model for long.
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_CONVERSATION_CHARS = 32000
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_K_RANGE = (1, 200)
MAX_TOKENS_RANGE = (1, 4096)
MAX_BODY_BYTES = 2**20  # far above the longest conversation allowed, even with every character escaped


def check_request(body, defaults: dict) -> tuple[list[dict], dict]:
    """The messages and sampling settings of a /chat/completions body, or a UserError naming what is wrong."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        raise UserError('the body must be a JSON object with a non-empty "messages" list')
    messages = body["messages"]
    if len(messages) > MAX_MESSAGES:
        raise UserError(f"{len(messages)} messages: at most {MAX_MESSAGES} per request")
    total = 0
    for i, m in enumerate(messages, 1):  # numbered as the page shows them
        if not (isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)):
            raise UserError(f'message {i}: must be {{"role": "user" or "assistant", "content": a string}}')
        if not m["content"].strip():
            raise UserError(f"message {i} is empty")
        if len(m["content"]) > MAX_MESSAGE_CHARS:
            raise UserError(f"message {i} has {len(m['content']):,} characters: at most {MAX_MESSAGE_CHARS:,}")
        total += len(m["content"])
    if total > MAX_CONVERSATION_CHARS:
        raise UserError(f"the conversation has {total:,} characters: at most {MAX_CONVERSATION_CHARS:,}")
    if messages[-1]["role"] != "user":
        raise UserError("the last message must be the user's: the model answers it")
    sampling = dict(defaults)
    for name, (low, high), kind in [("temperature", TEMPERATURE_RANGE, float), ("top_k", TOP_K_RANGE, int),
                                    ("max_tokens", MAX_TOKENS_RANGE, int)]:  # fmt: skip
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            raise UserError(f"{name} must be a number from {low} to {high}, got {value!r}")
        if kind is int and value != int(value):
            raise UserError(f"{name} must be a whole number, got {value!r}")
        sampling[name] = kind(value)
    return messages, sampling


def prompt_for(tokenizer, messages: list[dict], max_positions: int, max_tokens: int) -> tuple[list[int], int]:
    """The conversation's ids ending in <|assistant_start|>, and the answer's room: max_tokens, or what
    is left of the model's positions (refused when nothing is)."""
    prompt = tokenizer.render_for_completion([*messages, {"role": "assistant", "content": ""}])
    room = max_positions - len(prompt) - 1  # and <|assistant_end|> after the answer
    if room < 1:
        raise UserError(f"the conversation fills the model's {max_positions} positions: start a new one")
    return prompt, min(max_tokens, room)


def make_server(engine, host: str, port: int, *, temperature=0.8, top_k=50, max_tokens=512, log=print):
    """A threading HTTP server for `engine` (an Engine with a tokenizer); the caller runs serve_forever.
    The sampling settings are the defaults a request may override."""
    defaults = {"temperature": temperature, "top_k": top_k, "max_tokens": max_tokens}
    model_lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            if self.path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, PAGE.read_bytes(), "text/html; charset=utf-8")
            elif self.path == "/health":
                self._send_json(HTTPStatus.OK, {"status": "ok", "ready": True})
            else:
                self._send_json(HTTPStatus.NOT_FOUND, {"detail": f"no page {self.path}"})

        def do_POST(self):
            if self.path != "/chat/completions":
                self._send_json(HTTPStatus.NOT_FOUND, {"detail": f"no endpoint {self.path}"})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if not 0 <= length <= MAX_BODY_BYTES:  # read as told, a bad length would hang or fill memory
                    raise UserError(f"Content-Length {length}: give the body's size, at most {MAX_BODY_BYTES:,} bytes")
                body = json.loads(self.rfile.read(length) or b"null")
                messages, sampling = check_request(body, defaults)
                prompt, sampling["max_tokens"] = prompt_for(
                    engine.tokenizer, messages, engine.max_positions, sampling["max_tokens"]
                )
            except (ValueError, UserError) as e:  # a body that is not JSON is a ValueError
                self.close_connection = True  # what is left of the body is no next request
                self._send_json(HTTPStatus.BAD_REQUEST, {"detail": str(e) if isinstance(e, UserError) else "not JSON"})
                return
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")  # the stream's end is the connection's
            self.end_headers()
            self.close_connection = True
            pieces = []
            with model_lock:
                # A fresh seed per request, as nanochat's server: a question asked again gets a new answer.
                try:
                    for piece in engine.stream(prompt, seed=random.randrange(2**31), **sampling):
                        pieces.append(piece)
                        self._event({"token": piece})
                    self._event({"done": True})
                except (BrokenPipeError, ConnectionResetError):  # the page was closed: free the model
                    pieces.append(" [client gone]")
            count = f"{len(messages)} message{'s' if len(messages) > 1 else ''}"
            log(f"{self.client_address[0]} | {count} | answered {''.join(pieces)[:200]!r}")

        def _event(self, data: dict) -> None:
            self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
            self.wfile.flush()

        def _send_json(self, status, data: dict) -> None:
            self._send(status, json.dumps(data).encode(), "application/json")

        def _send(self, status, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):  # the answers are logged above; not every request line
            pass

    try:
        return ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        not_here = isinstance(e, socket.gaierror) or e.errno == errno.EADDRNOTAVAIL  # no such address on this machine
        fix = "check --host" if not_here else "pick another --port"
        raise UserError(f"can't serve on {host}:{port} ({e.strerror}): {fix}") from None
