"""A local model generating in a process of its own, with one thread at low priority.

In the server's process, a local model's generation loop (Python between every op)
competes with the router for the interpreter as well as for the cores, and thread
niceness cannot help with the interpreter: under benchmarks/serving_load.py's hostile mix
the router's p99 tripled. ``LocalWorker`` has the same ``stream`` as ``LocalClient``
(llm/local.py) and runs it in a child process started with ``spawn``: the model loads
there, generation uses ``threads`` cores at niceness ``nice``, and the parent only moves
text across a pipe.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from typing import Callable, Iterator

from router_pipeline.llm.types import LLMResult, PromptTooLong, RetryableError


def _work(make_client: Callable, conn, cancel, threads: int, nice: int) -> None:
    """The child: load the model, then answer one request at a time until the pipe closes."""
    os.nice(nice)
    import torch

    torch.set_num_threads(threads)
    try:
        client = make_client()
    except Exception as exc:  # reported to the parent, which raises it where the model was asked for
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            request, max_input_tokens = conn.recv()
        except EOFError:  # the parent has gone
            return
        try:
            for item in client.stream(request, cancel, max_input_tokens=max_input_tokens):
                conn.send(("result", item) if isinstance(item, LLMResult) else ("piece", item))
        except PromptTooLong as exc:
            conn.send(("too_long", str(exc)))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class LocalWorker:
    """``make_client``: a picklable callable that builds the LocalClient (in the child)."""

    def __init__(self, make_client: Callable, *, threads: int = 1, nice: int = 10, name: str = "local model"):
        ctx = multiprocessing.get_context("spawn")  # fork would copy the parent's threads and torch state
        self.name = name
        self._conn, child = ctx.Pipe()
        self._cancel = ctx.Event()
        self._lock = threading.Lock()  # one request at a time on the pipe
        self._proc = ctx.Process(target=_work, args=(make_client, child, self._cancel, threads, nice), daemon=True,
                                 name=f"router-pipeline {name}")
        self._proc.start()
        child.close()
        kind, message = self._conn.recv()
        if kind != "ready":
            self._proc.join(5)
            raise RuntimeError(f"{name} could not be loaded in its worker process: {message}")

    def stream(self, request, cancel: threading.Event, wait_for=None, max_input_tokens: int | None = None,
               nice: int = 0) -> Iterator[str | LLMResult]:
        """As LocalClient.stream; ``wait_for`` and ``nice`` are the worker's business: it
        runs apart, at its own priority."""
        with self._lock:
            self._cancel.clear()
            self._conn.send((request, max_input_tokens))
            done = False
            try:
                while True:
                    if cancel.is_set():
                        self._cancel.set()
                    if not self._conn.poll(0.05):
                        if not self._proc.is_alive():
                            raise RetryableError(f"{self.name}: its worker process exited "
                                                 f"(code {self._proc.exitcode})")
                        continue
                    kind, payload = self._conn.recv()
                    if kind == "piece":
                        yield payload
                        continue
                    done = True
                    if kind == "result":
                        yield payload
                        return
                    if kind == "too_long":
                        raise PromptTooLong(payload)
                    raise RuntimeError(f"{self.name}: {payload}")
            finally:
                if not done and self._proc.is_alive():  # the reader stopped early: stop the model, drain the pipe
                    self._cancel.set()
                    while True:
                        kind, _ = self._conn.recv()
                        if kind not in ("piece",):
                            break

    def close(self) -> None:
        self._conn.close()
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
