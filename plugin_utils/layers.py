"""The model's layers, listed without loading its weights, so `--dry-run` and a real run check what only the loaded
model would otherwise reveal: LoRA target modules that name no layer, an architecture transformers cannot build as
a causal language model, gradient checkpointing the model does not support. A checkpoint that holds more than its
language model (a vision tower) gets its adapters in the language model alone, here and in the ranks.

Two ways to list them. A model of a family in `FAMILIES` whose weights are safetensors is read from the files'
headers (milliseconds, no torch): every weight names its module, and the table says what a header cannot (the
base model's name, the embeddings, the class of the projections). Any other model is built from its config.json on
the meta device (no memory, no weights read), which imports torch and transformers: seconds. What a build finds is
kept in `~/.cache/sft_trainer_trl/layers/` (or `SFT_LAYERS_CACHE`), keyed by the config.json, this module and the
versions of transformers and torch, so the next run of the same model (a resume, a sweep, a second try) reads it
back without building it again. `Layers` and its matching need neither, so validation's rules over it stay
torch-free.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import struct
from dataclasses import asdict, dataclass, field

from .sources import model_config, model_folder, read_json, write_whole

# The layer classes PEFT's LoRA adapts (torch's, transformers' GPT-2 Conv1D, bitsandbytes' quantized Linear).
ADAPTABLE = frozenset(
    {"Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "Conv1D", "MultiheadAttention", "Linear4bit", "Linear8bitLt"}
)
# What a module read from a checkpoint's header is when it is no layer LoRA adapts (a block, a norm): the header
# names no class.
BLOCK = "Module"


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
            kind = self.modules[found[0]]
            return f"{target!r} is a block{'' if kind == BLOCK else f' ({kind})'}, not a layer LoRA can adapt"
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


def known(model_name: str) -> Layers | None:
    """The model's modules where files alone say them, in milliseconds and without torch (what `--check` can
    afford): read from its safetensors headers, or as an earlier run built them for the same config. None
    otherwise (`describe` builds them)."""
    config = model_config(model_name)
    if config is None:
        return None
    read = from_weights(model_folder(model_name), config)
    if read is not None:
        return read
    try:
        with open(_kept_file(model_name)) as handle:
            found = json.load(handle)
        return Layers(**{**found, "beside": tuple(found["beside"])})
    except (OSError, ValueError, TypeError, KeyError):  # none kept yet, or a torn file
        return None


def describe(model_name: str) -> Layers | None:
    """The model's modules: as `known` finds them, else built from its config.json on the meta device (and kept
    for the next run). None when the config cannot be read here (a Hub id that is not cached): the real load
    finds out then."""
    found = known(model_name)
    if found is not None or model_config(model_name) is None:
        return found
    layers = built(model_name)
    if layers.error is None:
        _keep(_kept_file(model_name), layers)
    return layers


# --- read from the checkpoint's safetensors headers ------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """What a checkpoint's weight names cannot say about the modules AutoModelForCausalLM builds for a model type.
    Every family builds a causal LM whose output layer is a Linear named `lm_head` and which supports gradient
    checkpointing; tests/test_layers.py holds each entry to what the meta-device build reports."""

    base: str  # the base model's module (transformers' base_model_prefix): prefixed to a base model's checkpoint
    embeddings: tuple[str, ...]  # its nn.Embedding modules (a subclass too), by their names under `base`
    conv1d: bool = False  # its other 2-D weights are transformers' Conv1D (GPT-2), not Linear
    ignored: str | None = None  # weights of older checkpoints that the load drops (a mask saved as a buffer)


FAMILIES = {
    **{
        model_type: Family("model", ("embed_tokens",))
        for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "smollm3")
    },
    "gpt2": Family("transformer", ("wte", "wpe"), conv1d=True, ignored=r"transformer\.h\.\d+\.attn\.(?:masked_)?bias"),
}
OUTPUT_LAYER = "lm_head"
# A pre-quantized bitsandbytes checkpoint's weights beside each quantized Linear's (4-bit: its quantization state;
# 8-bit: its scales): the meta build, which quantizes nothing, sees a Linear there.
_BNB_STATE = re.compile(
    r"(?P<module>.+)\.(?:weight\.(?:absmax|quant_map|nested_absmax|nested_quant_map|quant_state\.bitsandbytes__\w+)"
    r"|SCB|weight_format)"
)


def from_weights(folder: str | None, config: dict) -> Layers | None:
    """The modules of a model of a family in `FAMILIES`, named by its safetensors weights: no torch, no
    transformers, nothing but the files' headers read. None wherever a header cannot tell them exactly (another
    model type, remote code, weights in another form, a weight that is no module's weight or bias, a quantization
    other than bitsandbytes): the meta-device build answers then.

    Modules without weights (activations, dropouts, rotary embeddings) are not listed: LoRA adapts none of them,
    so a target naming one is refused either way, as naming no layer rather than as a block."""
    family = FAMILIES.get(str(config.get("model_type")))
    quantization = config.get("quantization_config") or {}
    if family is None or folder is None or "auto_map" in config:
        return None
    if quantization and (not isinstance(quantization, dict) or quantization.get("quant_method") != "bitsandbytes"):
        return None
    try:
        shapes = _weight_shapes(folder)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, struct.error):  # torn or foreign: build it
        return None
    if shapes is None:
        return None
    # A base model's checkpoint (LlamaModel's, GPT-2 as published) names its weights without the base model's
    # module, which the load puts them under; any other weight outside the model is not one of its modules.
    tops = {key.split(".", 1)[0] for key in shapes}
    if family.base in tops and not tops <= {family.base, OUTPUT_LAYER}:
        return None
    weights: dict[str, dict[str, list[int]]] = {}
    quantized = set()
    for key, shape in shapes.items():
        name = key if key.split(".", 1)[0] in (family.base, OUTPUT_LAYER) else f"{family.base}.{key}"
        if family.ignored and re.fullmatch(family.ignored, name):
            continue
        state = _BNB_STATE.fullmatch(name) if quantization else None
        if state:
            quantized.add(state["module"])
            continue
        module, _, part = name.rpartition(".")
        if part not in ("weight", "bias") or module in ("", family.base) or not isinstance(shape, list):
            return None
        weights.setdefault(module, {})[part] = shape
    embeddings = {f"{family.base}.{name}" for name in family.embeddings}
    if not embeddings <= weights.keys() or not quantized <= weights.keys():
        return None
    modules = {OUTPUT_LAYER: "Linear"}
    for module, held in weights.items():
        weight = held.get("weight")
        if weight is None or len(weight) not in (1, 2):  # a bias alone, or a convolution: not a family's layer
            return None
        if module in quantized or module == OUTPUT_LAYER:
            modules[module] = "Linear"
        elif len(weight) == 1:
            modules[module] = BLOCK  # a norm
        elif module in embeddings:
            modules[module] = "Embedding"
        else:
            modules[module] = "Conv1D" if family.conv1d else "Linear"
        parts = module.split(".")
        for depth in range(1, len(parts)):
            modules.setdefault(".".join(parts[:depth]), BLOCK)
    ordered = {name: modules[name] for name in sorted(modules, key=_in_order)}
    return Layers(modules=ordered, output_layer=OUTPUT_LAYER)


def _in_order(name: str) -> tuple:
    """A module's place in the listing: each block before what it holds, block 2 before block 10."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split("."))


