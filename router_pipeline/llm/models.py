"""The Gemini models the package knows (the one place their ids are written), their
prices (USD per million tokens) and the cost of one call.

Costs always come from real token counts: the API's usage metadata, or the local
tokenizer for local models.
"""

from __future__ import annotations

FLASH_LITE = "gemini-2.5-flash-lite"
FLASH = "gemini-2.5-flash"
PRO = "gemini-2.5-pro"
FLASH_2_0 = "gemini-2.0-flash"
PRO_3_PREVIEW = "gemini-3-pro-preview"
# Which tier each model plays (an llm-council winner's tier; 2 tiers: medium, large).
TIER_OF = {FLASH_LITE: "medium", FLASH: "medium", FLASH_2_0: "medium", PRO: "large", PRO_3_PREVIEW: "large"}

# (input, output) USD per 1M tokens; Gemini list prices for prompts up to 200k tokens.
PRICES_PER_MTOK: dict[str, tuple[float, float]] = {
    FLASH: (0.30, 2.50),
    FLASH_LITE: (0.10, 0.40),
    PRO: (1.25, 10.00),
    FLASH_2_0: (0.10, 0.40),
    PRO_3_PREVIEW: (2.00, 12.00),
}


def price_for(model: str, override: tuple[float, float] | None = None) -> tuple[float, float]:
    """Price of a model: an explicit override wins, then the table (longest matching
    prefix, so dated ids like gemini-2.5-pro-002 resolve), else free (local models)."""
    if override is not None:
        return override
    for name in sorted(PRICES_PER_MTOK, key=len, reverse=True):
        if model == name or model.startswith(name + "-") or model.endswith("/" + name):
            return PRICES_PER_MTOK[name]
    return (0.0, 0.0)


def cost_usd(input_tokens: int, output_tokens: int, price: tuple[float, float]) -> float:
    return (input_tokens * price[0] + output_tokens * price[1]) / 1_000_000
