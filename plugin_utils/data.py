"""Data preparation, done once in the parent before any rank starts.

Rows are loaded, their format detected, templates applied, and everything tokenized into `input_ids`
plus `labels` (-100 where no loss is taken), truncated, and saved with `save_to_disk` into a cache keyed by
everything that affects the result. Ranks memory-map that folder and never template or tokenize.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidConfig, problem
from .templates import RowTemplate

log = logging.getLogger("sft")

PREP_VERSION = "1"
DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
EVAL_SPLIT_NAMES = ("validation", "valid", "eval", "test")
# From this many rows on, preparation runs in one process per CPU (below it, starting them costs more).
PARALLEL_ROWS = 20_000


@dataclass
class Prepared:
    path: str
    stats: dict[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list)
    cached: bool = False
    # The same rows for people: the training text with the trained parts between ⟦ and ⟧.
    marked: list[str] = field(default_factory=list)

    @property
    def has_eval(self) -> bool:
        return os.path.isdir(os.path.join(self.path, "eval"))

    @property
    def key(self) -> str:
        """The fingerprint of everything that shaped these rows (the cache folder's name)."""
        return os.path.basename(self.path)


# --- loading -------------------------------------------------------------------------------------


def workspace_dir() -> str:
    if os.environ.get("TFL_WORKSPACE_DIR"):
        return os.environ["TFL_WORKSPACE_DIR"]
    home = os.environ.get("TFL_HOME_DIR") or os.path.join(os.path.expanduser("~"), ".transformerlab")
    return os.path.join(home, "workspace")


def _data_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.suffix in DATA_SUFFIXES and f.name != "index.json")


def resolve_source(name: str) -> tuple[str, list[Path]]:
    """('files', paths) | ('disk', [folder]) | ('hub', []) for a dataset_name."""
    path = Path(os.path.expanduser(name))
    if path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            raise InvalidConfig(
                [problem("dataset_name", f"{name} is not a .jsonl/.json/.csv/.parquet file", "Convert it")]
            )
        return "files", [path]
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
            return "disk", [path]
        files = _data_files(path)
        if files:
            return "files", files
        raise InvalidConfig([problem("dataset_name", f"folder {name} holds no data files", "Add .jsonl files to it")])
    tl_folder = Path(workspace_dir()) / "datasets" / name
    if (tl_folder / "index.json").exists():
        try:
            location = json.loads((tl_folder / "index.json").read_text()).get("location")
        except (OSError, ValueError):
            location = None
        if location == "local":
            files = _data_files(tl_folder)
            if not files:
                raise InvalidConfig(
                    [problem("dataset_name", f"dataset {name!r} holds no data files", "Re-upload the dataset")]
                )
            return "files", files
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
    return "hub", []


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

    kind, paths = resolve_source(name)
    if kind == "disk":
        loaded = datasets.load_from_disk(str(paths[0]))
        splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    elif kind == "hub":
        splits = dict(datasets.load_dataset(name))
    else:
        by_split: dict[str, list[str]] = {}
        for path in paths:
            if path.stat().st_size == 0:
                raise InvalidConfig([problem("dataset_name", f"{path} is empty", "Give a file with training rows")])
            words = set(re.split(r"[^a-z0-9]+", path.stem.lower()))
            split = next((s for s in EVAL_SPLIT_NAMES if s in words), "train")
            by_split.setdefault("validation" if split != "train" else "train", []).append(str(path))
        if "train" not in by_split:
            by_split = {"train": by_split.pop("validation")}
        builder = DATA_SUFFIXES[paths[0].suffix]
        try:
            # CSV cells are text: "1." stays "1." instead of becoming a float, and empty cells stay "".
            options = _csv_as_text(paths[0]) if builder == "csv" else {}
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
    for split in EVAL_SPLIT_NAMES:
        if split in splits and split != "train" and len(splits[split]):
            result["eval"] = splits[split]
            break
    return result


