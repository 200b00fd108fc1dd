"""Encoding: rows to `input_ids` and `labels` (-100 where no loss is taken), token-exact, and the prepared splits
with their statistics. The bytes of this module (with formats.py, loading.py, chat.py and templates.py) are
part of every prepared folder's key: a change here prepares the data again, a change elsewhere does not."""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import math
import os
import shutil
from dataclasses import dataclass
from typing import Any

from .. import chat
from ..chat import ChatRenderer
from ..errors import InvalidConfig, RowProblem, problem
from ..params import DataSettings
from ..rowformats import CHAT_FORMATS
from ..templates import RowTemplate
from .formats import chat_column, text_value
from .loading import progress_bars

# From this many rows on, preparation runs in one process per CPU (below it, starting them costs more than the
# rows' Python work they share out). The tokenizer's own batch calls already use every CPU; the Python work per
# row is what processes divide. A chat row has several times a template row's (two renderings, its turns located:
# about 0.5 ms of CPU against 0.1 ms, bench/chat_prep.py and bench/data_prep.py), so chat rows pay for starting
# the processes (about 0.3 s) from fewer rows on.
PARALLEL_ROWS = 20_000
PARALLEL_CHAT_ROWS = 4_000


@dataclass
class Planned:
    """One row before tokenization: its full text and the character spans the loss is taken on."""

    text: str
    spans: list[tuple[int, int]]
    chat: bool  # rendered by a chat template, which writes its own BOS/EOS: tokenized without adding any
    prompt: str | None = None
    completion: str | None = None
    empty: bool = False  # an empty answer (completion or assistant turn)
    no_answer: bool = False  # nothing to train at all (a conversation without an assistant turn)
    reasoning_dropped: bool = False
    open_turn: bool = False  # an assistant turn that ends without a special token to stop on


def untrimmed(tokenizer):
    """The tokenizer's Rust backend with offsets that keep whitespace (`trim_offsets` off).

    Byte-level post-processors trim spaces from offsets; a token of spaces then covers no characters and
    could not be placed. The ids are the same: `trim_offsets` changes offsets only."""
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise InvalidConfig(
            [
                problem(
                    "model_name",
                    "the tokenizer has no fast (Rust) version, whose offsets token-exact labels need",
                    "Give the model a tokenizer.json (save_pretrained of its fast tokenizer writes one)",
                )
            ]
        )
    if "trim_offsets=True" not in repr(backend.post_processor):
        return backend  # most tokenizers (Llama 3, Qwen) keep whitespace in offsets: no copy to make
    state = json.loads(backend.to_str())
    found = []

    def untrim(node):
        if isinstance(node, dict):
            if node.get("trim_offsets"):
                node["trim_offsets"] = False
                found.append(node)
            for value in node.values():
                untrim(value)
        elif isinstance(node, list):
            for value in node:
                untrim(value)

    untrim(state.get("post_processor"))
    return Tokenizer.from_str(json.dumps(state)) if found else backend


