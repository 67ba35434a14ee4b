"""The LoRA router at inference time: base model + adapter -> a decision per query.

Routing confidence: the softmax over the three policies' first tokens
at the point where the decision is made, so every decision carries a distribution.

- ``fast`` mode (completion ``[DECISION] <policy>``), the default: one forward pass
  over ``prompt + [DECISION]`` gives the distribution, so every query gets a real
  decision; no parse failure is possible. ``explained`` mode decides the same way
  and can generate its reasoning afterwards when asked for.
- ``reasoning`` mode (``[REASONING] ... [DECISION] <policy>``): the router
  generates, the parser reads the decision from the generated span only, and one
  forward pass at the generated ``[DECISION]`` marker gives the distribution.

An output the parser rejects never becomes a policy silently: the decision says
``parse_ok=False`` with the reason, and the configured fallback decides (or, with
``fallback="raise"``, the call fails).

The base loads in fp32 (bf16/fp16 on CUDA) with the adapter merged, or, with
``quantization="4bit"``, in 4-bit NF4 as QLoRA trains it, the adapter kept apart.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path

from router_pipeline.artifacts import TRAINING_FILE
from router_pipeline.policies import POLICIES
from router_pipeline.routers.contract import RAISE, RouteDecision, RouterConfig, RouterOutputError, read_calibration, \
    read_json_object
from router_pipeline.routers.prompt import (
    DECISION, DECISION_FIRST, DEFAULT_MODE, PROMPT_PREFIX, REASONING, build_prompt, parse_completion,
    prompt_suffix,
)

LORA_KIND = "lora"
QUANTIZATIONS = ("none", "4bit")


def import_bitsandbytes(allow_hub: bool) -> None:
    """Import bitsandbytes (peft imports it) without reaching the hub unless allowed.

    On a CPU with AVX512-BF16, importing bitsandbytes asks the hub for a faster CPU
    4-bit kernel (through the ``kernels`` package). Offline the lookup is made with
    huggingface_hub in offline mode: a kernel already in the local cache is used, else
    its built-in kernel, at once and without the two warnings it would log."""
    if allow_hub or "bitsandbytes" in sys.modules:
        return
    from huggingface_hub import constants

    from router_pipeline import settings

    if settings.load().allow_hub:
        return
    loggers = [logging.getLogger(name) for name in ("bitsandbytes", "kernels")]
    saved = constants.HF_HUB_OFFLINE, [lg.level for lg in loggers]
    constants.HF_HUB_OFFLINE = True
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.suppress(ImportError):  # not installed: nothing can load in 4-bit, and nothing asks
            import bitsandbytes  # noqa: F401
    finally:
        constants.HF_HUB_OFFLINE = saved[0]
        for lg, level in zip(loggers, saved[1]):
            lg.setLevel(level)


def nf4_config(compute_dtype):
    """QLoRA's quantisation: 4-bit NF4 weights with double quantisation (the block
    scales quantised too), matrix products in ``compute_dtype``."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def load_4bit(path: str, device: str):
    """The base as QLoRA trains on it, on CUDA or CPU alike: its linear layers in 4-bit
    NF4, computing in bf16 where the device has bf16 units (else fp16 on a GPU, fp32 on
    a CPU); the rest (embeddings, norms) in fp32, as prepare_model_for_kbit_training
    leaves them, so that a router reloads the numbers its adapter was trained on."""
    import torch
    from transformers import AutoModelForCausalLM

    from router_pipeline.routers.features import fast_dtype

    compute = fast_dtype(device)
    # Loaded in the compute dtype: the 4-bit weights are quantised from it, in training and routing alike.
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=nf4_config(compute), dtype=compute,
                                                 device_map={"": device})
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16):  # the 4-bit weights are uint8
            param.data = param.data.float()
    return model


