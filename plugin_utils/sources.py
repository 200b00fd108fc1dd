"""Where models and tokenizers come from: a model's config.json without loading weights, the TransformerLab
workspace (the models and datasets its pickers name by id), and the tokenizer both the parent (data
preparation) and the ranks (training) load.

Used by validation, planning, data preparation, the hosts and the ranks alike; it imports none of them.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import threading
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import InvalidConfig, problem


def hub_offline() -> bool:
    """Whether the Hub may not be reached, read as huggingface_hub reads it: HF_HUB_OFFLINE, else
    TRANSFORMERS_OFFLINE, true when 1, ON, YES or TRUE in any case."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in {"1", "ON", "YES", "TRUE"}


def workspace_dir() -> str:
    """The TransformerLab workspace: TFL_WORKSPACE_DIR, else <TFL_HOME_DIR or ~/.transformerlab>/workspace."""
    if os.environ.get("TFL_WORKSPACE_DIR"):
        return os.environ["TFL_WORKSPACE_DIR"]
    home = os.environ.get("TFL_HOME_DIR") or os.path.join(os.path.expanduser("~"), ".transformerlab")
    return os.path.join(home, "workspace")


def secure_filename(name: str) -> str:
    """werkzeug's `secure_filename` on POSIX, which TransformerLab names workspace folders with: ASCII only,
    '/' and whitespace become '_', anything but letters, digits and '._-' is dropped, and '._' are stripped
    from both ends ('org/name' -> 'org_name')."""
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    text = "_".join(text.replace("/", " ").split())
    return re.sub(r"[^A-Za-z0-9_.-]", "", text).strip("._")


def looks_local(name: str) -> bool:
    """A model name that is a path rather than a Hub id."""
    return name.startswith(("/", ".", "~")) or os.path.exists(os.path.expanduser(name)) or name.count("/") > 1


def read_json(path: str) -> dict[str, Any]:
    """A JSON object from a file; {} when the file is missing, unreadable or not an object."""
    try:
        with open(path) as handle:
            value = json.load(handle)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


# --- the workspace: what the Queue Task form's model and dataset pickers send -----------------------------

_VERSION = re.compile(r"v(\d+)")


@dataclass(frozen=True)
class WorkspaceModel:
    path: str  # the folder training loads
    how: str  # how the id was found, for the log


def _weights(folder: str) -> str | None:
    """The weights of a model entry: its index.json's `model_filename` ('' or '.': the folder itself; a name
    or an absolute path, as older imports wrote: that). None for a Hub download's metadata, whose weights
    are in the Hub cache."""
    index = read_json(os.path.join(folder, "index.json"))
    details = index.get("json_data") if isinstance(index.get("json_data"), dict) else {}
    filename = str(details.get("model_filename") or index.get("model_filename") or "")
    target = folder if filename in ("", ".") else os.path.join(folder, filename)
    if details.get("source") == "huggingface" and not os.path.isfile(os.path.join(target, "config.json")):
        return None
    return target


def _tagged_latest(models: str, group: str) -> str | None:
    """The version TransformerLab's registry resolves a group to: the one tagged 'latest', else the last
    added (`<workspace>/asset_groups/models/<uuid>/index.json` names the group, `model_list.json` lists its
    versions)."""
    groups = os.path.join(os.path.dirname(models), "asset_groups", "models")
    for entry in sorted(os.listdir(groups)) if os.path.isdir(groups) else []:
        if read_json(os.path.join(groups, entry, "index.json")).get("name") != group:
            continue
        listed = read_json(os.path.join(groups, entry, "model_list.json")).get("versions")
        versions = [v for v in listed or [] if isinstance(v, dict)]
        chosen = next((v for v in versions if v.get("tag") == "latest"), versions[-1] if versions else {})
        return chosen.get("version_label") or None
    return None


def _entry(models: str, folder: str) -> WorkspaceModel | None:
    """A model folder of the workspace: an entry with its index.json, a registry group (`<group>/<vN>/`: the
    version the registry tags 'latest', else the newest), or a bare folder of weights (a registry version
    copied from a job)."""
    if os.path.isfile(os.path.join(folder, "index.json")):
        target = _weights(folder)
        return WorkspaceModel(target, "a model of this workspace") if target else None
    versions = {
        int(match.group(1)): entry
        for entry in (os.listdir(folder) if os.path.isdir(folder) else [])
        if (match := _VERSION.fullmatch(entry)) and os.path.isdir(os.path.join(folder, entry))
    }
    if versions:
        group = os.path.basename(folder)
        tagged = _tagged_latest(models, group)
        version = tagged if tagged in versions.values() else versions[max(versions)]
        found = _entry(models, os.path.join(folder, version))
        why = "tagged latest" if tagged == version else "the newest"
        return WorkspaceModel(found.path, f"registry group {group!r}, version {version} ({why})") if found else None
    if os.path.isfile(os.path.join(folder, "config.json")):
        return WorkspaceModel(folder, "a model of this workspace")
    return None


