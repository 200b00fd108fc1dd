"""Loading: the dataset a run names (a file, a folder saved by `datasets`, a dataset of the TransformerLab
workspace, or a Hub id) read into its splits, and the evaluation split chosen. Rows that cannot be read are
errors naming the file and line."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidConfig, problem
from ..rowformats import DATA_SUFFIXES
from ..sources import hub_offline, workspace_dataset

log = logging.getLogger("sft")

EVAL_SPLIT_NAMES = ("validation", "valid", "eval", "test")


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
    TransformerLab workspace (info.md, "Data"), or a Hub id."""
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
    if hub_offline() or "/" not in name or name.startswith((".", "/")):
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
        if hub_offline():
            what += f", not in the local cache while the Hub is offline (HF_HUB_OFFLINE) ({reason})"
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
            with progress_bars(shown=False):  # reading local files: quick, and the row count is logged next
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


def eval_text(info: dict[str, Any]) -> str:
    """How the run evaluates, for the log."""
    if info["eval_source"]:
        return info["eval_source"]
    if info["own_eval_split"]:
        return f"none (eval_split is 0; the dataset's {info['own_eval_split']!r} split is not used)"
    return "none (eval_split is 0)"


@contextlib.contextmanager
def progress_bars(shown: bool):
    """datasets' progress bars on or off for a block, as they were after it."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    (datasets.enable_progress_bars if shown else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.disable_progress_bars if was_disabled else datasets.enable_progress_bars)()
