"""Local generation with transformers: batched greedy decoding on CPU or GPU, and one
request streamed token by token (the routing server's ``stream: true``)."""

from __future__ import annotations

import os
import threading
from typing import Iterator

import torch

from router_pipeline.llm.types import EMPTY, OK, LLMRequest, LLMResult, PromptTooLong

PREFILL_CHUNK = 256  # prompt tokens per forward pass when the stream gives way to other work
# A base model has no chat template: given a caller's conversation as it is, it repeats it.
# Framed as a question to answer, on one line, it answers (the routing server's requests).
CHAT_FRAME = "Question: {conversation}\nAnswer:"
CHAT_STOP = ("\n",)


def chat_request(conversation: str, *, max_output_tokens: int, temperature: float,
                 system: str | None) -> LLMRequest:
    """A chat conversation (one user turn, or ``role: text`` lines) as a request a local
    base model answers."""
    return LLMRequest(CHAT_FRAME.format(conversation=conversation), max_output_tokens=max_output_tokens,
                      temperature=temperature, stop=CHAT_STOP, system=system)


class _Stopped(Exception):
    """The stream's reader went away while the model waited for its turn."""


class LocalClient:
    provider = "local"

    def __init__(self, model: str, *, price: tuple[float, float], batch_size: int = 8, seed: int = 0):
        from router_pipeline.local_models import load_causal_lm, resolve_model

        self.model = model
        self.price = price
        self.batch_size = batch_size
        self.seed = seed
        self._lm, self._tok = load_causal_lm(resolve_model(model))

    def complete_batch(self, requests: list[LLMRequest]) -> list[LLMResult]:
        # One generate() call per group of identical settings.
        out: list[LLMResult | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.max_output_tokens, r.temperature, r.stop, r.system), []).append(i)
        for (max_new, temperature, stop, system), idx in groups.items():
            prompts = [_with_system(system, requests[i].prompt) for i in idx]
            for i, result in zip(idx, self._generate(prompts, max_new, temperature, stop)):
                out[i] = result
        return out  # type: ignore[return-value]

    def stream(self, request: LLMRequest, cancel: threading.Event, wait_for: threading.Event | None = None,
               max_input_tokens: int | None = None, nice: int = 0) -> Iterator[str | LLMResult]:
        """Text deltas as the model generates them, then the whole LLMResult. Setting
        ``cancel`` (the caller went away) stops generation after the current token.
        With ``wait_for`` (work that must come first on the same CPU), every forward pass
        waits until it is set: each token, and each ``PREFILL_CHUNK`` tokens of the prompt
        (a 32 KB prompt read in one pass held the CPU for seconds); a cancel while it
        waits stops it at once. ``max_input_tokens``: a longer prompt is refused
        (PromptTooLong) before any pass. ``nice``: the generating thread's niceness, which
        the threads it starts for its passes inherit (Linux: per thread), so that work of
        the process at niceness 0 gets the cores first."""
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        class Cancelled(StoppingCriteria):  # called after every token
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

        def take_turn(*_):  # before every forward pass of this stream's thread
            if threading.current_thread() is not thread:  # the model is shared (cached): not another caller's pass
                return
            while not wait_for.wait(0.1):
                if cancel.is_set():
                    raise _Stopped

        tok = self._tok
        enc = tok([_with_system(request.system, request.prompt)], return_tensors="pt").to(self._lm.device)
        if max_input_tokens is not None and (n := int(enc["input_ids"].shape[1])) > max_input_tokens:
            raise PromptTooLong(f"a prompt of {n} tokens is over the local model's {max_input_tokens}")
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(self._gen_kwargs(request.max_output_tokens, request.temperature, request.stop), streamer=streamer,
                      stopping_criteria=StoppingCriteriaList([Cancelled()]))
        if wait_for is not None:
            kwargs["prefill_chunk_size"] = PREFILL_CHUNK
        failure: list[BaseException] = []

        def generate():
            if nice:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)  # this thread only
            hook = self._lm.register_forward_pre_hook(take_turn) if wait_for is not None else None
            try:
                with torch.no_grad():
                    self._lm.generate(**enc, **kwargs)
            except _Stopped:  # the reader has gone
                streamer.end()
            except BaseException as exc:  # surfaced to the reader below
                failure.append(exc)
                streamer.end()
            finally:
                if hook is not None:
                    hook.remove()

        thread = threading.Thread(target=generate, daemon=True)
        thread.start()
        parts = []
        try:
            for piece in streamer:
                if piece:
                    parts.append(piece)
                    yield piece
        finally:  # also when the reader stops early: generation ends at the next token
            cancel.set()
            thread.join()
        if failure:
            raise failure[0]
        text = _until_stop("".join(parts), request.stop)
        output_tokens = len(tok(text, add_special_tokens=False)["input_ids"]) if text else 0
        yield LLMResult(text or None, OK if text else EMPTY, int(enc["input_ids"].shape[1]), output_tokens, "STOP")

    def _gen_kwargs(self, max_new: int, temperature: float, stop) -> dict:
        """generate()'s settings for a request, streamed or not."""
        kwargs = dict(max_new_tokens=max_new, pad_token_id=self._tok.pad_token_id)
        if temperature > 0:
            torch.manual_seed(self.seed)
            kwargs.update(do_sample=True, temperature=temperature)
        else:
            kwargs.update(do_sample=False)
        if stop:
            kwargs.update(stop_strings=list(stop), tokenizer=self._tok)
        return kwargs

    @torch.no_grad()
    def _generate(self, prompts, max_new, temperature, stop) -> list[LLMResult]:
        tok = self._tok
        enc = tok(prompts, return_tensors="pt", padding=True)
        generated = self._lm.generate(**enc.to(self._lm.device), **self._gen_kwargs(max_new, temperature, stop))
        results = []
        width = enc["input_ids"].shape[1]
        for row, mask in zip(generated, enc["attention_mask"]):
            text = _until_stop(tok.decode(row[width:], skip_special_tokens=True), stop)
            input_tokens = int(mask.sum())
            output_tokens = len(tok(text, add_special_tokens=False)["input_ids"]) if text else 0
            results.append(LLMResult(text or None, OK if text else EMPTY, input_tokens, output_tokens, "STOP"))
        return results


def _until_stop(text: str, stop) -> str:
    """The answer before its first stop string, stripped (generation stops after it)."""
    for s in stop or ():
        text = text.split(s, 1)[0]
    return text.strip()


def _with_system(system: str | None, prompt: str) -> str:
    """A base model has no system turn: the system text goes first."""
    return (f"{system}\n\n" if system else "") + prompt