def _listed(models: str) -> list[str]:
    """Every model entry as the workspace's model list has them: `<id>/` and `<group>/<vN>/` with index.json."""
    found = []
    for entry in sorted(os.listdir(models)):
        folder = os.path.join(models, entry)
        if os.path.isfile(os.path.join(folder, "index.json")):
            found.append(folder)
        elif os.path.isdir(folder):
            found += [
                os.path.join(folder, sub)
                for sub in sorted(os.listdir(folder))
                if os.path.isfile(os.path.join(folder, sub, "index.json"))
            ]
    return found


def workspace_model(name: str) -> WorkspaceModel | None:
    """The folder of a model id of the TransformerLab workspace, as the form's model picker sends it (the
    `model_id` of the entry's index.json); None for a path, or for an id no entry holds (a Hub id).

    Looked for as TransformerLab stores models: the lab SDK's folder for the id (`<workspace>/models/<id>`,
    each part through secure_filename: flat ids, uploads named `org/name`, registry `<group>/<vN>` and a
    bare `<group>`), then the entry whose index.json names this id (older folders `org_name`, and models
    TransformerLab wrote, `TransformerLab/<name>` in `<name>/`)."""
    if not name or name.startswith(("/", ".", "~")) or os.path.exists(os.path.expanduser(name)):
        return None
    models = os.path.join(workspace_dir(), "models")
    if not os.path.isdir(models):
        return None
    parts = [secure_filename(part) for part in name.split("/")]
    if all(parts):
        found = _entry(models, os.path.join(models, *parts))
        if found:
            return found
    for folder in _listed(models):
        if read_json(os.path.join(folder, "index.json")).get("model_id") == name:
            target = _weights(folder)
            return WorkspaceModel(target, "a model of this workspace") if target else None
    return None


@dataclass(frozen=True)
class WorkspaceDataset:
    folder: str
    location: str  # local: the files of `folder`; huggingfacehub: `hub_id` on the Hub
    hub_id: str
    config_name: str | None


def workspace_dataset(name: str) -> WorkspaceDataset | None:
    """A dataset id of the TransformerLab workspace, as the form's dataset picker sends it:
    `<workspace>/datasets/<secure_filename(id)>/index.json` (the lab SDK's `Dataset.get_dir`). Its
    `location` says where the rows are; a Hub dataset may need its `json_data.config_name`."""
    safe = secure_filename(name)
    folder = os.path.join(workspace_dir(), "datasets", safe)
    if not safe or not os.path.isfile(os.path.join(folder, "index.json")):
        return None
    index = read_json(os.path.join(folder, "index.json"))
    details = index.get("json_data") if isinstance(index.get("json_data"), dict) else {}
    config = details.get("dataset_config") or details.get("config_name")
    return WorkspaceDataset(
        folder=folder,
        location=str(index.get("location") or "local"),
        hub_id=str(details.get("huggingfacerepo") or index.get("dataset_id") or name),
        config_name=str(config) if config else None,
    )


