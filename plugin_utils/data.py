"""Data preparation, done once in the parent before any rank starts.

Rows are loaded, their format detected, templates applied, and everything tokenized into `input_ids`
plus `labels` (-100 where no loss is taken), truncated, and saved with `save_to_disk` into a cache keyed by
everything that affects the result. Ranks memory-map that folder and never template or tokenize.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import chat
from .chat import ChatRenderer, RowProblem
from .errors import InvalidConfig, StopRequested, problem
from .sources import CHAT_FORMATS, DataFacts, load_tokenizer, workspace_dataset
from .templates import RowTemplate

log = logging.getLogger("sft")

PREP_VERSION = "3"
DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
EVAL_SPLIT_NAMES = ("validation", "valid", "eval", "test")
# From this many rows on, preparation runs in one process per CPU (below it, starting them costs more).
PARALLEL_ROWS = 20_000


@dataclass
class Prepared:
    path: str  # the cache folder, named by cache_key
    key: str  # the data key (Source.key): what a resumed run must share
    stats: dict[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list)
    cached: bool = False
    # The same rows for people: the training text with the trained parts between ⟦ and ⟧.
    marked: list[str] = field(default_factory=list)


# --- loading -------------------------------------------------------------------------------------


def _data_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.suffix in DATA_SUFFIXES and f.name != "index.json")


@dataclass(frozen=True)
class Located:
    """Where a dataset_name's rows are."""

    kind: str  # files | disk | hub
    paths: list[Path] = field(default_factory=list)
    hub_id: str = ""
    config_name: str | None = None  # the Hub dataset's configuration (a TransformerLab dataset's config_name)
    workspace: bool = False  # a dataset id of the TransformerLab workspace


def resolve_source(name: str) -> Located:
    """Files, a save_to_disk folder, or a Hub dataset, for a dataset_name: a path, a dataset id of the
    TransformerLab workspace (SPEC §4), or a Hub id."""
    path = Path(os.path.expanduser(name))
    if path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            raise InvalidConfig(
                [problem("dataset_name", f"{name} is not a .jsonl/.json/.csv/.parquet file", "Convert it")]
            )
        return Located("files", [path])
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
            return Located("disk", [path])
        files = _data_files(path)
        if files:
            return Located("files", files)
        raise InvalidConfig([problem("dataset_name", f"folder {name} holds no data files", "Add .jsonl files to it")])
    found = workspace_dataset(name)
    if found and found.location == "huggingfacehub":
        return Located("hub", hub_id=found.hub_id, config_name=found.config_name, workspace=True)
    if found:
        files = _data_files(Path(found.folder))
        if not files:
            raise InvalidConfig(
                [problem("dataset_name", f"dataset {name!r} holds no data files", "Re-upload the dataset")]
            )
        return Located("files", files, workspace=True)
    if os.environ.get("HF_HUB_OFFLINE") == "1" or "/" not in name or name.startswith((".", "/")):
        raise InvalidConfig(
            [
                problem(
                    "dataset_name",
                    f"{name!r} is not a data file, a dataset folder or a dataset of this workspace",
                    "Give the path of a .jsonl/.json/.csv/.parquet file or folder",
                )
            ]
        )
    return Located("hub", hub_id=name)


def _load_hub(name: str, source: Located):
    """A Hub dataset; one that cannot be loaded (offline and not in the cache, unknown, gated) is an error
    naming dataset_name and the fix, not a traceback."""
    import datasets

    try:
        return datasets.load_dataset(source.hub_id, source.config_name)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        hub = source.hub_id + (f" (config {source.config_name!r})" if source.config_name else "")
        what = f"{name!r} of this workspace is the Hub dataset {hub}" if source.workspace else f"the Hub dataset {hub}"
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            what += f", not in the local cache while HF_HUB_OFFLINE=1 ({reason})"
            fix = "Unset HF_HUB_OFFLINE so it can be downloaded, or upload its files to TransformerLab as a dataset"
        else:
            what += f", which could not be loaded ({reason})"
            fix = "Check the id (and HF_TOKEN for a gated dataset), or give a local file"
        raise InvalidConfig([problem("dataset_name", what, fix)]) from None


