"""The row formats the data code recognizes, and what validation may know of a dataset before its rows are
tokenized. Early in the import order: planning and validation read them, and the data package builds them."""

from __future__ import annotations

from dataclasses import dataclass

# Data files by suffix, with the datasets builder that reads each.
DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

# Row formats whose trained parts are assistant turns.
CHAT_FORMATS = ("chat", "chat_prompt_completion")


@dataclass(frozen=True)
class DataFacts:
    """What validation may know about the dataset before its rows are tokenized."""

    format: str  # text | prompt_completion | chat | chat_prompt_completion | template
    columns: tuple[str, ...]
    key: str  # the fingerprint of everything that shapes the prepared rows
