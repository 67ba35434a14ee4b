"""Text normalisation shared by the stages (query identity, grading, leak checks)."""

from __future__ import annotations

import hashlib
import re
import unicodedata

_SPACES = re.compile(r"\s+")
_PUNCT = re.compile(r"[^\w\s]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def clean_query(text: str) -> str:
    """Unicode NFC, trimmed, internal whitespace collapsed: the stored form of a query."""
    return _SPACES.sub(" ", unicodedata.normalize("NFC", text)).strip()


# Control characters other than tab/newline/CR mean binary data, not a question.
_BINARY = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
MAX_QUERY_CHARS = 4000  # the loaders' and the CLI's default limit


def check_query(value, max_chars: int = MAX_QUERY_CHARS) -> str:
    """The stored form of a query (clean_query), or ValueError saying what is wrong with it:
    not text, undecodable (lone surrogates), binary, empty, or over ``max_chars``."""
    if not isinstance(value, str):
        raise ValueError("missing query" if value is None else f"query is {type(value).__name__}, not text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("query holds characters that are not valid Unicode (lone surrogates)") from None
    if _BINARY.search(value):
        raise ValueError("query holds control characters: binary data, not text")
    query = clean_query(value)
    if not query:
        raise ValueError("empty query")
    if len(query) > max_chars:
        raise ValueError(f"query is {len(query)} characters, over the {max_chars} limit")
    return query


def normalise(text: str) -> str:
    """Case-, accent-, punctuation- and article-insensitive form for comparisons."""
    text = unicodedata.normalize("NFKD", str(text))
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).lower()
    text = _PUNCT.sub(" ", text.replace("'", ""))
    return _SPACES.sub(" ", _ARTICLES.sub(" ", text)).strip()


def query_hash(query: str) -> str:
    """Stable identity of a query: the same question, however spaced or cased, hashes alike."""
    return hashlib.sha256(normalise(query).encode("utf-8")).hexdigest()[:16]


def unit_interval(*parts: object) -> float:
    """A deterministic number in [0, 1) from its parts (seeded, order-free splits/samples)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