def _weight_shapes(folder: str) -> dict[str, list[int]] | None:
    """Each weight's shape, from the safetensors file transformers loads (model.safetensors, else the shards its
    index names); None when the folder has neither, or an index whose shards do not hold what it names."""
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return _header(single)
    index = read_json(os.path.join(folder, "model.safetensors.index.json")).get("weight_map")
    if not isinstance(index, dict) or not index:
        return None
    shapes: dict[str, list[int]] = {}
    for shard in sorted(set(index.values())):
        if not isinstance(shard, str) or os.path.basename(shard) != shard:
            return None
        shapes.update(_header(os.path.join(folder, shard)))
    return shapes if shapes.keys() == index.keys() else None


def _header(path: str) -> dict[str, list[int]]:
    """Each tensor's shape in a safetensors file, from its header alone: the file begins with the header's length
    (8 bytes, little-endian), then the header, a JSON object giving every tensor's dtype, shape and offsets."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > 100_000_000:  # safetensors' own limit: no header is larger
            raise ValueError(f"{path}: a header of {length} bytes")
        header = json.loads(handle.read(length))
    return {name: entry["shape"] for name, entry in header.items() if name != "__metadata__"}


# --- built on the meta device, and kept ------------------------------------------------------------------------


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
    import hashlib  # here: where the safetensors headers name the layers (what --check meets), nothing is kept

    digest = hashlib.sha256()
    for part in (config, code, *(v.encode() for v in versions)):
        digest.update(hashlib.sha256(part).digest())
    return os.path.join(layers_cache_root(), digest.hexdigest()[:32] + ".json")


def _keep(path: str, layers: Layers) -> None:
    """Written whole (a reader never sees half of it); a cache that cannot be written is only a slower next run."""
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_whole(path, json.dumps(asdict(layers)))


def built(model_name: str) -> Layers:
    """The model built from its config.json on the meta device, as AutoModelForCausalLM builds it to train."""
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
