"""Turning plain results into Dagster UI metadata (tables, markdown, numbers)."""

from __future__ import annotations

import dagster as dg
import pandas as pd


def table(frame: pd.DataFrame) -> dg.TableMetadataValue:
    """A DataFrame (small) as a UI table; the index becomes the first column if named."""
    if frame.index.name is not None or not isinstance(frame.index, pd.RangeIndex):
        frame = frame.reset_index()
    frame = frame.copy()
    frame.columns = [str(c) for c in frame.columns]
    columns = []
    for name, dtype in frame.dtypes.items():
        kind = "int" if pd.api.types.is_integer_dtype(dtype) else "float" if pd.api.types.is_float_dtype(dtype) else "string"
        columns.append(dg.TableColumn(name, kind))
    records = [dg.TableRecord({k: _plain(v) for k, v in rec.items()}) for rec in frame.to_dict("records")]
    return dg.MetadataValue.table(records, schema=dg.TableSchema(columns=columns))


def _plain(value):
    """A JSON-friendly scalar: numpy scalars unwrapped, NaN as None, the rest as text."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return None
    if hasattr(value, "item"):
        value = value.item()
    return value if isinstance(value, (bool, int, float)) else str(value)


def distribution(series: pd.Series, categories) -> dg.TableMetadataValue:
    counts = series.value_counts().reindex(list(categories), fill_value=0)
    total = int(counts.sum()) or 1
    return table(pd.DataFrame({"value": counts.index, "count": counts.values.astype(int),
                               "share": (counts.values / total).round(3)}))


def preview(frame: pd.DataFrame, n: int = 5, width: int = 120) -> dg.MarkdownMetadataValue:
    shown = frame.head(n).copy()
    for col in shown.columns:
        if shown[col].dtype == object:
            shown[col] = shown[col].map(lambda v: (str(v)[:width] + "…") if isinstance(v, str) and len(v) > width else v)
    return dg.MetadataValue.md(shown.to_markdown(index=False))