def _check_json_lines(path: Path) -> None:
    """A malformed JSON Lines file is an error naming the file and line, not a pyarrow traceback."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            line = raw.strip()
            if not line:
                continue
            try:
                value = json.loads(line)
            except ValueError as exc:
                raise InvalidConfig(
                    [problem("dataset_name", f"{path} line {number} is not valid JSON ({exc.msg})", "Fix that line")]
                ) from None
            if not isinstance(value, dict):
                raise InvalidConfig(
                    [problem("dataset_name", f"{path} line {number} is not a JSON object", "Make every line an object")]
                )


def _csv_as_text(path: Path) -> dict[str, Any]:
    import csv

    import datasets

    with path.open(newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle), [])
    features = datasets.Features({column: datasets.Value("string") for column in header})
    return {"features": features, "keep_default_na": False}


def load_splits(name: str):
    """Load the dataset as a dict of split name -> datasets.Dataset."""
    import datasets

    source = resolve_source(name)
    paths = source.paths
    if source.kind == "disk":
        loaded = datasets.load_from_disk(str(paths[0]))
        splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    elif source.kind == "hub":
        splits = dict(_load_hub(name, source))
    else:
        by_split: dict[str, list[str]] = {}
        for path in paths:
            if path.stat().st_size == 0:
                raise InvalidConfig([problem("dataset_name", f"{path} is empty", "Give a file with training rows")])
            words = set(re.split(r"[^a-z0-9]+", path.stem.lower()))
            split = next((s for s in EVAL_SPLIT_NAMES if s in words), "train")
            by_split.setdefault(split, []).append(str(path))
        if "train" not in by_split:
            by_split = {"train": [f for files in by_split.values() for f in files]}
        builder = DATA_SUFFIXES[paths[0].suffix]
        try:
            # CSV cells are text: "1." stays "1." instead of becoming a float, and empty cells stay "".
            options = _csv_as_text(paths[0]) if builder == "csv" else {}
            with _progress_bars(shown=False):  # reading local files: quick, and the row count is logged next
                splits = dict(datasets.load_dataset(builder, data_files=by_split, **options))
        except Exception as exc:
            # Name the file and line when a JSON Lines file is at fault (checked only on failure: it costs a pass).
            for path in paths:
                if path.suffix == ".jsonl":
                    _check_json_lines(path)
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise InvalidConfig(
                [problem("dataset_name", f"could not read {paths[0]}: {reason}", "Fix the file")]
            ) from None
    train = splits.get("train") or next(iter(splits.values()), None)
    if train is None or len(train) == 0:
        raise InvalidConfig([problem("dataset_name", f"{name} has no rows", "Give a dataset with training rows")])
    result = {"train": train}
    own = next((name for name in EVAL_SPLIT_NAMES if name in splits and name != "train"), None)
    if own is not None:
        result[own] = splits[own]
    return result


def choose_eval(splits: dict[str, Any], eval_split: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """The splits to prepare, and how evaluation is done.

    eval_split 0 means no evaluation: a split the dataset brings (validation, valid, eval or test) is
    left out. Above 0, that split is the evaluation set when there is one (eval_split's fraction is not
    applied then); without one, a seeded eval_split fraction of the training rows is held out."""
    own = next((name for name in splits if name != "train"), None)
    info: dict[str, Any] = {"eval_source": None, "own_eval_split": own, "own_eval_rows": len(splits[own]) if own else 0}
    if eval_split <= 0:
        return {"train": splits["train"]}, info
    if own is not None:
        info["eval_source"] = f"split {own!r}"
        return {"train": splits["train"], "eval": splits[own]}, info
    info["eval_source"] = f"held out ({eval_split:g} of the training rows)"
    return {"train": splits["train"]}, info


# --- formats -------------------------------------------------------------------------------------


def _values(rows: list[dict[str, Any]], column: str) -> list[Any]:
    """The non-null values of a column among the rows looked at (a null is a bad row, found later by number)."""
    return [r.get(column) for r in rows if r.get(column) is not None]


def chat_column(p: dict[str, Any], columns: list[str]) -> str | None:
    """The column holding conversations: chatml_formatted_column, else `messages` or ShareGPT `conversations`.

    A column named explicitly that the data lack is an error when apply_chat_template asks for it."""
    asked = p["chatml_formatted_column"] or "messages"
    if asked in columns:
        return asked
    if asked != "messages" and p["apply_chat_template"]:
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


def detect_format(p: dict[str, Any], columns: list[str], rows: list[dict[str, Any]]) -> tuple[str, str]:
    """(format, why), from the columns and the types of their values in several rows, not just the first."""
    chat = chat_column(p, columns)
    if p["apply_chat_template"]:
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
    if p["formatting_template"].strip():
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


def _text_value(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    if isinstance(value, str):
        return value
    if value is None:
        raise RowProblem("dataset_name", column, "is empty (null)", f"Give every row a {column}, or remove the row")
    raise RowProblem("dataset_name", column, f"holds {chat.kind(value)} ({str(value)[:40]}), not text", "Make it text")


# --- encoding ------------------------------------------------------------------------------------


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

    def __init__(self, p: dict[str, Any], fmt: str, tokenizer, columns: list[str], train_part_only: bool):
        self.fmt = fmt
        self.tok = tokenizer
        self.train_part_only = train_part_only
        self.eos_id = tokenizer.eos_token_id
        self.eos = tokenizer.eos_token or ""
        self.bos = tokenizer.bos_token or ""
        self.chat_column = chat_column(p, columns) if fmt == "chat" else None
        self.chat = None
        if fmt in CHAT_FORMATS:
            template = p["formatting_chat_template"].strip() or None
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
            self.chat = ChatRenderer(tokenizer, template, self.chat_column or "prompt/completion")
        self.tools_column = "tools" if "tools" in columns and fmt in CHAT_FORMATS else None
        self.template = (
            RowTemplate(p["formatting_template"], columns, p["completion_column"], split=train_part_only)
            if fmt == "template"
            else None
        )
        self.backend = untrimmed(tokenizer)

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
        turns = rendered.turns
        return Planned(
            rendered.text,
            [(t.start, t.end) for t in turns],
            True,
            empty=any(t.empty for t in turns),
            no_answer=not turns,
            reasoning_dropped=any(t.reasoning_dropped for t in turns),
            open_turn=any(not t.closed for t in turns),
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
            return self._pair(_text_value(row, "prompt"), _text_value(row, "completion"))
        if self.fmt == "template" and self.train_part_only:
            return self._pair(*self.template.split(row))
        text = self.template.render(row) if self.fmt == "template" else _text_value(row, "text")
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
                labels[tokens[0] : tokens[1]] = ids[tokens[0] : tokens[1]]
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


# --- preparation ---------------------------------------------------------------------------------


# --- the cache's key -----------------------------------------------------------------------------

# Every parameter the data code reads, besides model_name and dataset_name (which enter the key by content:
# the tokenizer's files, the data's bytes). tests/test_cache.py holds the data code to this list.
SHAPING_PARAMETERS = (
    "formatting_template",
    "apply_chat_template",
    "chatml_formatted_column",
    "formatting_chat_template",
    "completion_only_loss",
    "assistant_only_loss",
    "completion_column",
    "maximum_sequence_length",
    "eval_split",
    "seed",
)
# The files a tokenizer may be loaded from (AutoTokenizer and the tokenizer classes it picks): every file of
# the model folder or Hub snapshot that matches one of these, never the weights.
TOKENIZER_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges*",
    "*.model",
    "*.spm",
    "*.tiktoken",
    "chat_template*",
    "additional_chat_templates/*",
    "config.json",
)
# The code that turns rows into tokens: this plugin's own modules (by content) and the libraries (by version).
SHAPING_SOURCES = tuple(Path(__file__).with_name(name) for name in ("data.py", "chat.py", "templates.py", "sources.py"))
SHAPING_LIBRARIES = ("transformers", "tokenizers", "datasets", "jinja2", "sentencepiece")


def _hash_file(digest, path: Path) -> None:
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def tokenizer_folder(model_name: str) -> tuple[Path | None, str]:
    """The folder the tokenizer is loaded from and, for a Hub id, the commit of that snapshot. Online, the
    Hub says which commit is current (its tokenizer files are fetched, as loading the tokenizer would);
    offline, the cache's. (None, '') when neither has it: loading the tokenizer then names the problem."""
    folder = Path(os.path.expanduser(model_name))
    if folder.is_dir():
        return folder, ""
    try:
        from huggingface_hub import snapshot_download

        found = snapshot_download(model_name, allow_patterns=list(TOKENIZER_FILES), local_files_only=_offline())
        snapshot = Path(found)
    except Exception:  # not cached offline, unreachable, gated, or no valid repo id
        return None, ""
    return snapshot, snapshot.name


