"""Data preparation, done once in the parent before any rank starts.

Rows are loaded, their format detected, templates applied, and everything tokenized into `input_ids`
plus `labels` (-100 where no loss is taken), truncated, and saved with `save_to_disk` into a cache keyed by
everything that affects the result. Ranks memory-map that folder and never template or tokenize.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
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


@dataclass
class Prepared:
    path: str
    stats: dict[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list)
    cached: bool = False

    @property
    def has_eval(self) -> bool:
        return os.path.isdir(os.path.join(self.path, "eval"))


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
            if path.suffix == ".jsonl":
                _check_json_lines(path)
            words = set(re.split(r"[^a-z0-9]+", path.stem.lower()))
            split = next((s for s in EVAL_SPLIT_NAMES if s in words), "train")
            by_split.setdefault("validation" if split != "train" else "train", []).append(str(path))
        if "train" not in by_split:
            by_split = {"train": by_split.pop("validation")}
        builder = DATA_SUFFIXES[paths[0].suffix]
        try:
            splits = dict(datasets.load_dataset(builder, data_files=by_split))
        except Exception as exc:
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


class Encoder:
    """Turns one row into (input_ids, labels, prompt, completion, text)."""

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

    def _ids(self, text: str, *, special: bool) -> list[int]:
        return self.tok(text, add_special_tokens=special)["input_ids"]

    def _pair(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        if self.eos and completion.endswith(self.eos):
            completion = completion[: -len(self.eos)]
        # Tokenized apart, so the prompt ends on a token boundary; the EOS ends the completion exactly once.
        prompt_ids = self._ids(prompt, special=True)
        completion_ids = [*self._ids(completion, special=False), self.eos_id]
        labels = [-100] * len(prompt_ids) + completion_ids if self.train_part_only else prompt_ids + completion_ids
        return prompt_ids + completion_ids, labels

    def _chat(self, messages: list[dict[str, str]]) -> tuple[list[int], list[int], str]:
        render = self.tok.apply_chat_template
        kwargs = {"tokenize": False, "chat_template": self.chat_template}
        full = render(messages, **kwargs)
        # Assistant spans come from rendering prefixes of the conversation, so any template works,
        # with or without {% generation %} markers.
        segments: list[tuple[str, bool]] = []
        done = 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = render(messages[:i], add_generation_prompt=True, **kwargs) if i else ""
            after = render(messages[: i + 1], **kwargs)
            if not (full.startswith(after) and after.startswith(before) and len(before) >= done):
                raise ValueError("the chat template does not render conversation prefixes as prefixes")
            segments += [(full[done : len(before)], False), (full[len(before) : len(after)], True)]
            done = len(after)
        segments.append((full[done:], False))
        ids: list[int] = []
        labels: list[int] = []
        for text, trained in segments:
            if not text:
                continue
            piece = self._ids(text, special=False)
            ids += piece
            labels += piece if (trained or not self.train_part_only) else [-100] * len(piece)
        return ids, labels, full

    def encode(self, row: dict[str, Any]) -> dict[str, Any]:
        prompt = completion = None
        if self.fmt == "prompt_completion":
            prompt, completion = row["prompt"], row["completion"]
            ids, labels = self._pair(prompt, completion)
            text = prompt + completion
        elif self.fmt == "template":
            if self.train_part_only:
                prompt, completion = self.template.split(row)
                ids, labels = self._pair(prompt, completion)
                text = prompt + completion
            else:
                text = self.template.render(row)
                ids, labels = self._pair("", text)
                labels = list(ids)
        elif self.fmt == "chat":
            ids, labels, text = self._chat(chat_turns(row[self.chat_column]))
        else:
            text = row["text"]
            ids, labels = self._pair("", text)
            labels = list(ids)
        return {"input_ids": ids, "labels": labels, "prompt": prompt, "completion": completion, "text": text}


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


def load_tokenizer(model_name: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_name)
    if tokenizer.eos_token_id is None:
        raise InvalidConfig(
            [problem("model_name", "the tokenizer has no EOS token", "Use a model whose tokenizer defines one")]
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _percentiles(lengths: list[int]) -> dict[str, int]:
    if not lengths:
        return {}
    ordered = sorted(lengths)

    def at(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": ordered[-1]}


def prepare(p: dict[str, Any], *, preview: int = 3, should_stop: Callable[[], bool] = lambda: False) -> Prepared:
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

    samples = []
    for row in head[:preview]:
        encoded = _encode_checked(encoder, row, 0)
        ids, labels = encoded["input_ids"][:max_len], encoded["labels"][:max_len]
        trained = [t for t, lab in zip(ids, labels, strict=True) if lab != -100]
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
        return Prepared(target, stats, samples, cached=True)

    os.makedirs(cache_root(), exist_ok=True)
    staging = f"{target}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        stats = _build(splits, encoder, p, staging, should_stop)
        Path(staging, "stats.json").write_text(json.dumps(stats, indent=2))
        if os.path.exists(target):
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Prepared(target, stats, samples)


def _encode_checked(encoder: Encoder, row: dict[str, Any], index: int) -> dict[str, Any]:
    try:
        return encoder.encode(row)
    except (KeyError, TypeError, ValueError) as exc:
        column = "chatml_formatted_column" if encoder.fmt == "chat" else "dataset_name"
        raise InvalidConfig([problem(column, f"row {index} could not be formatted ({exc})", "Fix that row")]) from None


def _build(splits, encoder: Encoder, p: dict[str, Any], staging: str, should_stop) -> dict[str, Any]:
    from datasets import DatasetDict

    max_len = p["maximum_sequence_length"]

    def encode_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "kept": [], "trained": [], "truncated": []}
        names = list(batch)
        for offset, index in enumerate(indices):
            encoded = _encode_checked(encoder, {n: batch[n][offset] for n in names}, index)
            ids, labels = encoded["input_ids"], encoded["labels"]
            out["length"].append(len(ids))
            out["truncated"].append(len(ids) > max_len)
            ids, labels = ids[:max_len], labels[:max_len]
            out["kept"].append(len(ids))
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["trained"].append(sum(1 for lab in labels if lab != -100))
        return out

    rows_total = sum(len(s) for s in splits.values())
    workers = min(os.cpu_count() or 1, 8) if rows_total >= 20_000 else None
    tokenized = {}
    for name, split in splits.items():
        if should_stop():
            from .errors import StopRequested

            raise StopRequested()
        tokenized[name] = split.map(
            encode_batch,
            with_indices=True,
            batched=True,
            batch_size=1000,
            num_proc=workers,
            remove_columns=split.column_names,
            desc=f"Preparing {name} rows",
        )

    train = tokenized["train"]
    lengths = train["length"]
    dropped = train.filter(lambda t: [x == 0 for x in t], input_columns="trained", batched=True).num_rows
    stats = {
        "format": encoder.fmt,
        "rows": len(train),
        "dropped": dropped,
        "truncated": int(sum(train["truncated"])),
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
    kept = {
        name: ds.filter(lambda t: [x > 0 for x in t], input_columns="trained", batched=True)
        for name, ds in tokenized.items()
    }
    if "eval" not in kept and p["eval_split"] > 0:
        parts = kept["train"].train_test_split(test_size=p["eval_split"], seed=p["seed"])
        kept = {"train": parts["train"], "eval": parts["test"]}
    if len(kept["train"]) == 0:
        raise InvalidConfig([problem("eval_split", "leaves no training rows", "Lower eval_split")])
    if "eval" in kept and len(kept["eval"]) == 0:
        raise InvalidConfig([problem("eval_split", "leaves no eval rows", "Raise eval_split or set it to 0")])
    stats["rows_used"] = len(kept["train"])
    stats["eval_rows"] = len(kept["eval"]) if "eval" in kept else 0
    stats["trainable_tokens"] = int(sum(kept["train"]["trained"]))
    stats["total_tokens"] = int(sum(kept["train"]["kept"]))
    final = DatasetDict({name: ds.select_columns(["input_ids", "labels"]) for name, ds in kept.items()})
    final.save_to_disk(staging)
    return stats
