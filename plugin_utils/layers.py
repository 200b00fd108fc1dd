"""The model's layers, listed without its weights: the model is built from its config.json on the meta device
(no memory, no file but the config read), so `--dry-run` and a real run check what only the loaded model
would otherwise reveal: LoRA target modules that name no layer, an architecture transformers cannot build as
a causal language model, gradient checkpointing the model does not support. A checkpoint that holds more than
its language model (a vision tower) gets its adapters in the language model alone, here and in the ranks.

`describe()` needs torch and transformers the first time a model is described; what it finds is kept in
`~/.cache/sft_trainer_trl/layers/` (or `SFT_LAYERS_CACHE`), keyed by the config.json, this module and the
versions of transformers and torch, so the next run of the same model (a resume, a sweep, a second try) checks
it without building it again. `Layers` and its matching need neither, so validation's rules over it stay
torch-free.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field

from .sources import model_config, model_folder, write_whole

# The layer classes PEFT's LoRA adapts (torch's, transformers' GPT-2 Conv1D, bitsandbytes' quantized Linear).
ADAPTABLE = frozenset(
    {"Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "Conv1D", "MultiheadAttention", "Linear4bit", "Linear8bitLt"}
)


@dataclass(frozen=True)
class Layers:
    """Every module of the model by its full name (as PEFT sees it) and class name."""

    modules: dict[str, str] = field(default_factory=dict)
    output_layer: str | None = None  # the output embedding (lm_head): never an adapter target
    # The parts beside the language model of a checkpoint that has more (a vision tower, its projector): adapters
    # there would train nothing on text rows, so targets are matched in the language model only.
    beside: tuple[str, ...] = ()
    supports_gradient_checkpointing: bool = True
    error: str | None = None  # why the model could not be built from its config; nothing else is known then

    def matching(self, target: str) -> list[str]:
        """The modules a LoRA target name selects, as PEFT matches a list of names: the full name, or its end
        after a dot; never one beside the language model."""
        return [name for name in self.modules if _selects(name, target) and not self.is_beside(name)]

    def is_beside(self, name: str) -> bool:
        excluded = beside_pattern(self.beside)
        return bool(excluded and re.fullmatch(excluded, name))

    def adaptable_names(self) -> list[str]:
        """The short names that select the layers LoRA can adapt (q_proj, v_proj, ...), the output layer and
        what lies beside the language model left out, in the model's order."""
        seen: dict[str, None] = {}
        for name, kind in self.modules.items():
            if kind in ADAPTABLE and name != self.output_layer and kind != "Embedding" and not self.is_beside(name):
                seen.setdefault(name.rsplit(".", 1)[-1], None)
        return list(seen)

    def unknown_target(self, target: str) -> str | None:
        """Why `target` cannot be a LoRA target of this model, or None when it selects an adaptable layer."""
        found = self.matching(target)
        if not found and any(_selects(name, target) for name in self.modules):
            beside = ", ".join(self.beside)
            return f"{target!r} names layers beside the language model only ({beside}), which text rows never train"
        if not found:
            close = difflib.get_close_matches(target, self.adaptable_names(), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            return f"{target!r} names no layer of this model{hint}"
        if not any(self.modules[name] in ADAPTABLE for name in found):
            return f"{target!r} is a block ({self.modules[found[0]]}), not a layer LoRA can adapt"
        return None


def _selects(name: str, target: str) -> bool:
    """Whether a LoRA target name selects the module `name`, as PEFT matches a list of names."""
    return name == target or name.endswith("." + target)


def beside_language_model(model) -> tuple[str, ...]:
    """The full names of the modules beside the language model (`get_decoder()`) of a model that holds more than
    one, such as Gemma 3's `model.vision_tower` and `model.multi_modal_projector`; () for a plain language model.
    The output embedding is left to the rules that already keep adapters off it."""
    try:
        decoder = model.get_decoder()
    except Exception:  # an architecture without the lookup: every module counts
        return ()
    path = next((name for name, module in model.named_modules() if module is decoder), "")
    if not path:
        return ()
    output = model.get_output_embeddings()
    parts = path.split(".")
    beside = []
    for depth in range(len(parts)):
        parent = ".".join(parts[:depth])
        for name, child in model.get_submodule(parent).named_children():
            full = f"{parent}.{name}" if parent else name
            if full != ".".join(parts[: depth + 1]) and child is not output and any(True for _ in child.parameters()):
                beside.append(full)
    return tuple(beside)


def adapted_as(module) -> str:
    """The module's class as PEFT's LoRA sees it: PEFT picks a layer's adapter by isinstance, so a subclass of a
    layer it adapts is that layer (Falcon's FalconLinear a Linear, Gemma's scaled word embedding an Embedding);
    any other module is named by its own class."""
    return next((cls.__name__ for cls in type(module).__mro__ if cls.__name__ in ADAPTABLE), type(module).__name__)


def beside_pattern(beside: tuple[str, ...] | list[str]) -> str | None:
    """A regular expression that fully matches those modules and everything inside them (PEFT's
    `exclude_modules` as a string); None when there are none."""
    if not beside:
        return None
    return "(?:" + "|".join(re.escape(name) for name in beside) + r")(?:\..*)?"


def describe(model_name: str) -> Layers | None:
    """The model's modules, built from its config.json on the meta device, or as an earlier run found them for
    the same config. None when the config cannot be read here (a Hub id that is not cached): the real load finds
    out then."""
    if model_config(model_name) is None:
        return None
    kept = _kept_file(model_name)
    try:
        with open(kept) as handle:
            found = json.load(handle)
        return Layers(**{**found, "beside": tuple(found["beside"])})
    except (OSError, ValueError, TypeError, KeyError):  # none kept yet, or a torn file: build it
        pass
    layers = _built(model_name)
    if layers.error is None:
        _keep(kept, layers)
    return layers


def layers_cache_root() -> str:
    default = os.path.join(os.path.expanduser("~"), ".cache", "sft_trainer_trl", "layers")
    return os.environ.get("SFT_LAYERS_CACHE") or default


def _kept_file(model_name: str) -> str:
    """Where the description of this config is kept: its name hashes everything the description depends on."""
    from importlib.metadata import PackageNotFoundError, version

    versions = []
    for package in ("transformers", "torch"):
        try:
            versions.append(version(package))
        except PackageNotFoundError:
            versions.append("")
    with open(os.path.join(model_folder(model_name), "config.json"), "rb") as handle:
        config = handle.read()
    with open(__file__, "rb") as handle:
        code = handle.read()
    digest = hashlib.sha256()
    for part in (config, code, *(v.encode() for v in versions)):
        digest.update(hashlib.sha256(part).digest())
    return os.path.join(layers_cache_root(), digest.hexdigest()[:32] + ".json")


def _keep(path: str, layers: Layers) -> None:
    """Written whole (a reader never sees half of it); a cache that cannot be written is only a slower next run."""
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_whole(path, json.dumps(asdict(layers)))


def _built(model_name: str) -> Layers:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_name)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # any failure here is the one the real load would meet, minutes later
        return Layers(error=" ".join(f"{type(exc).__name__}: {exc}".split())[:300])
    output = model.get_output_embeddings()
    output_name = next((name for name, module in model.named_modules() if module is output), None)
    return Layers(
        modules={name: adapted_as(module) for name, module in model.named_modules() if name},
        output_layer=output_name,
        beside=beside_language_model(model),
        supports_gradient_checkpointing=bool(getattr(model, "supports_gradient_checkpointing", True)),
    )