def _tokenizer_files(folder: Path) -> list[Path]:
    found = {path for pattern in TOKENIZER_FILES for path in folder.glob(pattern) if path.is_file()}
    return sorted(found, key=lambda path: path.relative_to(folder).as_posix())


def _fingerprint(p: Mapping[str, Any], model_path: str, data_name: str) -> str:
    """The data key: the rows, the tokenizer (every file it may read, and the Hub commit), the template and
    every data-shaping parameter. A resumed run must have the same (the code's version is not part of it)."""
    digest = hashlib.sha256()
    digest.update(json.dumps({k: p[k] for k in SHAPING_PARAMETERS}, sort_keys=True).encode())
    digest.update(PREP_VERSION.encode())
    source = resolve_source(data_name)
    targets = [f for path in source.paths for f in (sorted(path.rglob("*")) if path.is_dir() else [path])]
    if source.kind == "hub":
        digest.update(json.dumps([source.hub_id, source.config_name]).encode())
    for target in targets:
        if target.is_file():
            digest.update(str(target.name).encode())
            _hash_file(digest, target)
    folder, revision = tokenizer_folder(model_path)
    # A local folder is known by its files alone; a Hub model by its id and commit too.
    digest.update(json.dumps(["" if folder and not revision else model_path, revision]).encode())
    for path in _tokenizer_files(folder) if folder else []:
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        _hash_file(digest, path)
        digest.update(b"\0")
    return digest.hexdigest()[:24]


