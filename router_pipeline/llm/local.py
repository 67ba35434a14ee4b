"""Local generation with transformers: batched greedy decoding on CPU or GPU."""

from __future__ import annotations

import torch

from router_pipeline.llm.types import EMPTY, OK, LLMRequest, LLMResult


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
            prompts = [(f"{system}\n\n" if system else "") + requests[i].prompt for i in idx]
            for i, result in zip(idx, self._generate(prompts, max_new, temperature, stop)):
                out[i] = result
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def _generate(self, prompts, max_new, temperature, stop) -> list[LLMResult]:
        tok = self._tok
        enc = tok(prompts, return_tensors="pt", padding=True)
        kwargs = dict(max_new_tokens=max_new, pad_token_id=tok.pad_token_id)
        if temperature > 0:
            torch.manual_seed(self.seed)
            kwargs.update(do_sample=True, temperature=temperature)
        else:
            kwargs.update(do_sample=False)
        if stop:
            kwargs.update(stop_strings=list(stop), tokenizer=tok)
        generated = self._lm.generate(**enc.to(self._lm.device), **kwargs)
        results = []
        width = enc["input_ids"].shape[1]
        for row, mask in zip(generated, enc["attention_mask"]):
            text = tok.decode(row[width:], skip_special_tokens=True)
            for s in stop:
                text = text.split(s, 1)[0]
            text = text.strip()
            input_tokens = int(mask.sum())
            output_tokens = len(tok(text, add_special_tokens=False)["input_ids"]) if text else 0
            results.append(LLMResult(text or None, OK if text else EMPTY, input_tokens, output_tokens, "STOP"))
        return results