def adapter_meta(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / TRAINING_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {adapter_dir} is not an adapter trained by router_pipeline")
    meta = read_json_object(path, "the training 'config'", "retrain or restore the adapter")
    if not isinstance(meta.get("config", {}), dict):
        raise ValueError(f"{path} must hold an object with the training 'config'")
    return meta


class LoraRouter:
    """Load once, route many. ``adapter_dir=None`` routes with the bare base model
    (useful for latency figures; its decisions are not meaningful)."""

    def __init__(self, adapter_dir: str | Path | None = None, *, base_model: str | None = None,
                 config: RouterConfig = RouterConfig(), quantization: str = "none"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from router_pipeline.local_models import resolve_model
        from router_pipeline.routers.features import fast_dtype

        if quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {quantization!r}; expected one of {QUANTIZATIONS}")

        meta = adapter_meta(adapter_dir) if adapter_dir is not None else {}
        base_model = base_model or meta.get("config", {}).get("base_model")
        if base_model is None:
            raise ValueError("Router needs an adapter_dir (which records its base model) or a base_model")
        self.mode = config.mode or meta.get("mode", DEFAULT_MODE)
        self.config = config
        self.adapter_dir = str(adapter_dir) if adapter_dir is not None else None
        self.base_model = base_model
        self.calibration = read_calibration(adapter_dir)
        allow_hub = config.allow_hub or meta.get("config", {}).get("allow_hub", False)
        path = resolve_model(base_model, allow_hub=allow_hub)
        import_bitsandbytes(allow_hub)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.quantization = quantization
        # fp32 on CPU: bf16 weights route 4x slower there (measured), unlike bf16 autocast in training.
        dtype = fast_dtype(self.device) if self.device == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(self.adapter_dir or path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if quantization == "4bit":
            model = load_4bit(path, self.device)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device)
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir))
            # Merging into 4-bit weights would round the adapter into NF4: keep it apart
            # (the LoRA layers stay in the base model, which the decision code calls).
            model = model.get_base_model() if quantization == "4bit" else model.merge_and_unload()
        self.model = model.eval()
        self._policy_tokens = self._first_policy_tokens()
        self._prefix = self._prefix_state() if config.prefix_cache and self.mode in DECISION_FIRST else None

    # -- the decision point -------------------------------------------------
    def _first_policy_tokens(self) -> list[int]:
        """The first token of each policy name where it follows [DECISION], read from
        how the tokenizer splits a real completion (not from the bare names)."""
        probe = build_prompt("probe") + DECISION
        ids = [self.tokenizer(f"{probe} {p}", add_special_tokens=False)["input_ids"] for p in POLICIES]
        common = 0
        while all(len(x) > common for x in ids) and len({x[common] for x in ids}) == 1:
            common += 1
        first = [x[common] for x in ids]
        if len(set(first)) != len(POLICIES):
            raise ValueError(f"the policy names do not start with distinct tokens for this tokenizer: {first}")
        return first

    def _distribution(self, contexts: list[str]) -> list[tuple[dict[str, float], float]]:
        """(softmax over the policies' first tokens, their share of the full mass) after each context."""
        import torch

        enc = self.tokenizer(contexts, return_tensors="pt", padding=True).to(self.device)
        # Left padding: positions must start at each row's first real token.
        positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            # logits_to_keep=1: the LM head (262k-token vocabulary for Gemma) runs on the last position only.
            logits = self.model(**enc, position_ids=positions, logits_to_keep=1).logits[:, -1, :].float()
        return self._policy_softmax(logits)

    def _prefix_state(self):
        """(length, KV cache) of PROMPT_PREFIX, computed once."""
        import torch
        from transformers import DynamicCache

        ids = self.tokenizer(PROMPT_PREFIX, return_tensors="pt")["input_ids"].to(self.device)
        cache = DynamicCache(config=self.model.config)
        with torch.no_grad():
            self.model.model(input_ids=ids, cache=cache, use_cache=True)
        return ids.shape[1], cache

    def _distribution_from_prefix(self, suffixes: list[str]) -> list[tuple[dict[str, float], float]]:
        """As _distribution over PROMPT_PREFIX + suffix, computing only the suffixes: the
        prefix's KV cache is copied to the batch, suffixes are right-padded, and the LM
        head runs on each row's last real position only."""
        import copy

        import torch

        n, prefix = self._prefix
        rows = [self.tokenizer(x, add_special_tokens=False)["input_ids"] for x in suffixes]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.device)
        suffix_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device)
        cache = copy.deepcopy(prefix)
        cache.batch_repeat_interleave(len(rows))
        mask = torch.cat([torch.ones(len(rows), n, dtype=suffix_mask.dtype, device=self.device), suffix_mask], dim=1)
        positions = (n + torch.arange(width, device=self.device)).expand(len(rows), width)
        with torch.no_grad():
            hidden = self.model.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                                      use_cache=True).last_hidden_state
            last = hidden[torch.arange(len(rows), device=self.device), suffix_mask.sum(-1) - 1]
            logits = self.model.lm_head(last).float()
            cap = getattr(self.model.config, "final_logit_softcapping", None)
            if cap:
                logits = torch.tanh(logits / cap) * cap
        return self._policy_softmax(logits)

    def _policy_softmax(self, logits) -> list[tuple[dict[str, float], float]]:
        import torch

        full = torch.softmax(logits, dim=-1)[:, self._policy_tokens]
        picked = torch.softmax(logits[:, self._policy_tokens], dim=-1)
        return [({p: float(v) for p, v in zip(POLICIES, row)}, float(mass))
                for row, mass in zip(picked.tolist(), full.sum(-1).tolist())]

    def _generate(self, contexts: list[str]) -> list[str]:
        """Greedy continuation of each context; only the new tokens are decoded."""
        import torch

        enc = self.tokenizer(contexts, return_tensors="pt", padding=True).to(self.device)
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=self.config.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)

    # -- routing ------------------------------------------------------------
    def route(self, query: str, *, with_reasoning: bool = False) -> RouteDecision:
        return self.route_batch([query], with_reasoning=with_reasoning)[0]

    def route_batch(self, queries: list[str], *, with_reasoning: bool = False, progress: bool = False) -> list[RouteDecision]:
        """Decisions in the order of ``queries``; batches are formed from queries of
        similar length so that little compute goes to padding."""
        from tqdm.auto import tqdm

        if with_reasoning and self.mode == "fast":
            raise ValueError("this router was trained in fast mode (decision only) and cannot explain its "
                             "decisions; train with mode 'explained' or 'reasoning' for reasoning")
        out: list[RouteDecision | None] = [None] * len(queries)
        order = sorted(range(len(queries)), key=lambda i: len(queries[i]))
        size = max(1, self.config.batch_size)
        for lo in tqdm(range(0, len(order), size), desc="routing", disable=not progress, leave=False):
            idx = order[lo:lo + size]
            chunk = [queries[i] for i in idx]
            t0 = time.perf_counter()
            decided = (self._fast(chunk, with_reasoning) if self.mode in DECISION_FIRST
                       else self._reasoning(chunk, [build_prompt(q) for q in chunk]))
            per_query = (time.perf_counter() - t0) * 1000 / len(chunk)
            for i, d in zip(idx, decided):
                d.latency_ms = per_query
                out[i] = self._apply_fallback(d)
        return out

    def _fast(self, queries, with_reasoning) -> list[RouteDecision]:
        suffixes = [prompt_suffix(q) for q in queries]  # the prompt is PROMPT_PREFIX + suffix
        if self._prefix is not None:
            dists = self._distribution_from_prefix([s + DECISION for s in suffixes])
        else:
            dists = self._distribution([PROMPT_PREFIX + s + DECISION for s in suffixes])
        decisions = []
        for q, (probs, mass) in zip(queries, dists):
            policy = max(probs, key=probs.get)
            if mass < self.config.min_policy_mass:
                decisions.append(RouteDecision(q, policy, {}, False, self.mode, policy_mass=mass, parse_error=(
                    f"only {mass:.1%} of the next-token mass is on a policy name (min {self.config.min_policy_mass:.0%})")))
            else:
                decisions.append(RouteDecision(q, policy, probs, True, self.mode, policy_mass=mass))
        if with_reasoning:
            heads = [f"{PROMPT_PREFIX}{s}{DECISION} {d.policy} {REASONING}" for s, d in zip(suffixes, decisions)]
            for d, text in zip(decisions, self._generate(heads)):
                d.generated = f"{DECISION} {d.policy} {REASONING}{text}"
                d.reasoning = parse_completion(d.generated, self.mode).reasoning
        return decisions

    def _reasoning(self, queries, prompts) -> list[RouteDecision]:
        generated = self._generate(prompts)
        parsed = [parse_completion(g, "reasoning") for g in generated]
        ok = [i for i, p in enumerate(parsed) if p.ok]
        # The distribution at the generated [DECISION] marker (the decision point).
        contexts = [prompts[i] + generated[i].split(DECISION, 1)[0] + DECISION for i in ok]
        dists = dict(zip(ok, self._distribution(contexts))) if contexts else {}
        decisions = []
        for i, (q, p, g) in enumerate(zip(queries, parsed, generated)):
            probs, mass = dists.get(i, ({}, None))
            decisions.append(RouteDecision(q, p.policy or "", probs, p.ok, "reasoning", reasoning=p.reasoning,
                                           parse_error=p.error, policy_mass=mass, generated=g))
        return decisions

    def _apply_fallback(self, d: RouteDecision) -> RouteDecision:
        if d.parse_ok:
            return d
        if self.config.fallback == RAISE:
            raise RouterOutputError(f"router output for {d.query[:80]!r} is unusable: {d.parse_error}")
        d.policy, d.probabilities, d.fallback_used = self.config.fallback, {}, True
        return d

    def describe(self) -> dict:
        return {"adapter_dir": self.adapter_dir, "base_model": self.base_model, "mode": self.mode,
                "device": self.device, "quantization": self.quantization, "fallback": self.config.fallback, "calibration": self.calibration}