def toolchain() -> dict[str, str]:
    """The code that shapes the rows: the plugin's data modules by content, the libraries by version."""
    from importlib import metadata

    found = {path.name: hashlib.sha256(path.read_bytes()).hexdigest()[:16] for path in SHAPING_SOURCES}
    for name in SHAPING_LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def cache_key(data_key: str, completion_only: bool) -> str:
    """The prepared folder's name: the data key, the loss mode, and the code and libraries that shaped the
    rows (a new version prepares again, while a checkpoint stays resumable)."""
    facts = {"data": data_key, "completion_only": completion_only, "toolchain": toolchain()}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:24]


# --- the cache's folder --------------------------------------------------------------------------
#
# <root>/<key>/               a prepared dataset, published whole by one rename (stats.json is in it)
# <root>/<key>.tmp-<pid>-*/   a preparation under way; renamed to <key> when done
# Each folder holds in_use.lock: a run reading the folder (or building it) holds a shared lock on it for its
# whole life, and a folder is removed only under an exclusive one, so nothing in use is ever removed.

DEFAULT_KEEP = 20
DEFAULT_MAX_GIB = 20.0
IN_USE = "in_use.lock"
STAGING = ".tmp-"
# A staging folder nobody holds is removed once it is this old (younger, its preparation may be starting).
STALE_STAGING_S = 3600
# Lock descriptors held until this process exits: the prepared folders this run reads.
_held: list[int] = []


def cache_root() -> str:
    default = os.path.join(os.path.expanduser("~"), ".cache", "sft_trainer_trl", "prepared")
    return os.environ.get("SFT_PREPARED_CACHE", default)


@dataclass(frozen=True)
class CacheBounds:
    entries: int
    bytes: int


def _env_number(name: str, default: float, kind: type, what: str) -> Any:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value <= 0:
        raise InvalidConfig([problem(name, f"{raw!r} is not {what}", f"Set it to one, or unset it for {default:g}")])
    return value


