"""A small local chat server (stdlib ``ThreadingHTTPServer``) streaming replies as Server-Sent Events.

    python -m colossal_llama.eval.web --model_path M [--port 8000 | --port 0 for a free port]

Routes:
  GET  /            the chat page (``chat.html``)
  GET  /api/info    ``{"model", "template", "max_new_tokens"}``
  POST /api/chat    body ``{"messages": [{"from": "human"|"assistant", "content"}, ...]}`` (a ``"system"`` message
                    may come first) ending with a human turn; answers ``text/event-stream`` events
                    ``{"delta": str}`` ... then ``{"done": true, "dropped_exchanges": n}`` (or ``{"error": str}``).
                    A malformed conversation is HTTP 400 ``{"error": "messages[1].from: ..."}``.
The server is stateless: the page sends the whole conversation each turn. The history is trimmed by whole
exchanges to fit the context (a system message kept), exactly as :class:`ChatSession` does in the terminal. One
generation runs at a time (a lock), so concurrent users queue instead of fighting over the CPU/GPU; a page that
goes away stops its generation at the next token, freeing the model for the next user.
"""
from __future__ import annotations

import argparse
import json
import logging
import threading
from dataclasses import dataclass, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, List, Optional

from colossal_llama.inference.chat import drop_empty_exchanges, fit_history, without_reply_prefix
from colossal_llama.inference.generation import SamplingConfig, generate_stream
from colossal_llama.inference.loading import context_length
from colossal_llama.utils.cli import OneLineErrorParser
from colossal_llama.utils.errors import UserInputError, cli_entry

log = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("chat.html")
MAX_BODY_BYTES = 4 << 20


@dataclass
class ChatBackend:
    """Everything a request needs to answer: model, tokenizer, chat template and sampling settings."""

    model: object
    tokenizer: object
    template: object
    sampling: SamplingConfig
    model_name: str = "model"
    max_context: Optional[int] = None

    def __post_init__(self):
        stops = list(dict.fromkeys([*self.sampling.stop_token_ids, *self.template.stop_token_ids]))
        self.sampling = replace(self.sampling, stop_token_ids=stops)
        self.max_context = self.max_context or context_length(self.model)
        self.lock = threading.Lock()

    def prompt_ids(self, messages) -> tuple:
        """Prompt ids for a conversation ending with a human turn, and how many exchanges were dropped (blank
        replies or ones spelling a special token of the template, then the oldest to fit the context). A malformed
        conversation (not a list of turns, a bad role or field) is a located :class:`UserInputError`, before
        anything else reads it (HTTP 400)."""
        messages, empty = drop_empty_exchanges(messages, self.template)
        ids, _, trimmed = fit_history(self.template, messages, self.max_context - self.sampling.max_new_tokens)
        return ids, empty + trimmed

    def stream(self, prompt_ids: List[int]) -> Iterator[str]:
        """The reply's pieces, one generation at a time (the lock); ``close()`` it to stop early."""
        with self.lock:  # less the template's reply prefix, as the terminal chat (the page keeps the history)
            yield from without_reply_prefix(generate_stream(self.model, self.tokenizer, prompt_ids, self.sampling),
                                            self.template.reply_prefix)


def _sse(payload: dict) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode("utf-8")


class ChatHandler(BaseHTTPRequestHandler):
    backend: ChatBackend  # set on the subclass made by make_server
    protocol_version = "HTTP/1.0"  # each response ends by closing the connection: simple streaming

    def log_message(self, fmt, *args):  # route the access log through logging instead of stderr
        log.info("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: dict) -> None:
        self._send(status, json.dumps(payload, ensure_ascii=False).encode("utf-8"), "application/json")

    def do_GET(self):
        if self.path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, PAGE.read_bytes(), "text/html; charset=utf-8")
        elif self.path == "/api/info":
            b = self.backend
            self._json(HTTPStatus.OK, {"model": b.model_name, "template": b.template.name,
                                       "max_new_tokens": b.sampling.max_new_tokens})
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no route {self.path}"})

    def _read_messages(self) -> list:
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY_BYTES:
            raise UserInputError(f"request body must be 1..{MAX_BODY_BYTES} bytes, got {length}")
        try:
            body = json.loads(self.rfile.read(length).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserInputError(f"request body is not JSON ({err})") from None
        if not isinstance(body, dict) or "messages" not in body:
            raise UserInputError('request body: expected {"messages": [...]}')
        return body["messages"]

    def do_POST(self):
        if self.path != "/api/chat":
            return self._json(HTTPStatus.NOT_FOUND, {"error": f"no route {self.path}"})
        try:
            ids, dropped = self.backend.prompt_ids(self._read_messages())
        except UserInputError as err:
            return self._json(HTTPStatus.BAD_REQUEST, {"error": str(err)})
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        pieces = self.backend.stream(ids)
        try:
            for piece in pieces:
                self.wfile.write(_sse({"delta": piece}))
                self.wfile.flush()
            self.wfile.write(_sse({"done": True, "dropped_exchanges": dropped, "prompt_tokens": len(ids)}))
        except (BrokenPipeError, ConnectionResetError):
            log.info("client went away during generation: stopped it")
        except Exception as err:  # noqa: BLE001 - reported to the page, and logged with its traceback
            log.exception("generation failed")
            self.wfile.write(_sse({"error": f"generation failed: {err}"}))
        finally:
            pieces.close()  # a reply nobody reads: generate stops at its next token and the lock is free


def make_server(backend: ChatBackend, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A bound (not yet serving) server; ``port=0`` picks a free port (see ``server.server_address``)."""
    handler = type("BoundChatHandler", (ChatHandler,), {"backend": backend})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def build_parser() -> argparse.ArgumentParser:
    """The generation CLI's model, sampling and template flags, plus ``--host`` and ``--port``."""
    from colossal_llama.inference.cli import add_generation_args

    p = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generation_args(p)
    p.add_argument("--host", default="127.0.0.1", help="keep the default unless you mean to expose the model")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port")
    return p


@cli_entry
def main(argv: Optional[List[str]] = None) -> int:
    from colossal_llama.inference.cli import sampling_from_args
    from colossal_llama.inference.loading import load_model_and_tokenizer
    from colossal_llama.inference.placement import placement_for
    from colossal_llama.inference.prompting import resolve_chat_template

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    sampling = sampling_from_args(args)
    placement = placement_for(args.device, memory_limit=args.max_gpu_memory)
    model, tokenizer = load_model_and_tokenizer(args.model_path, args.tokenizer_path, placement)
    template = resolve_chat_template(args.model_path, tokenizer, args.chat_template, args.system_message)
    backend = ChatBackend(model, tokenizer, template, sampling, Path(args.model_path).name, args.max_context)
    server = make_server(backend, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"serving {args.model_path} (template {template.name}) on http://{host}:{port}/  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    main()
