"""The keys: the data key, which a resumed run must share with its checkpoint (the rows, the tokenizer, the template
and every data-shaping parameter), and each prepared folder's name, which adds the loss mode and the code and
libraries that shape the rows (a new version of them prepares again; a checkpoint stays resumable). Only the
modules that decide the prepared rows' bytes are hashed, so editing the cache, the orchestration or the workspace
lookup keeps every user's prepared data."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..params import DataSettings
from ..sources import hub_offline
from .loading import resolve_source

PREP_VERSION = "3"
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
HERE = Path(__file__).resolve().parent
SHAPING_SOURCES = (
    *(HERE / name for name in ("loading.py", "formats.py", "encoding.py")),
    *(HERE.parent / name for name in ("rowformats.py", "chat.py", "templates.py")),
)
SHAPING_LIBRARIES = ("transformers", "tokenizers", "datasets", "jinja2", "sentencepiece")


def _hash_file(digest, path: Path) -> None:
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)


def tokenizer_folder(model_name: str) -> tuple[Path | None, str]:
    """The folder the tokenizer is loaded from and, for a Hub id, the commit of that snapshot. Online, the
    Hub says which commit is current (its tokenizer files are fetched, as loading the tokenizer would);
    offline, the cache's. (None, '') when neither has it: loading the tokenizer then names the problem."""
    folder = Path(os.path.expanduser(model_name))
    if folder.is_dir():
        return folder, ""
    try:
        from huggingface_hub import snapshot_download

        found = snapshot_download(model_name, allow_patterns=list(TOKENIZER_FILES), local_files_only=hub_offline())
        snapshot = Path(found)
    except Exception:  # not cached offline, unreachable, gated, or no valid repo id
        return None, ""
    return snapshot, snapshot.name


def _tokenizer_files(folder: Path) -> list[Path]:
    found = {path for pattern in TOKENIZER_FILES for path in folder.glob(pattern) if path.is_file()}
    return sorted(found, key=lambda path: path.relative_to(folder).as_posix())


def fingerprint(settings: DataSettings) -> str:
    """The data key: the rows, the tokenizer (every file it may read, and the Hub commit), the template and
    every data-shaping parameter. A resumed run must have the same (the code's version is not part of it)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(settings.canonical(), sort_keys=True).encode())
    digest.update(PREP_VERSION.encode())
    model_path = settings.model_name
    source = resolve_source(settings.dataset_name)
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


def cache_key(data_key: str, completion_only: bool, stop_ids: tuple[int, ...] = ()) -> str:
    """The prepared folder's name: the data key, the loss mode, the ids the model stops on (they decide which
    turn-opening token closes an answer), and the code and libraries that shaped the rows (a new version
    prepares again, while a checkpoint stays resumable)."""
    facts = {"data": data_key, "completion_only": completion_only, "toolchain": toolchain()}
    if stop_ids:
        facts["stop_ids"] = list(stop_ids)
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:24]


# --- the cache's folder --------------------------------------------------------------------------
