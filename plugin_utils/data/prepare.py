"""Preparation: load the dataset and find its format (`load`), then tokenize and save its rows into the prepared
cache, or reuse an identical earlier preparation (`prepare`)."""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import StopRequested
from ..machine import preparation_processes
from ..params import DataSettings
from ..rowformats import CHAT_FORMATS, DataFacts
from ..sources import collector_off, data_tokenizer, stop_ids
from .encoding import Encoder, build, encode_checked, marked
from .formats import detect_format
from .keys import cache_key, fingerprint
from .loading import choose_eval, eval_text, load_splits
from .prepared_cache import PreparedCache

log = logging.getLogger("sft")


@dataclass
class LoadedDataset:
    """The dataset loaded and its format found, before any row is tokenized."""

    splits: dict[str, Any]
    eval_info: dict[str, Any]
    format: str
    why: str
    columns: list[str]
    head: list[dict[str, Any]]  # the first rows: the format is found from them, the preview shows them
    key: str  # the data key: the rows, tokenizer, template and data settings (keys.fingerprint)

    def facts(self) -> DataFacts:
        return DataFacts(format=self.format, columns=tuple(self.columns), key=self.key)


@dataclass(frozen=True)
class PreparedStats:
    """The prepared rows' statistics: what the statistics rules check, the dry run shows and the run's summary
    records. Saved as the prepared folder's stats.json, read back by field name (nothing else is accepted: the
    folder's key covers the code that writes it). Defined here, outside the code hashed into the key."""

    format: str
    rows: int  # rows of the training split, before any was left out
    dropped: int  # left out: nothing to train, once truncated or at all
    truncated: int  # longer than maximum_sequence_length
    length_percentiles: dict[str, int]  # token lengths: p50, p90, p99, max ({} without rows)
    # Rows with an empty answer, no assistant turn, reasoning the chat template left out, or an assistant turn
    # ending without a special token: the rules turn these into warnings.
    empty_answers: int
    no_answer: int
    reasoning_dropped: int
    open_turns: int
    rows_used: int  # training rows kept
    eval_rows: int  # evaluation rows kept (0: no evaluation)
    trainable_tokens: int  # tokens the loss is taken on, in the training rows kept
    total_tokens: int  # tokens of the training rows kept, each cut at maximum_sequence_length
    eval_source: str | None  # where the evaluation rows come from (None: no evaluation)
    own_eval_split: str | None  # the dataset's own evaluation split, used or not
    own_eval_rows: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Prepared:
    path: str  # the cache folder, named by keys.cache_key
    key: str  # the data key (LoadedDataset.key): what a resumed run must share
    stats: PreparedStats
    samples: list[dict[str, Any]] = field(default_factory=list)
    cached: bool = False
    # The same rows for people: the training text with the trained parts between ⟦ and ⟧.
    marked: list[str] = field(default_factory=list)


def import_libraries() -> None:
    """datasets, which reads and saves the rows, imported with the garbage collector off (sources.collector_off).
    Not transformers: a generic fast tokenizer is read without it (sources.data_tokenizer), and a model that
    needs its own tokenizer class imports it there."""
    with collector_off():
        import datasets  # noqa: F401


def load(settings: DataSettings) -> LoadedDataset:
    """Load the dataset and find its format; rows that cannot be read are errors naming the file and line."""
    splits, eval_info = choose_eval(load_splits(settings.dataset_name), settings.eval_split)
    train = splits["train"]
    columns = list(train.column_names)
    head = [train[i] for i in range(min(len(train), 64))]
    fmt, why = detect_format(settings, columns, head)
    log.info("data: %s rows, format %s (%s)", len(train), fmt, why)
    log.info("data: evaluation: %s", eval_text(eval_info))
    key = fingerprint(settings)
    return LoadedDataset(splits, eval_info, fmt, why, columns, head, key)


def prepare(
    settings: DataSettings,
    dataset: LoadedDataset,
    completion_only: bool,
    *,
    preview: int = 3,
    stopping=lambda: False,
) -> Prepared:
    """Format, tokenize and save the rows; reuse the cache when nothing changed. `completion_only` is the
    plan's loss mode: whether only completions (assistant turns) are trained. `stopping()` is asked once more
    before the result is published: a stop that a worker pool swallowed still leaves nothing behind."""
    cache = PreparedCache.from_env()  # a bad bound is an error before any work
    tokenizer = data_tokenizer(settings.model_name, chat=dataset.format in CHAT_FORMATS)
    stops = stop_ids(settings.model_name)
    encoder = Encoder(settings, dataset.format, tokenizer, dataset.columns, completion_only, stops)
    samples, shown = _preview(encoder, tokenizer, dataset.head[:preview], settings.maximum_sequence_length)

    key = cache_key(dataset.key, completion_only, stops)
    stats = cache.use(key)
    if stats is not None:
        log.info(
            "data: reusing the prepared dataset at %s (same data, template, tokenizer and settings)", cache.path(key)
        )
        cache.evict(key)
        return Prepared(str(cache.path(key)), dataset.key, PreparedStats(**stats), samples, cached=True, marked=shown)

    with cache.building(key) as staging:
        try:
            stats = {**build(dataset.splits, encoder, settings, str(staging)), **dataset.eval_info}
        except BaseException:
            _end_worker_processes()
            raise
        (staging / "stats.json").write_text(json.dumps(stats, indent=2))
        if stopping():
            raise StopRequested()
        stats = cache.publish(staging, key)
    cache.evict(key)
    return Prepared(str(cache.path(key)), dataset.key, PreparedStats(**stats), samples, marked=shown)


def _end_worker_processes() -> None:
    """End every process a parallel map started: its worker pool, and the manager process datasets starts beside
    it. A stop that interrupts the map can leave them running (this process would then wait for them at exit),
    or land between a fork and multiprocess registering the child, which then serves on as an orphan: so the
    children are found from the process table, not from multiprocess's list: those in this process's session (the
    ranks, started early, have their own)."""
    import psutil

    try:
        import multiprocess
    except ImportError:
        multiprocess = None
    for child in multiprocess.active_children() if multiprocess else []:  # joined, so multiprocess forgets them
        child.terminate()
        child.join(timeout=5)
    children = preparation_processes()
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=5)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(alive, timeout=5)


def _preview(encoder: Encoder, tokenizer, rows: list[dict[str, Any]], max_len: int) -> tuple[list, list]:
    """The first rows as the dry run shows them: what is trained, as text and as the tokenizer's pieces, and the
    whole text with the trained parts marked."""
    samples, shown = [], []
    for encoded in encode_checked(encoder, rows, 0, "train"):
        ids, labels = encoded["input_ids"][:max_len], encoded["labels"][:max_len]
        trained = [t for t, lab in zip(ids, labels, strict=True) if lab != -100]
        shown.append(marked(tokenizer, ids, labels))
        samples.append(
            {
                "prompt": encoded["prompt"],
                "completion": encoded["completion"],
                "text": encoded["text"],
                "trained_text": tokenizer.decode(trained, skip_special_tokens=False),
                "trained_tokens": tokenizer.convert_ids_to_tokens(trained),
            }
        )
    return samples, shown