# --- formats -------------------------------------------------------------------------------------


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def detect_format(p: dict[str, Any], columns: list[str], rows: list[dict[str, Any]]) -> tuple[str, str]:
    """(format, why). Looks at several rows, not just the first."""
    chat_column = p["chatml_formatted_column"] or "messages"
    if p["apply_chat_template"]:
        for column in (chat_column, "messages", "conversations"):
            if column in columns:
                return "chat", f"apply_chat_template is on and the rows have a {column!r} column"
        raise InvalidConfig(
            [
                problem(
                    "chatml_formatted_column",
                    f"no {chat_column!r} column for apply_chat_template (columns: {', '.join(columns)})",
                    "Name the column that holds the conversations",
                )
            ]
        )
    if p["formatting_template"].strip():
        return "template", "a formatting_template was given"
    pairs = "prompt" in columns and "completion" in columns
    if pairs and all(_is_str(r.get("prompt")) and _is_str(r.get("completion")) for r in rows):
        return "prompt_completion", "the rows have string 'prompt' and 'completion' columns"
    for column in ("messages", "conversations"):
        if column in columns and all(isinstance(r.get(column), list) for r in rows):
            return "chat", f"the rows have a {column!r} list of turns"
    if "text" in columns and all(_is_str(r.get("text")) for r in rows):
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


def resolve_loss_mode(p: dict[str, Any], fmt: str) -> tuple[bool, list, list[str]]:
    """Whether only the completion/assistant part is trained; data rules that depend on the format."""
    errors, notes = [], []
    mode = p["completion_only_loss"]
    if p["assistant_only_loss"] and fmt != "chat":
        errors.append(
            problem("assistant_only_loss", f"needs chat rows but the data are {fmt}", "Set assistant_only_loss=false")
        )
    if fmt == "text":
        if mode == "true":
            errors.append(
                problem(
                    "completion_only_loss",
                    "true, but plain text rows have no completion to split off",
                    "Use completion_only_loss=auto or false, or give prompt/completion rows or a formatting_template",
                )
            )
        elif mode == "auto":
            notes.append("plain text rows: training on the whole text (completion_only_loss=auto)")
        return False, errors, notes
    return (mode != "false" or p["assistant_only_loss"]), errors, notes


