"""A local HTTP server that speaks OpenAI's chat-completions protocol (whole and
``stream: true``): the test double for the pool's ``openai`` backend (vLLM, Ollama, a
provider, a private endpoint on the operator's machines) and a dry-run target.

Every call gets ``reply`` with ``usage``, unless a ``responder`` decides per call, as
FakeGemini's does: ``responder(model, body)`` (the request's model and its whole JSON
body) returns the reply's text, or (text, usage) with usage an OpenAI usage dict
(``prompt_tokens``, ``completion_tokens``; ``total_tokens`` is their sum when left out).

It records every call (path, bearer header, body) and injects faults per model, in order,
with fake_gemini's ``Fault``: an HTTP status (with Retry-After), latency (a client
timeout below it sees a timeout) and an empty reply (the responder is not asked).
"""

from __future__ import annotations

import json
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Callable

from router_pipeline.llm.fake_gemini import Fault, _Server

__all__ = ["Fault", "FakeOpenAI", "Responder"]

# (model, request body) -> the reply's text, or (text, OpenAI usage dict)
Responder = Callable[[str, dict], str | tuple[str, dict]]


@dataclass
class FakeOpenAI:
    """Start with ``with FakeOpenAI() as fake:``; ``fake.base_url`` ends in /v1."""

    reply: str = " Paris "
    usage: tuple[int, int] = (9, 2)  # prompt and completion tokens of every answer
    calls: list[dict] = field(default_factory=list)  # {"path", "auth", **body}
    faults: dict[str, deque] = field(default_factory=dict)  # model ("" for any) -> faults, used in order
    always: dict[str, Fault] = field(default_factory=dict)  # model ("" for any) -> a fault on every call
    responder: Responder | None = None  # decides each reply (and usage); None: ``reply`` and ``usage``

    def add_faults(self, *faults: Fault, model: str = "") -> None:
        self.faults.setdefault(model, deque()).extend(faults)

    def _fault(self, model: str) -> Fault:
        with self._lock:
            for key in (model, ""):
                if self.faults.get(key):
                    return self.faults[key].popleft()
            return self.always.get(model) or self.always.get("") or Fault()

    def _answer(self, body: dict) -> tuple[str, dict]:
        """(text, usage) of one call: the responder's, else ``reply`` and ``usage`` (no
        completion tokens for an empty text)."""
        out = self.reply if self.responder is None else self.responder(body.get("model", ""), body)
        text, usage = out if isinstance(out, tuple) else (out, None)
        if usage is None:
            usage = {"prompt_tokens": self.usage[0], "completion_tokens": self.usage[1] * bool(text)}
        usage = {"prompt_tokens": 0, "completion_tokens": 0, **usage}
        usage.setdefault("total_tokens", usage["prompt_tokens"] + usage["completion_tokens"])
        return text, usage

    def __enter__(self) -> "FakeOpenAI":
        import time

        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake._lock:
                    fake.calls.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                fault = fake._fault(body.get("model", ""))
                time.sleep(fault.delay_s)
                if fault.status:
                    return self._send(fault.status, {"error": {"message": "injected", "type": "x", "code": None}},
                                      {"Retry-After": str(fault.retry_after)} if fault.retry_after else {})
                if fault.empty:
                    text, usage = "", {"prompt_tokens": fake.usage[0], "completion_tokens": 0,
                                       "total_tokens": fake.usage[0]}
                else:
                    text, usage = fake._answer(body)
                head = {"id": "c", "created": 0, "model": body["model"]}
                if not body.get("stream"):
                    return self._send(200, {**head, "object": "chat.completion", "usage": usage, "choices": [
                        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}]})
                pieces = [text[:len(text) // 2], text[len(text) // 2:]] if text else []
                chunks = [{"choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]} for t in pieces]
                chunks.append({"choices": [], "usage": usage})
                data = "".join(f"data: {json.dumps({**head, 'object': 'chat.completion.chunk', **c})}\n\n"
                               for c in chunks).encode() + b"data: [DONE]\n\n"
                self._send(200, data, content_type="text/event-stream")

            def _send(self, status: int, payload, headers: dict | None = None, content_type="application/json"):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                for k, v in {**(headers or {}), "Content-Type": content_type}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = _Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
