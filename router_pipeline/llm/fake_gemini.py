"""A local HTTP server that speaks the Gemini REST API: generateContent;
streamGenerateContent with ``alt=sse`` (the reply's words arrive one by one, the
latency spread over them, as a model generating them would send them); and the Batch
API (``:batchGenerateContent`` with inlined requests, then ``GET batches/<id>``: the
job runs for ``batch_polls`` polls, then answers every request, in reverse order, a
request with a status fault as a failed item and one matching ``batch_drop`` not at all).

It is the test double for the ``gemini`` provider and a dry-run target:
``python -m router_pipeline.llm.fake_gemini --port 8555 --latency 0.2`` then
``GEMINI_BASE_URL=http://127.0.0.1:8555 GEMINI_API_KEY=x``.

It replies with usage metadata and can inject faults per request: HTTP 429 with
Retry-After, 5xx, latency (for timeouts), blocked prompts and empty candidates.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

_PATH = re.compile(r"^/(v1beta|v1|v1alpha)/models/([^/:]+):(generateContent|streamGenerateContent|batchGenerateContent)$")
_BATCH = re.compile(r"^/(v1beta|v1|v1alpha)/batches/([^/]+)$")


@dataclass
class Fault:
    status: int | None = None  # HTTP error status to answer with
    retry_after: float | None = None
    delay_s: float = 0.0  # extra latency (a client timeout below it sees a timeout)
    blocked: bool = False  # promptFeedback.blockReason = SAFETY
    empty: bool = False  # a candidate with no text


@dataclass
class RecordedCall:
    model: str
    prompt: str
    system: str | None
    config: dict
    api_key: str | None
    stream: bool = False  # streamGenerateContent
    batch: bool = False  # answered inside a batch job


class _Server(ThreadingHTTPServer):
    # socketserver's default backlog is 5: a burst of new connections beyond it (a server
    # calling two models for each of 32 callers at once) waits for the client's SYN retries,
    # 1 s and then 3 s, latency no real endpoint adds (it showed as serving_load.py's cascade tail).
    request_queue_size = 128

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return  # a client went away mid-request (timed out, or killed): not a server fault
        super().handle_error(request, client_address)


def default_responder(model: str, prompt: str) -> str:
    return f"{model} reply #{abs(hash(prompt)) % 1000}"


@dataclass
class FakeGemini:
    """Start with ``with FakeGemini(...) as fake:``; ``fake.base_url`` is the address."""

    responder: Callable[[str, str], str] = default_responder
    latency_s: float = 0.0
    faults: dict[str, deque] = field(default_factory=dict)  # prompt substring -> faults, used in order
    model_faults: dict[str, deque] = field(default_factory=dict)  # model -> faults, used in order
    calls: list[RecordedCall] = field(default_factory=list)
    max_in_flight: int = 0  # the most requests it was serving at once
    on_request: Callable[[str, str], None] | None = None  # (model, prompt) as each request arrives
    host: str = "127.0.0.1"
    port: int = 0
    batch_polls: int = 2  # GETs of a batch job before it has ended
    batch_drop: tuple[str, ...] = ()  # prompt substrings a batch job leaves out of its output
    batch_jobs: dict[str, dict] = field(default_factory=dict)  # id -> {model, requests, polls, output}

    def add_faults(self, substring: str, *faults: Fault) -> None:
        self.faults.setdefault(substring, deque()).extend(faults)

    def add_model_faults(self, model: str, *faults: Fault) -> None:
        """Faults for every request to ``model``, whatever its prompt (e.g. a model that is rate limited)."""
        self.model_faults.setdefault(model, deque()).extend(faults)

    def _next_fault(self, prompt: str, model: str = "") -> Fault | None:
        with self._lock:
            if self.model_faults.get(model):
                return self.model_faults[model].popleft()
            for substring, queue in self.faults.items():
                if substring in prompt and queue:
                    return queue.popleft()
        return None

    def __enter__(self) -> "FakeGemini":
        self._lock = threading.Lock()
        self._in_flight = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                m = _BATCH.match(self.path.split("?")[0])
                job = fake.batch_jobs.get(m.group(2)) if m else None
                if job is None:
                    return self._send(404, {"error": {"code": 404, "message": "no such batch", "status": "NOT_FOUND"}})
                with fake._lock:
                    job["polls"] += 1
                    done = job["polls"] > fake.batch_polls
                if not done:
                    return self._send(200, {"name": f"batches/{m.group(2)}", "metadata": {
                        "state": "BATCH_STATE_RUNNING", "model": f"models/{job['model']}"}})
                if job["output"] is None:
                    job["output"] = [item for r in reversed(job["requests"]) if (item := self._batch_item(job, r))]
                return self._send(200, {"name": f"batches/{m.group(2)}", "metadata": {
                    "state": "BATCH_STATE_SUCCEEDED", "model": f"models/{job['model']}",
                    "output": {"inlinedResponses": {"inlinedResponses": job["output"]}}}})

            def _batch_item(self, job, item):
                request = item.get("request", {})
                prompt = "".join(p.get("text", "") for c in request.get("contents", []) for p in c.get("parts", []))
                if any(s in prompt for s in fake.batch_drop):
                    return None
                system = "".join(p.get("text", "") for p in (request.get("systemInstruction") or {}).get("parts", []))
                with fake._lock:
                    fake.calls.append(RecordedCall(job["model"], prompt, system or None,
                                                   request.get("generationConfig", {}), None, batch=True))
                if fake.on_request is not None:
                    fake.on_request(job["model"], prompt)
                fault = fake._next_fault(prompt, job["model"]) or Fault()
                if fault.status:
                    return {"error": {"code": fault.status, "message": "injected"}, "metadata": item.get("metadata")}
                usage = {"promptTokenCount": len(prompt.split()) + len(system.split())}
                if fault.blocked:
                    return {"response": {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": usage},
                            "metadata": item.get("metadata")}
                text = fake.responder(job["model"], prompt)
                usage.update(candidatesTokenCount=len(text.split()))
                return {"response": {"candidates": [{"content": {"role": "model", "parts": [{"text": text}]},
                                                     "finishReason": "STOP", "index": 0}], "usageMetadata": usage},
                        "metadata": item.get("metadata")}

            def do_POST(self):
                m = _PATH.match(self.path.split("?")[0])
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if not m:
                    return self._send(404, {"error": {"code": 404, "message": "not found", "status": "NOT_FOUND"}})
                try:
                    payload = json.loads(body or b"{}")
                except json.JSONDecodeError:
                    return self._send(400, {"error": {"code": 400, "message": "bad json", "status": "INVALID_ARGUMENT"}})
                model = m.group(2)
                if m.group(3) == "batchGenerateContent":
                    requests = payload["batch"]["inputConfig"]["requests"]["requests"]
                    with fake._lock:
                        job_id = f"job{len(fake.batch_jobs) + 1}"
                        fake.batch_jobs[job_id] = {"model": model, "requests": requests, "polls": 0, "output": None}
                    return self._send(200, {"name": f"batches/{job_id}", "metadata": {
                        "state": "BATCH_STATE_PENDING", "model": f"models/{model}"}})
                prompt = "".join(
                    p.get("text", "") for c in payload.get("contents", []) for p in c.get("parts", [])
                )
                sys_parts = (payload.get("systemInstruction") or {}).get("parts", [])
                system = "".join(p.get("text", "") for p in sys_parts) or None
                key = self.headers.get("x-goog-api-key")
                with fake._lock:
                    fake.calls.append(
                        RecordedCall(model, prompt, system, payload.get("generationConfig", {}), key,
                                     m.group(3) == "streamGenerateContent")
                    )
                if fake.on_request is not None:
                    fake.on_request(model, prompt)
                fault = fake._next_fault(prompt, model) or Fault()
                streaming = m.group(3) == "streamGenerateContent" and not (fault.status or fault.blocked)
                with fake._lock:
                    fake._in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake._in_flight)
                try:
                    time.sleep(fault.delay_s + (0 if streaming else fake.latency_s))
                finally:
                    with fake._lock:
                        fake._in_flight -= 1
                if fault.status:
                    headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
                    status = {429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}.get(fault.status, "ERROR")
                    return self._send(
                        fault.status, {"error": {"code": fault.status, "message": "injected", "status": status}}, headers
                    )
                tokens_in = len(prompt.split()) + len((system or "").split())
                usage = {"promptTokenCount": tokens_in}
                if fault.blocked:
                    return self._send(200, {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": usage})
                text = "" if fault.empty else fake.responder(model, prompt)
                tokens_out = len(text.split())
                usage.update(candidatesTokenCount=tokens_out, totalTokenCount=tokens_in + tokens_out)
                candidate = {"content": {"role": "model", "parts": [{"text": text}] if text else []}, "finishReason": "STOP", "index": 0}
                if streaming:
                    return self._stream(text, usage, model)
                return self._send(200, {"candidates": [candidate], "usageMetadata": usage, "modelVersion": model})

            def _stream(self, text, usage, model):
                words = text.split(" ") if text else [""]
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")  # the body ends when the connection does
                self.close_connection = True
                try:
                    self.end_headers()
                    for i, word in enumerate(words):
                        time.sleep(fake.latency_s / len(words))
                        last = i == len(words) - 1
                        chunk = {"candidates": [{"content": {"role": "model", "parts": [
                            {"text": (" " if i else "") + word}]}, "index": 0, **({"finishReason": "STOP"} if last else {})}],
                            "modelVersion": model, **({"usageMetadata": usage} if last else {})}
                        self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\r\n\r\n")
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client went away mid-stream

            def _send(self, status, obj, headers=None):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                try:
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client went away (timed out, or was killed): nothing to answer

        self._server = _Server((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8555)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every reply")
    args = parser.parse_args()
    with FakeGemini(latency_s=args.latency, port=args.port) as fake:
        print(f"fake Gemini API on {fake.base_url} (Ctrl-C to stop)", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