def chat_turns(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    turns = []
    for message in messages:
        if "role" in message:
            turns.append({"role": message["role"], "content": message.get("content") or ""})
        else:
            role = SHAREGPT_ROLES.get(str(message.get("from", "")).lower())
            if role is None:
                raise ValueError(f"unknown ShareGPT role {message.get('from')!r}")
            turns.append({"role": role, "content": message.get("value") or ""})
    return turns


# --- encoding ------------------------------------------------------------------------------------


# One piece of a row's text: (text, trained, tokenized with the tokenizer's special tokens such as BOS).
Segment = tuple[str, bool, bool]


class Encoder:
    """Turns rows into input_ids and labels (-100 where no loss is taken).

    Each row becomes segments of text, trained or not; the segments of a whole batch are tokenized in
    two batched calls. Tokenizing the segments apart puts every prompt end on a token boundary.
    """

    def __init__(self, p: dict[str, Any], fmt: str, tokenizer, columns: list[str], train_part_only: bool):
        self.fmt = fmt
        self.tok = tokenizer
        self.train_part_only = train_part_only
        self.eos_id = tokenizer.eos_token_id
        self.eos = tokenizer.eos_token or ""
        self.chat_column = (
            next(c for c in (p["chatml_formatted_column"] or "messages", "messages", "conversations") if c in columns)
            if fmt == "chat"
            else None
        )
        self.chat_template = p["formatting_chat_template"].strip() or None
        self.template = (
            RowTemplate(p["formatting_template"], columns, p["completion_column"], split=train_part_only)
            if fmt == "template"
            else None
        )
        self._specials: list[str] | None = None

    # --- segments ---

    def _pair(self, prompt: str, completion: str) -> tuple[list[Segment], bool]:
        if self.eos and completion.endswith(self.eos):
            completion = completion[: -len(self.eos)]
        return [(prompt, False, True), (completion, True, False)], True

    def _render(self, messages, **kwargs) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, chat_template=self.chat_template, **kwargs)

    def _chat(self, messages: list[dict[str, str]]) -> tuple[list[Segment], str]:
        full = self._render(messages)
        # Assistant spans come from rendering prefixes of the conversation, so any template works,
        # with or without {% generation %} markers.
        segments: list[Segment] = []
        done = 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], add_generation_prompt=True) if i else ""
            after = self._render(messages[: i + 1])
            if not (full.startswith(after) and after.startswith(before) and len(before) >= done):
                return self._chat_by_search(messages, full), full
            segments += [(full[done : len(before)], False, False), (full[len(before) : len(after)], True, False)]
            done = len(after)
        segments.append((full[done:], False, False))
        return segments, full

    def _special_strings(self) -> list[str]:
        if self._specials is None:
            found = set(self.tok.all_special_tokens) | set(self.tok.get_added_vocab())
            self._specials = sorted((t for t in found if t), key=len, reverse=True)
        return self._specials

    def _chat_by_search(self, messages: list[dict[str, str]], full: str) -> list[Segment]:
        """For templates whose prefixes are not prefixes of the whole (some rewrite earlier turns):
        find each assistant message in the rendering, in order, and train it with the special tokens
        that directly follow it (its end-of-turn marker: <|im_end|>, <|eot_id|>, </s>, ...)."""
        segments: list[Segment] = []
        done = 0
        for message in messages:
            content = message["content"]
            if message["role"] != "assistant" or not content:
                continue
            start = full.find(content, done)
            if start < 0:
                raise ValueError("an assistant message does not appear in the chat template's rendering")
            stop = start + len(content)
            while marker := next((t for t in self._special_strings() if full.startswith(t, stop)), None):
                stop += len(marker)
            segments += [(full[done:start], False, False), (full[start:stop], True, False)]
            done = stop
        segments.append((full[done:], False, False))
        return segments

    def segments(self, row: dict[str, Any]) -> tuple[list[Segment], bool, str | None, str | None, str]:
        """(segments, whether EOS follows, prompt, completion, full text) for one row."""
        if self.fmt == "chat":
            segments, text = self._chat(chat_turns(row[self.chat_column]))
            return segments, False, None, None, text
        if self.fmt == "prompt_completion" or (self.fmt == "template" and self.train_part_only):
            prompt, completion = (
                (row["prompt"], row["completion"]) if self.fmt == "prompt_completion" else self.template.split(row)
            )
            segments, eos = self._pair(prompt, completion)
            return segments, eos, prompt, completion, prompt + completion
        text = self.template.render(row) if self.fmt == "template" else row["text"]
        segments, eos = self._pair("", text)
        return segments, eos, None, None, text

    # --- tokens ---

    def encode_many(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        planned = [self.segments(row) for row in rows]
        pieces = [seg for segments, *_ in planned for seg in segments if seg[0] or seg[2]]
        ids_special = iter(self._tokenize([text for text, _, special in pieces if special], special=True))
        ids_plain = iter(self._tokenize([text for text, _, special in pieces if not special], special=False))
        results = []
        for segments, eos, prompt, completion, text in planned:
            ids: list[int] = []
            labels: list[int] = []
            for piece_text, trained, special in segments:
                if not (piece_text or special):
                    continue
                piece = next(ids_special) if special else next(ids_plain)
                ids += piece
                labels += piece if (trained or not self.train_part_only) else [-100] * len(piece)
            if eos:
                ids.append(self.eos_id)
                labels.append(self.eos_id)
            results.append(
                {"input_ids": ids, "labels": labels, "prompt": prompt, "completion": completion, "text": text}
            )
        return results

    def encode(self, row: dict[str, Any]) -> dict[str, Any]:
        return self.encode_many([row])[0]

    def _tokenize(self, texts: list[str], *, special: bool) -> list[list[int]]:
        if not texts:
            return []
        # The Rust tokenizer's batch call without offsets is several times faster than the Python wrapper's
        # (and parallel on its own); the result is the same ids.
        backend = getattr(self.tok, "_tokenizer", None)
        if hasattr(backend, "encode_batch_fast"):
            return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=special)]
        return self.tok(texts, add_special_tokens=special)["input_ids"]


# --- preparation ---------------------------------------------------------------------------------


def _fingerprint(p: dict[str, Any], model_path: str, data_name: str) -> str:
    digest = hashlib.sha256()
    keys = (
        "formatting_template",
        "apply_chat_template",
        "chatml_formatted_column",
        "formatting_chat_template",
        "completion_only_loss",
        "assistant_only_loss",
        "completion_column",
        "maximum_sequence_length",
        "max_dropped_fraction",
        "eval_split",
        "seed",
    )
    digest.update(json.dumps({k: p[k] for k in keys}, sort_keys=True).encode())
    digest.update(PREP_VERSION.encode())
    kind, paths = resolve_source(data_name)
    targets = [f for path in paths for f in (sorted(path.rglob("*")) if path.is_dir() else [path])]
    if kind == "hub":
        digest.update(data_name.encode())
    for target in targets:
        if target.is_file():
            digest.update(str(target.name).encode())
            with target.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
    model_dir = Path(model_path)
    tokenizer_files = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]
    if model_dir.is_dir():
        for name in tokenizer_files:
            if (model_dir / name).exists():
                digest.update((model_dir / name).read_bytes())
    else:
        digest.update(model_path.encode())
    return digest.hexdigest()[:24]