def cache_bounds() -> CacheBounds:
    """How much the cache keeps: the SFT_PREPARED_CACHE_KEEP most recently used datasets, at most
    SFT_PREPARED_CACHE_MAX_GIB in all, whichever is smaller."""
    entries = _env_number("SFT_PREPARED_CACHE_KEEP", DEFAULT_KEEP, int, "a whole number of datasets above 0")
    gib = _env_number("SFT_PREPARED_CACHE_MAX_GIB", DEFAULT_MAX_GIB, float, "a size in GiB above 0")
    return CacheBounds(entries, int(gib * 2**30))


def _lock(folder: Path, exclusive: bool) -> int | None:
    """A lock on folder's in_use.lock, checked to be still at that path once taken (a remover may have moved
    the folder away meanwhile): its descriptor, or None when the folder is gone or (exclusive) in use."""
    try:
        fd = os.open(folder / IN_USE, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH)
        if os.path.samestat(os.fstat(fd), os.stat(folder / IN_USE)):
            return fd
    except (BlockingIOError, FileNotFoundError):
        pass
    os.close(fd)
    return None


def _use(folder: Path) -> dict[str, Any] | None:
    """The statistics of a complete prepared folder, now held in use by this process and marked as just
    used; None when there is none."""
    if not (folder / "stats.json").is_file():
        return None
    try:
        fd = _lock(folder, exclusive=False)
    except PermissionError:  # a cache this user may only read: usable, not marked
        return json.loads((folder / "stats.json").read_text())
    if fd is None:
        return None
    try:
        stats = json.loads((folder / "stats.json").read_text())
        os.utime(folder / "stats.json")  # its last use (the folder's own time moves with what is created in it)
    except FileNotFoundError:
        os.close(fd)
        return None
    _held.append(fd)
    return stats


def _remove(folder: Path) -> bool:
    """Remove a folder nobody holds: moved away from its name at once, then deleted. False when it is in use
    or already gone (a concurrent remover took it)."""
    try:
        fd = _lock(folder, exclusive=True)
    except PermissionError:  # a cache this user may only read
        return False
    if fd is None:
        return False
    trash = folder.with_name(f"{folder.name}{STAGING}removed-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(folder, trash)
    except FileNotFoundError:
        return False
    finally:
        os.close(fd)
    shutil.rmtree(trash, ignore_errors=True)
    return True


def _size(folder: Path) -> int:
    total = 0
    for top, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(top, name)).st_size
    return total


def evict(root: Path, bounds: CacheBounds, using: Path) -> None:
    """Remove the least recently used prepared datasets beyond the bounds, and staging folders that nobody
    holds any more (a preparation that was killed). `using` (this run's) and every folder another process
    holds stay, and count; folders a concurrent evictor removes first are skipped."""
    entries = []
    now = time.time()
    for folder in root.iterdir() if root.is_dir() else []:
        try:
            info = folder.stat()
        except FileNotFoundError:
            continue
        if not folder.is_dir() or folder.name.startswith(".") or folder == using:
            continue
        if STAGING in folder.name:
            if now - info.st_mtime > STALE_STAGING_S:
                _remove(folder)
            continue
        # Last used: stats.json's time (see _use), never the folder's, which taking a lock in it may move.
        # Without stats.json it holds no dataset: first to go.
        try:
            used = (folder / "stats.json").stat().st_mtime
        except FileNotFoundError:
            used = 0.0
        entries.append((used, folder))
    count, size, full = 1, _size(using), False
    for _, folder in sorted(entries, reverse=True):
        folder_size = _size(folder)
        full = full or count >= bounds.entries or size + folder_size > bounds.bytes
        if full and _remove(folder):
            log.info("data: removed the least recently used prepared dataset %s", folder)
            continue
        count, size = count + 1, size + folder_size


def _percentiles(ordered) -> dict[str, int]:
    """Percentiles of an ascending sequence of lengths."""
    if not len(ordered):
        return {}

    def at(q: float) -> int:
        return int(ordered[min(len(ordered) - 1, int(q * len(ordered)))])

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": int(ordered[-1])}


