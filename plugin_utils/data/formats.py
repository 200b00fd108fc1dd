"""Formats: which kind of rows a dataset holds (plain text, prompt/completion, chat, or a formatting template's
columns), found from its columns and the types of their values in several rows."""

from __future__ import annotations

from typing import Any

from .. import chat
from ..errors import InvalidConfig, RowProblem, problem
from ..params import DataSettings


def _values(rows: list[dict[str, Any]], column: str) -> list[Any]:
    """The non-null values of a column among the rows looked at (a null is a bad row, found later by number)."""
    return [r.get(column) for r in rows if r.get(column) is not None]


def chat_column(settings: DataSettings, columns: list[str]) -> str | None:
    """The column holding conversations: chatml_formatted_column, else `messages` or ShareGPT `conversations`.

    A column named explicitly that the data lack is an error when apply_chat_template asks for it."""
    asked = settings.chatml_formatted_column or "messages"
    if asked in columns:
        return asked
    if asked != "messages" and settings.apply_chat_template:
        raise InvalidConfig(
            [
                problem(
                    "chatml_formatted_column",
                    f"{asked!r} is not a column of the dataset (columns: {', '.join(columns)})",
                    "Name the column that holds the conversations",
                )
            ]
        )
    return next((c for c in ("messages", "conversations") if c in columns), None)


def detect_format(settings: DataSettings, columns: list[str], rows: list[dict[str, Any]]) -> tuple[str, str]:
    """(format, why), from the columns and the types of their values in several rows, not just the first."""
    chat = chat_column(settings, columns)
    if settings.apply_chat_template:
        if chat is None:
            raise InvalidConfig(
                [
                    problem(
                        "chatml_formatted_column",
                        f"no 'messages' column for apply_chat_template (columns: {', '.join(columns)})",
                        "Name the column that holds the conversations",
                    )
                ]
            )
        return "chat", f"apply_chat_template is on and the rows have a {chat!r} column"
    if settings.formatting_template.strip():
        return "template", "a formatting_template was given"
    if "prompt" in columns and "completion" in columns:
        if any(isinstance(v, list) for v in _values(rows, "prompt") + _values(rows, "completion")):
            return "chat_prompt_completion", "the rows have 'prompt' and 'completion' lists of messages"
        return "prompt_completion", "the rows have 'prompt' and 'completion' columns"
    if chat is not None:
        return "chat", f"the rows have a {chat!r} column of conversations"
    if "text" in columns:
        return "text", "the rows have a 'text' column"
    raise InvalidConfig(
        [
            problem(
                "dataset_name",
                f"no known row format in columns {', '.join(columns)}",
                "Give a formatting_template that uses these columns, or use text, prompt/completion or messages rows",
            )
        ]
    )


def text_value(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    if isinstance(value, str):
        return value
    if value is None:
        raise RowProblem("dataset_name", column, "is empty (null)", f"Give every row a {column}, or remove the row")
    raise RowProblem("dataset_name", column, f"holds {chat.kind(value)} ({str(value)[:40]}), not text", "Make it text")
