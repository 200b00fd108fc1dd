"""Where models and tokenizers come from: a model's config.json without loading weights, the TransformerLab
workspace, and the tokenizer both the parent (data preparation) and the ranks (training) load.

Used by validation, planning, data preparation, the hosts and the ranks alike; it imports none of them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import InvalidConfig, problem


def workspace_dir() -> str:
    """The TransformerLab workspace: TFL_WORKSPACE_DIR, else <TFL_HOME_DIR or ~/.transformerlab>/workspace."""
    if os.environ.get("TFL_WORKSPACE_DIR"):
        return os.environ["TFL_WORKSPACE_DIR"]
    home = os.environ.get("TFL_HOME_DIR") or os.path.join(os.path.expanduser("~"), ".transformerlab")
    return os.path.join(home, "workspace")


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


@lru_cache(maxsize=8)
def model_config(name: str) -> dict[str, Any] | None:
    """The model's config.json (local folder or the Hub cache), without loading weights or torch."""
    folder = os.path.expanduser(name)
    if os.path.isdir(folder):
        path = os.path.join(folder, "config.json")
        return read_json(path) if os.path.isfile(path) else None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # a name that is no valid repo id
        return None
    return read_json(cached) if isinstance(cached, str) else None


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


# Row formats whose trained parts are assistant turns.
CHAT_FORMATS = ("chat", "chat_prompt_completion")


@dataclass(frozen=True)
class DataFacts:
    """What validation may know about the dataset before its rows are tokenized."""

    format: str  # text | prompt_completion | chat | chat_prompt_completion | template
    columns: tuple[str, ...]
    key: str  # the fingerprint of everything that shapes the prepared rows


# Tokenizer classes that are the generic fast tokenizer: loaded directly, without AutoTokenizer's model
# config machinery (which imports torch and costs the parent a second or more before the launch).
GENERIC_TOKENIZERS = {"PreTrainedTokenizerFast", "TokenizersBackend"}


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