@dataclass
class Source:
    """The dataset loaded and its format found, before any row is tokenized."""

    splits: dict[str, Any]
    eval_info: dict[str, Any]
    format: str
    why: str
    columns: list[str]
    head: list[dict[str, Any]]  # the first rows: the format is found from them, the preview shows them
    key: str  # the data key: the rows, tokenizer, template and data settings (_fingerprint)

    def facts(self) -> DataFacts:
        return DataFacts(format=self.format, columns=tuple(self.columns), key=self.key)


def load(p: Mapping[str, Any]) -> Source:
    """Load the dataset and find its format; rows that cannot be read are errors naming the file and line."""
    splits, eval_info = choose_eval(load_splits(p["dataset_name"]), p["eval_split"])
    train = splits["train"]
    columns = list(train.column_names)
    head = [train[i] for i in range(min(len(train), 64))]
    fmt, why = detect_format(p, columns, head)
    log.info("data: %s rows, format %s (%s)", len(train), fmt, why)
    log.info("data: evaluation: %s", _eval_text(eval_info))
    key = _fingerprint(p, p["model_name"], p["dataset_name"])
    return Source(splits, eval_info, fmt, why, columns, head, key)


def prepare(
    p: Mapping[str, Any], source: Source, completion_only: bool, *, preview: int = 3, stopping=lambda: False
) -> Prepared:
    """Format, tokenize and save the rows; reuse the cache when nothing changed. `completion_only` is the
    plan's loss mode: whether only completions (assistant turns) are trained. `stopping()` is asked once more
    before the result is published: a stop that a worker pool swallowed still leaves nothing behind."""
    bounds = cache_bounds()  # a bad bound is an error before any work
    tokenizer = load_tokenizer(p["model_name"])
    encoder = Encoder(p, source.format, tokenizer, source.columns, completion_only)
    max_len = p["maximum_sequence_length"]

    samples, marked = [], []
    for encoded in _encode_checked(encoder, source.head[:preview], 0, "train"):
        ids, labels = encoded["input_ids"][:max_len], encoded["labels"][:max_len]
        trained = [t for t, lab in zip(ids, labels, strict=True) if lab != -100]
        marked.append(_marked(tokenizer, ids, labels))
        samples.append(
            {
                "prompt": encoded["prompt"],
                "completion": encoded["completion"],
                "text": encoded["text"],
                "trained_text": tokenizer.decode(trained, skip_special_tokens=False),
                "trained_tokens": tokenizer.convert_ids_to_tokens(trained),
            }
        )

    root = Path(cache_root())
    target = root / cache_key(source.key, completion_only)
    stats = _use(target)
    if stats is not None:
        log.info("data: reusing the prepared dataset at %s (same data, template, tokenizer and settings)", target)
        evict(root, bounds, target)
        return Prepared(str(target), source.key, stats, samples, cached=True, marked=marked)

    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{target.name}{STAGING}{os.getpid()}-", dir=root))
    fd = _lock(staging, exclusive=False)  # held while building: evictors leave the folder alone
    ours = False
    try:
        stats = {**_build(source.splits, encoder, p, str(staging)), **source.eval_info}
        (staging / "stats.json").write_text(json.dumps(stats, indent=2))
        if stopping():
            raise StopRequested(0)
        published = _publish(staging, target)
        ours = published is None
        stats = stats if ours else published
    finally:
        if fd is not None and ours:
            _held.append(fd)  # the published folder is this run's: in use until it exits
        elif fd is not None:
            os.close(fd)
        shutil.rmtree(staging, ignore_errors=True)
    evict(root, bounds, target)
    return Prepared(str(target), source.key, stats, samples, marked=marked)


def _publish(staging: Path, target: Path) -> dict[str, Any] | None:
    """Give the finished staging folder its key in one rename, so that no half-written folder is ever under
    the key. When an identical preparation published first, its folder is used and this one dropped: a
    published folder is never replaced, as another run may be reading it. None when ours was published, else
    the statistics of the one that was."""
    for _ in range(10):
        try:
            os.rename(staging, target)
            return None
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        stats = _use(target)
        if stats is not None:
            return stats
        # A folder at the key with no complete dataset in it (or one just removed): nobody reads it.
        _remove(target)
    raise RuntimeError(f"could not publish the prepared dataset at {target}")