def write_whole(path: str, text: str | bytes) -> None:
    """`text` (or bytes) written to `path` whole: beside it under a name of this process and thread, then renamed
    over it, so a reader never sees part of it, and a process killed midway leaves the old file as it was."""
    staging = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with open(staging, "wb") if isinstance(text, bytes) else open(staging, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(staging, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)


def model_folder(name: str) -> str | None:
    """The model's folder: a local one, or its snapshot in the Hub cache (the one holding its config.json); None
    when neither is here."""
    folder = os.path.expanduser(name)
    if os.path.isdir(folder):
        return folder
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # a name that is no valid repo id
        return None
    return os.path.dirname(cached) if isinstance(cached, str) else None


@lru_cache(maxsize=8)
def model_config(name: str) -> dict[str, Any] | None:
    """The model's config.json (local folder or the Hub cache), without loading weights or torch."""
    folder = model_folder(name)
    path = os.path.join(folder, "config.json") if folder else ""
    return read_json(path) if path and os.path.isfile(path) else None


def stop_ids(name: str) -> tuple[int, ...]:
    """The ids generation stops on, as the model's generation_config.json lists them (`eos_token_id`, an int or
    a list): GLM-4 stops by writing the next turn's `<|user|>`. () without the file."""
    folder = model_folder(name)
    found = read_json(os.path.join(folder, "generation_config.json")).get("eos_token_id") if folder else None
    values = found if isinstance(found, list) else [found]
    return tuple(v for v in values if isinstance(v, int) and not isinstance(v, bool))


@dataclass(frozen=True)
class ModelFacts:
    """What validation may know about the model before anything is loaded."""

    local: bool  # a path rather than a Hub id
    is_folder: bool
    config: dict[str, Any] | None  # config.json
    adapter_config: dict[str, Any] | None  # adapter_config.json: the folder is a LoRA adapter

    @property
    def context_length(self) -> int | None:
        config = self.config or {}
        limit = next((config[k] for k in ("max_position_embeddings", "n_positions") if config.get(k)), None)
        return limit if isinstance(limit, int) else None


def inspect_model(name: str) -> ModelFacts:
    folder = os.path.expanduser(name) if name else ""
    adapter = os.path.join(folder, "adapter_config.json") if folder else ""
    return ModelFacts(
        local=bool(name) and looks_local(name),
        is_folder=bool(folder) and os.path.isdir(folder),
        config=model_config(name) if name else None,
        adapter_config=read_json(adapter) if adapter and os.path.isfile(adapter) else None,
    )


# Tokenizer classes that are the generic fast tokenizer: loaded directly, without AutoTokenizer's model
# config machinery (which imports torch and costs the parent a second or more before the launch).
GENERIC_TOKENIZERS = {"PreTrainedTokenizerFast", "TokenizersBackend"}


@contextlib.contextmanager
def collector_off():
    """For importing the heavy libraries (torch, transformers, PEFT, TRL, datasets). Their imports allocate
    millions of objects and almost no garbage, yet each allocation threshold crossed runs a collection over
    everything allocated so far: about a tenth of their CPU time, measured on 2 cores. Inside the block the cyclic
    garbage collector is off; afterwards it is on again, and what the imports made, which lives as long as the
    process, is frozen out of its reach so that later collections skip it."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.freeze()


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: the text, or an AddedToken object holding it."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class PlainTokenizer:
    """A generic fast tokenizer read with the `tokenizers` library alone: its tokenizer.json as it is, and its
    BOS and EOS from tokenizer_config.json. Exactly what transformers' PreTrainedTokenizerFast makes of such a
    folder (tests/test_token_exact.py compares their ids, special tokens and decoding), without importing
    transformers, most of a second of the parent's start. Only what preparing text, prompt/completion and
    template rows asks of a tokenizer (encoding.Encoder, the preview)."""

    def __init__(self, folder: Path, config: dict[str, Any], backend):
        self._tokenizer = backend
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token_id = backend.token_to_id(self.eos_token) if self.eos_token else None
        self.bos_token_id = backend.token_to_id(self.bos_token) if self.bos_token else None
        self.chat_template = None

    @classmethod
    def read(cls, folder: Path) -> PlainTokenizer | None:
        """The folder's tokenizer, where it is the generic one with nothing transformers would add or rewrite:
        no tokens beyond tokenizer.json's, no BOS/EOS switches that rebuild its post-processor, no clean-up of
        decoded text, one value per special token, its EOS in the vocabulary. None otherwise."""
        config = read_json(str(folder / "tokenizer_config.json"))
        if config.get("tokenizer_class") not in GENERIC_TOKENIZERS or not (folder / "tokenizer.json").is_file():
            return None
        switches = {"add_bos_token", "add_eos_token", "add_prefix_space", "legacy"}
        if switches & set(config) or config.get("clean_up_tokenization_spaces"):
            return None
        if (folder / "added_tokens.json").exists():
            return None
        mapped = read_json(str(folder / "special_tokens_map.json"))
        for name in ("bos_token", "eos_token"):
            if name in mapped:
                if name in config and _token_text(config[name]) != _token_text(mapped[name]):
                    return None
                config = {**config, name: mapped[name]}
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        present = {i: token.content for i, token in backend.get_added_tokens_decoder().items()}
        for key, token in (config.get("added_tokens_decoder") or {}).items():
            if not isinstance(token, dict) or present.get(int(key)) != token.get("content"):
                return None  # a token transformers would add to the backend
        tokenizer = cls(folder, config, backend)
        return tokenizer if tokenizer.eos_token_id is not None else None

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        return [self._tokenizer.id_to_token(i) for i in ids]


def data_tokenizer(model_name: str, chat: bool):
    """The tokenizer the parent prepares rows with: the generic fast one read directly (PlainTokenizer) where it
    serves and the rows need no chat template, else the model's own (load_tokenizer)."""
    folder = Path(os.path.expanduser(model_name))
    plain = PlainTokenizer.read(folder) if not chat and folder.is_dir() else None
    if plain is not None:
        return plain
    with collector_off():
        return load_tokenizer(model_name)


def load_tokenizer(model_name: str):
    """The model's tokenizer, with a pad token (its EOS when it has none). The same call in the parent, which
    prepares the rows with it, and in the ranks, which save it beside the adapter."""
    config_path = Path(os.path.expanduser(model_name), "tokenizer_config.json")
    generic = False
    if config_path.is_file() and Path(config_path.parent, "tokenizer.json").is_file():
        generic = read_json(str(config_path)).get("tokenizer_class") in GENERIC_TOKENIZERS
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