class Encoder:
    """Turns rows into input_ids and labels (-100 where no loss is taken).

    Each row is rendered to one text with the character spans to train. The text is tokenized in one call,
    exactly as at inference, and a token is trained when at least one character it covers lies in a
    trained span. Tokens the tokenizer adds itself (BOS, an appended EOS) cover no characters: a leading
    one is never trained, a trailing one closes the row and is trained. The model's EOS ends every
    non-chat row exactly once; a chat template writes its own end-of-turn tokens.
    """

    def __init__(
        self,
        settings: DataSettings,
        fmt: str,
        tokenizer,
        columns: list[str],
        train_part_only: bool,
        stop_ids: tuple[int, ...] = (),
    ):
        self.fmt = fmt
        self.tok = tokenizer
        self.train_part_only = train_part_only
        self.eos_id = tokenizer.eos_token_id
        self.eos = tokenizer.eos_token or ""
        self.bos = tokenizer.bos_token or ""
        self.chat_column = chat_column(settings, columns) if fmt == "chat" else None
        self.chat = None
        if fmt in CHAT_FORMATS:
            template = settings.formatting_chat_template.strip() or None
            if template is None and not getattr(tokenizer, "chat_template", None):
                raise InvalidConfig(
                    [
                        problem(
                            "formatting_chat_template",
                            "the model's tokenizer has no chat template to render the conversations with",
                            "Give one in formatting_chat_template, or use a model that ships one",
                        )
                    ]
                )
            stops = {tokenizer.convert_ids_to_tokens(i) for i in stop_ids if 0 <= i < len(tokenizer)}
            self.chat = ChatRenderer(tokenizer, template, self.chat_column or "prompt/completion", stops)
        self.tools_column = "tools" if "tools" in columns and fmt in CHAT_FORMATS else None
        self.template = (
            RowTemplate(settings.formatting_template, columns, settings.completion_column, split=train_part_only)
            if fmt == "template"
            else None
        )
        self.backend = untrimmed(tokenizer)
        # Tokens added to the vocabulary whole (a turn's header, an end-of-turn token): one that begins before a
        # trained span, having absorbed the whitespace the answer starts with (Phi-3's `<|assistant|>` has
        # rstrip), belongs to the text before it and is never trained.
        self.added_ids = frozenset(self.backend.get_added_tokens_decoder())

    # --- text and spans ---

    def _pair(self, prompt: str, completion: str) -> Planned:
        if self.eos and completion.endswith(self.eos):
            completion = completion[: -len(self.eos)]
        text = prompt + completion
        start = len(prompt) if self.train_part_only else 0
        return Planned(text, [(start, len(text))], False, prompt, completion, empty=not completion.strip())

    def _conversation(self, messages: list[dict[str, Any]], tools, first: int = 0) -> Planned:
        if not self.train_part_only:
            text = self.chat.render(messages, tools)
            return Planned(text, [(0, len(text))], True)
        rendered = self.chat.locate(messages, tools, first=first)
        text, turns = rendered.text, rendered.turns
        spans = [(t.start, t.end) for t in turns]
        last = turns[-1] if turns and messages[-1]["role"] == "assistant" else None
        stop = self.chat.turn_stop() if last and not last.closed and last.end == len(text) else None
        if stop:
            # The template closes an answer with the next turn's opener, a token the model stops on: the last
            # answer, after which the template writes nothing, gets it too, or the model never learns to stop.
            text += stop
            spans[-1] = (last.start, len(text))
            last.closed = True
        return Planned(
            text,
            spans,
            True,
            empty=any(t.empty for t in turns),
            no_answer=not turns,
            reasoning_dropped=any(t.reasoning_dropped for t in turns),
            open_turn=any(not t.closed and not t.empty for t in turns),  # an empty turn has nothing to end
        )

    def plan(self, row: dict[str, Any]) -> Planned:
        """The row's full text and its trained character spans."""
        if self.fmt in CHAT_FORMATS:
            tools = chat.tools_of(row.get(self.tools_column), "tools") if self.tools_column else None
            if self.fmt == "chat":
                return self._conversation(chat.normalize(row[self.chat_column], self.chat_column), tools)
            prompt = chat.normalize(row["prompt"], "prompt")
            return self._conversation(prompt + chat.normalize(row["completion"], "completion"), tools, len(prompt))
        if self.fmt == "prompt_completion":
            return self._pair(text_value(row, "prompt"), text_value(row, "completion"))
        if self.fmt == "template" and self.train_part_only:
            return self._pair(*self.template.split(row))
        text = self.template.render(row) if self.fmt == "template" else text_value(row, "text")
        planned = self._pair("", text)
        planned.prompt = planned.completion = None
        planned.empty = False
        return planned

    # --- tokens ---

    def encode_many(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        planned = [self.plan(row) for row in rows]
        encodings = self._tokenize(planned)
        results = []
        for item, encoding in zip(planned, encodings, strict=True):
            ids, labels = self._labels(item, encoding)
            results.append(
                {
                    "input_ids": ids,
                    "labels": labels,
                    "prompt": item.prompt,
                    "completion": item.completion,
                    "text": item.text,
                    "planned": item,
                }
            )
        return results

    def encode(self, row: dict[str, Any]) -> dict[str, Any]:
        return self.encode_many([row])[0]

    def _tokenize(self, planned: list[Planned]) -> list:
        """One tokenizer call per row's whole text (batched): chat renderings as they are, other rows with
        the tokenizer's own special tokens unless the text already starts with BOS."""
        plain = [i for i, item in enumerate(planned) if item.chat or (self.bos and item.text.startswith(self.bos))]
        plain_set = set(plain)
        special = [i for i in range(len(planned)) if i not in plain_set]
        out: list = [None] * len(planned)
        for indices, add in ((plain, False), (special, True)):
            if indices:
                texts = [planned[i].text for i in indices]
                for i, encoding in zip(indices, self.backend.encode_batch(texts, add_special_tokens=add), strict=True):
                    out[i] = encoding
        return out

    def _labels(self, item: Planned, encoding) -> tuple[list[int], list[int]]:
        ids = list(encoding.ids)
        added = encoding.special_tokens_mask
        labels = [-100] * len(ids)
        for start, end in item.spans:
            tokens = _tokens_of(encoding, added, start, end)
            if tokens:
                first, last = tokens
                while first < last and ids[first] in self.added_ids and encoding.token_to_chars(first)[0] < start:
                    first += 1
                labels[first:last] = ids[first:last]
        if not item.chat:
            # Tokens the tokenizer appended after the text (an EOS) close the row.
            k = len(ids)
            while k > 0 and added[k - 1]:
                k -= 1
            if 0 < k < len(ids):
                labels[k:] = ids[k:]
            if not ids or ids[-1] != self.eos_id:
                ids.append(self.eos_id)
                labels.append(self.eos_id)
        return ids, labels


def _tokens_of(encoding, added: list[int], start: int, end: int) -> tuple[int, int] | None:
    """[first, last + 1) of the tokens covering at least one character of text[start:end], the tokenizer's
    own added tokens excepted; None when no token covers any. Rust look-ups at the span's edges, no loop
    over the row's tokens."""
    first = next((t for c in range(start, end) if (t := encoding.char_to_token(c)) is not None), None)
    if first is None:
        return None
    last = next(t for c in range(end - 1, start - 1, -1) if (t := encoding.char_to_token(c)) is not None)
    # Several tokens can cover one character (a character split into bytes): take all of them.
    while first > 0 and not added[first - 1] and (encoding.token_to_chars(first - 1) or (0, 0))[1] > start:
        first -= 1
    while last + 1 < len(added) and not added[last + 1] and (encoding.token_to_chars(last + 1) or (end, end))[0] < end:
        last += 1
    return first, last + 1


def encode_checked(encoder: Encoder, rows: list[dict[str, Any]], first_index: int, split: str) -> list[dict]:
    """Encode rows; a bad row is an error naming its number (counted from 1), its column and the fix."""
    try:
        return encoder.encode_many(rows)
    except RowProblem:
        for offset, row in enumerate(rows):
            try:
                encoder.encode(row)
            except RowProblem as exc:
                where = f"row {first_index + offset + 1}" + (f" of the {split!r} split" if split != "train" else "")
                raise InvalidConfig([problem(exc.parameter, f"{where}, {exc}", exc.fix)]) from None
        raise


def marked(tokenizer, ids: list[int], labels: list[int]) -> str:
    """Decode runs of trained and untrained tokens, the trained ones between ⟦ and ⟧."""
    parts, run, state = [], [], None
    for token, label in zip(ids, labels, strict=True):
        trained = label != -100
        if state is not None and trained != state:
            parts.append((state, run))
            run = []
        state = trained
        run.append(token)
    if run:
        parts.append((state, run))
    text = (tokenizer.decode(r, skip_special_tokens=False) for _, r in parts)
    return "".join(f"⟦{t}⟧" if trained else t for (trained, _), t in zip(parts, text, strict=True))


def _percentiles(ordered) -> dict[str, int]:
    """Percentiles of an ascending sequence of lengths."""
    if not len(ordered):
        return {}

    def at(q: float) -> int:
        return int(ordered[min(len(ordered) - 1, int(q * len(ordered)))])

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": int(ordered[-1])}


def _column_sum(ds, column: str, predicate=None) -> int:
    """Sum (or count, with a predicate) of a column in Arrow batches: memory stays flat with row count."""
    import pyarrow.compute as pc

    total = 0
    for batch in ds.select_columns([column]).with_format("arrow").iter(batch_size=50_000):
        values = batch.column(column)
        total += int(pc.sum(predicate(values) if predicate else values).as_py() or 0)
    return total


@contextlib.contextmanager
def _collector_paused():
    """The cyclic garbage collector off while a batch of rows is encoded. A batch allocates hundreds of thousands
    of lists (token ids, labels) and no cycles (none found after a batch on template or chat rows), yet every
    700 allocations the collector walks what is young: about a tenth of the batch's CPU time. It is on again
    between batches, where anything cyclic a batch left is collected."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _arrow_table(columns: dict[str, list]):
    """An encoded batch as the Arrow table datasets writes: given whole, with the types it would infer
    (`input_ids` narrowed to int32, as datasets does for the column of that name; everything else int64), instead of
    lists it would walk token by token in Python to infer them (most of its writing time). The token lists go
    through numpy, flattened: about four times faster than pyarrow converting the lists of lists."""
    import numpy as np
    import pyarrow as pa

    def token_lists(lists: list[list[int]], dtype) -> pa.Array:
        lengths = np.fromiter(map(len, lists), np.int32, count=len(lists))
        offsets = np.concatenate(([0], np.cumsum(lengths, dtype=np.int32)))
        values = np.fromiter(itertools.chain.from_iterable(lists), dtype, count=int(offsets[-1]))
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values))

    return pa.table(
        {
            name: token_lists(values, np.int32 if name == "input_ids" else np.int64)
            if name in ("input_ids", "labels")
            else pa.array(values, pa.int64())
            for name, values in columns.items()
        }
    )


def build(splits, encoder: Encoder, settings: DataSettings, staging: str) -> dict[str, Any]:
    max_len = settings.maximum_sequence_length

    flags = ("empty", "no_answer", "reasoning_dropped", "open_turn")

    def encoder_for(split: str):
        def encode_batch(batch: dict[str, list], indices: list[int]):
            columns = {name: batch[name] for name in batch}
            rows = [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
            out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "trained": []}
            out.update({flag: [] for flag in flags})
            with _collector_paused():
                for encoded in encode_checked(encoder, rows, indices[0] if indices else 0, split):
                    ids, labels = encoded["input_ids"], encoded["labels"]
                    out["length"].append(len(ids))
                    out["input_ids"].append(ids[:max_len])
                    out["labels"].append(labels[:max_len])
                    kept = labels[:max_len]
                    out["trained"].append(len(kept) - kept.count(-100))
                    for flag in flags:
                        out[flag].append(int(getattr(encoded["planned"], flag)))
            return _arrow_table(out)

        return encode_batch

    rows_total = sum(len(s) for s in splits.values())
    parallel = rows_total >= (PARALLEL_CHAT_ROWS if encoder.fmt in CHAT_FORMATS else PARALLEL_ROWS)
    workers = min(os.cpu_count() or 1, 8) if parallel else None
    work = os.path.join(staging, ".work")  # inside the staging folder, under its lock
    os.makedirs(work, exist_ok=True)
    try:
        tokenized = {}
        for name, split in splits.items():
            # One bar, for the one step that takes a while on a large dataset; none for the small steps after.
            with progress_bars(shown=parallel):
                tokenized[name] = split.map(
                    encoder_for(name),
                    with_indices=True,
                    batched=True,
                    batch_size=1000,
                    num_proc=workers,
                    remove_columns=split.column_names,
                    cache_file_name=os.path.join(work, f"{name}.arrow"),
                    desc=f"Preparing {name} rows",
                )
        with progress_bars(shown=False):
            return _kept_and_saved(tokenized, encoder, settings, staging, work, max_len)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _kept_and_saved(
    tokenized, encoder, settings: DataSettings, staging: str, work: str, max_len: int
) -> dict[str, Any]:
    """The rows with something to train, split for evaluation when asked, saved to `staging`; their statistics."""
    import pyarrow.compute as pc
    from datasets import DatasetDict

    stats = _statistics(tokenized, encoder.fmt, settings)
    kept = {
        name: ds.filter(
            lambda t: [x > 0 for x in t],
            input_columns="trained",
            batched=True,
            cache_file_name=os.path.join(work, f"{name}-kept.arrow"),
        )
        for name, ds in tokenized.items()
    }
    # Splits that cannot work (nothing to train, an eval fraction that leaves no training rows, an eval
    # split with nothing left) are saved as they are: validation's statistics rules refuse them.
    rows = len(kept["train"])
    if "eval" not in kept and settings.eval_split > 0 and 0 < math.ceil(settings.eval_split * rows) < rows:
        parts = kept["train"].train_test_split(
            test_size=settings.eval_split,
            seed=settings.seed,
            train_indices_cache_file_name=os.path.join(work, "split-train.arrow"),
            test_indices_cache_file_name=os.path.join(work, "split-eval.arrow"),
        )
        kept = {"train": parts["train"], "eval": parts["test"]}
    stats["rows_used"] = len(kept["train"])
    stats["eval_rows"] = len(kept["eval"]) if "eval" in kept else 0
    stats["trainable_tokens"] = _column_sum(kept["train"], "trained")
    stats["total_tokens"] = _column_sum(kept["train"], "length", lambda v: pc.min_element_wise(v, max_len))
    final = DatasetDict({name: ds.select_columns(["input_ids", "labels"]) for name, ds in kept.items()})
    final.save_to_disk(staging)
    return stats


def _statistics(tokenized, fmt: str, settings: DataSettings) -> dict[str, Any]:
    """Rows, drops and truncation of the training split."""
    import numpy as np
    import pyarrow.compute as pc

    train = tokenized["train"]
    max_len = settings.maximum_sequence_length
    lengths = np.sort(train.with_format("arrow")["length"].to_numpy())
    dropped = _column_sum(train, "trained", lambda v: pc.equal(v, 0))
    stats = {
        "format": fmt,
        "rows": len(train),
        "dropped": dropped,
        "truncated": int((lengths > max_len).sum()),
        "length_percentiles": _percentiles(lengths),
        # Rows with an empty answer, nothing to train, reasoning the template left out, or an assistant turn
        # ending without a special token; the data rules turn these into warnings.
        "empty_answers": _column_sum(train, "empty"),
        "no_answer": _column_sum(train, "no_answer"),
        "reasoning_dropped": _column_sum(train, "reasoning_dropped"),
        "open_turns": _column_sum(train, "open_turn"),
    }
    return stats