def _eval_text(info: dict[str, Any]) -> str:
    if info["eval_source"]:
        return info["eval_source"]
    if info["own_eval_split"]:
        return f"none (eval_split is 0; the dataset's {info['own_eval_split']!r} split is not used)"
    return "none (eval_split is 0)"


def _marked(tokenizer, ids: list[int], labels: list[int]) -> str:
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


def _encode_checked(encoder: Encoder, rows: list[dict[str, Any]], first_index: int, split: str) -> list[dict]:
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


def _column_sum(ds, column: str, predicate=None) -> int:
    """Sum (or count, with a predicate) of a column in Arrow batches: memory stays flat with row count."""
    import pyarrow.compute as pc

    total = 0
    for batch in ds.select_columns([column]).with_format("arrow").iter(batch_size=50_000):
        values = batch.column(column)
        total += int(pc.sum(predicate(values) if predicate else values).as_py() or 0)
    return total


def _build(splits, encoder: Encoder, p: dict[str, Any], staging: str) -> dict[str, Any]:
    max_len = p["maximum_sequence_length"]

    flags = ("empty", "no_answer", "reasoning_dropped", "open_turn")

    def encoder_for(split: str):
        def encode_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
            columns = {name: batch[name] for name in batch}
            rows = [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
            out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "trained": []}
            out.update({flag: [] for flag in flags})
            for encoded in _encode_checked(encoder, rows, indices[0] if indices else 0, split):
                ids, labels = encoded["input_ids"], encoded["labels"]
                out["length"].append(len(ids))
                out["input_ids"].append(ids[:max_len])
                out["labels"].append(labels[:max_len])
                kept = labels[:max_len]
                out["trained"].append(len(kept) - kept.count(-100))
                for flag in flags:
                    out[flag].append(int(getattr(encoded["planned"], flag)))
            return out

        return encode_batch

    rows_total = sum(len(s) for s in splits.values())
    workers = min(os.cpu_count() or 1, 8) if rows_total >= PARALLEL_ROWS else None
    work = os.path.join(staging, ".work")  # inside the staging folder, under its lock
    os.makedirs(work, exist_ok=True)
    try:
        tokenized = {}
        for name, split in splits.items():
            # One bar, for the one step that takes a while on a large dataset; none for the small steps after.
            with _progress_bars(shown=rows_total >= PARALLEL_ROWS):
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
        with _progress_bars(shown=False):
            return _kept_and_saved(tokenized, encoder, p, staging, work, max_len)
    except BaseException:
        _end_worker_processes()
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _end_worker_processes() -> None:
    """End the processes a parallel map started (its worker pool, and the manager process datasets starts beside
    it). A stop that interrupts the map can leave them running, and this process would then never exit: at exit
    it waits for them."""
    try:
        import multiprocess
    except ImportError:
        return
    children = multiprocess.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(timeout=5)
        if child.is_alive():
            child.kill()
            child.join(timeout=5)


@contextlib.contextmanager
def _progress_bars(shown: bool):
    """datasets' progress bars on or off for a block, as they were after it."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    (datasets.enable_progress_bars if shown else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.disable_progress_bars if was_disabled else datasets.enable_progress_bars)()


def _kept_and_saved(tokenized, encoder, p: dict[str, Any], staging: str, work: str, max_len: int) -> dict[str, Any]:
    """The rows with something to train, split for evaluation when asked, saved to `staging`; their statistics."""
    import pyarrow.compute as pc
    from datasets import DatasetDict

    stats = _statistics(tokenized, encoder.fmt, p)
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
    if "eval" not in kept and p["eval_split"] > 0 and 0 < math.ceil(p["eval_split"] * rows) < rows:
        parts = kept["train"].train_test_split(
            test_size=p["eval_split"],
            seed=p["seed"],
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


def _statistics(tokenized, fmt: str, p: dict[str, Any]) -> dict[str, Any]:
    """Rows, drops and truncation of the training split."""
    import numpy as np
    import pyarrow.compute as pc

    train = tokenized["train"]
    max_len = p["maximum_sequence_length"]
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
