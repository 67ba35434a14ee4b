"""router_pipeline: a Dagster asset graph that trains an LLM router."""

__version__ = "0.1.0"