def cache_root() -> str:
    default = os.path.join(os.path.expanduser("~"), ".cache", "sft_trainer_trl", "prepared")
    return os.environ.get("SFT_PREPARED_CACHE", default)


# Tokenizer classes that are the generic fast tokenizer: loaded directly, without AutoTokenizer's model
# config machinery (which imports torch and costs the parent a second or more before the launch).
GENERIC_TOKENIZERS = {"PreTrainedTokenizerFast", "TokenizersBackend"}


def load_tokenizer(model_name: str):
    config_path = Path(os.path.expanduser(model_name), "tokenizer_config.json")
    generic = False
    if config_path.is_file() and Path(config_path.parent, "tokenizer.json").is_file():
        try:
            generic = json.loads(config_path.read_text()).get("tokenizer_class") in GENERIC_TOKENIZERS
        except ValueError:
            generic = False
    if generic:
        from transformers import PreTrainedTokenizerFast as loader
    else:
        from transformers import AutoTokenizer as loader
    tokenizer = loader.from_pretrained(model_name)
    if tokenizer.eos_token_id is None:
        raise InvalidConfig(
            [problem("model_name", "the tokenizer has no EOS token", "Use a model whose tokenizer defines one")]
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _percentiles(ordered) -> dict[str, int]:
    """Percentiles of an ascending sequence of lengths."""
    if not len(ordered):
        return {}

    def at(q: float) -> int:
        return int(ordered[min(len(ordered) - 1, int(q * len(ordered)))])

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": int(ordered[-1])}


def prepare(p: dict[str, Any], *, preview: int = 3) -> Prepared:
    """Load, format, tokenize and save the dataset; reuse the cache when nothing changed."""
    splits = load_splits(p["dataset_name"])
    train = splits["train"]
    columns = list(train.column_names)
    head = [train[i] for i in range(min(len(train), 64))]
    fmt, why = detect_format(p, columns, head)
    train_part_only, errors, notes = resolve_loss_mode(p, fmt)
    if errors:
        raise InvalidConfig(errors)
    log.info("data: %s rows, format %s (%s)", len(train), fmt, why)
    for note in notes:
        log.info("data: %s", note)

    tokenizer = load_tokenizer(p["model_name"])
    encoder = Encoder(p, fmt, tokenizer, columns, train_part_only)
    max_len = p["maximum_sequence_length"]

    samples, marked = [], []
    for encoded in _encode_checked(encoder, head[:preview], 0):
        ids, labels = encoded["input_ids"][:max_len], encoded["labels"][:max_len]
        trained = [t for t, lab in zip(ids, labels, strict=True) if lab != -100]
        marked.append(_marked(tokenizer, ids, labels))
        samples.append(
            {
                "prompt": encoded["prompt"],
                "completion": encoded["completion"],
                "text": encoded["text"],
                "trained_text": tokenizer.decode(trained, skip_special_tokens=False),
            }
        )

    key = _fingerprint(p, p["model_name"], p["dataset_name"])
    target = os.path.join(cache_root(), key)
    stats_path = os.path.join(target, "stats.json")
    if os.path.exists(stats_path):
        stats = json.loads(Path(stats_path).read_text())
        log.info("data: reusing the prepared dataset at %s (same data, template, tokenizer and settings)", target)
        return Prepared(target, stats, samples, cached=True, marked=marked)

    os.makedirs(cache_root(), exist_ok=True)
    staging = f"{target}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        stats = _build(splits, encoder, p, staging)
        Path(staging, "stats.json").write_text(json.dumps(stats, indent=2))
        if os.path.exists(target):
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Prepared(target, stats, samples, marked=marked)


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


def _encode_checked(encoder: Encoder, rows: list[dict[str, Any]], first_index: int) -> list[dict[str, Any]]:
    try:
        return encoder.encode_many(rows)
    except (KeyError, TypeError, ValueError):
        # Find the row at fault, so the message can name it.
        for offset, row in enumerate(rows):
            try:
                encoder.encode(row)
            except (KeyError, TypeError, ValueError) as row_exc:
                exc, first_index = row_exc, first_index + offset
                break
        column = "chatml_formatted_column" if encoder.fmt == "chat" else "dataset_name"
        raise InvalidConfig(
            [problem(column, f"row {first_index} could not be formatted ({exc})", "Fix that row")]
        ) from None


def _column_sum(ds, column: str, predicate=None) -> int:
    """Sum (or count, with a predicate) of a column in Arrow batches: memory stays flat with row count."""
    import pyarrow.compute as pc

    total = 0
    for batch in ds.select_columns([column]).with_format("arrow").iter(batch_size=50_000):
        values = batch.column(column)
        total += int(pc.sum(predicate(values) if predicate else values).as_py() or 0)
    return total


def _build(splits, encoder: Encoder, p: dict[str, Any], staging: str) -> dict[str, Any]:
    import pyarrow.compute as pc
    from datasets import DatasetDict

    max_len = p["maximum_sequence_length"]

    def encode_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        names = list(batch)
        rows = [{n: batch[n][i] for n in names} for i in range(len(indices))]
        out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "trained": []}
        for encoded in _encode_checked(encoder, rows, indices[0] if indices else 0):
            ids, labels = encoded["input_ids"], encoded["labels"]
            out["length"].append(len(ids))
            out["input_ids"].append(ids[:max_len])
            out["labels"].append(labels[:max_len])
            out["trained"].append(sum(1 for lab in labels[:max_len] if lab != -100))
        return out

    rows_total = sum(len(s) for s in splits.values())
    workers = min(os.cpu_count() or 1, 8) if rows_total >= PARALLEL_ROWS else None
    work = f"{staging}.work"
    os.makedirs(work, exist_ok=True)
    try:
        tokenized = {}
        for name, split in splits.items():
            tokenized[name] = split.map(
                encode_batch,
                with_indices=True,
                batched=True,
                batch_size=1000,
                num_proc=workers,
                remove_columns=split.column_names,
                cache_file_name=os.path.join(work, f"{name}.arrow"),
                desc=f"Preparing {name} rows",
            )
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
        if len(kept["train"]) == 0:
            raise InvalidConfig([problem("dataset_name", "no row has anything left to train on", "Check the data")])
        if "eval" not in kept and p["eval_split"] > 0:
            rows = len(kept["train"])
            held_out = math.ceil(p["eval_split"] * rows)
            if held_out >= rows:
                raise InvalidConfig(
                    [
                        problem(
                            "eval_split",
                            f"{p['eval_split']:g} of {rows} rows leaves no training rows",
                            "Lower eval_split, or set it to 0",
                        )
                    ]
                )
            parts = kept["train"].train_test_split(
                test_size=p["eval_split"],
                seed=p["seed"],
                train_indices_cache_file_name=os.path.join(work, "split-train.arrow"),
                test_indices_cache_file_name=os.path.join(work, "split-eval.arrow"),
            )
            kept = {"train": parts["train"], "eval": parts["test"]}
        if "eval" in kept and len(kept["eval"]) == 0:
            raise InvalidConfig(
                [problem("eval_split", "the validation split has no row left to evaluate", "Check that split's rows")]
            )
        stats["rows_used"] = len(kept["train"])
        stats["eval_rows"] = len(kept["eval"]) if "eval" in kept else 0
        stats["trainable_tokens"] = _column_sum(kept["train"], "trained")
        stats["total_tokens"] = _column_sum(kept["train"], "length", lambda v: pc.min_element_wise(v, max_len))
        final = DatasetDict({name: ds.select_columns(["input_ids", "labels"]) for name, ds in kept.items()})
        final.save_to_disk(staging)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return stats


def _statistics(tokenized, fmt: str, p: dict[str, Any]) -> dict[str, Any]:
    """Rows, drops and truncation of the training split; stops when too many rows lose everything."""
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
    }
    if len(train) and dropped / len(train) > p["max_dropped_fraction"]:
        pct = stats["length_percentiles"]
        raise InvalidConfig(
            [
                problem(
                    "maximum_sequence_length",
                    f"{dropped} of {len(train)} rows ({dropped / len(train):.0%}) lose every trained token to "
                    f"truncation at {max_len} tokens (row lengths p50={pct['p50']}, p90={pct['p90']}, "
                    f"p99={pct['p99']}, max={pct['max']})",
                    "Raise maximum_sequence_length, or raise max_dropped_fraction to accept the loss",
                )
            ]
        )
    return stats
