"""Speed settings, chosen before launch without importing torch: the attention kernel, packing, gradient
checkpointing, Liger kernels, TF32 and dataloader workers. `auto` values are resolved here, each with the
reason the run log shows. BENCHMARKS.md holds the figures behind each choice.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .machine import GIB, Gpu, has_package
from .params import AUTO, Params
from .runfolder import lora_targets


def liger_model_types() -> frozenset[str] | None:
    """The model types the installed liger-kernel has kernels for, read from its table (MODEL_TYPE_TO_APPLY_LIGER_FN
    in liger_kernel/transformers/monkey_patch.py) without importing it, which would import torch and Triton. On a
    model type missing there it applies nothing, silently. None when the table cannot be read."""
    found = importlib.util.find_spec("liger_kernel")
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(next(iter(found.submodule_search_locations)), "transformers", "monkey_patch.py")
    try:
        table = re.search(r"MODEL_TYPE_TO_APPLY_LIGER_FN\s*=\s*\{(.*?)\n\}", path.read_text(), re.S)
    except OSError:
        return None
    types = frozenset(re.findall(r"[\"']([\w.-]+)[\"']\s*:", table.group(1))) if table else frozenset()
    return types or None


def kernel_installed(name: str) -> bool:
    """An optional kernel package (flash_attn, liger_kernel) is installed and not listed in SFT_TRAINER_DISABLE,
    the comma list that makes the plugin treat a package as missing (a broken install, or a comparison)."""
    disabled = {part.strip() for part in os.environ.get("SFT_TRAINER_DISABLE", "").split(",")}
    return name not in disabled and has_package(name)


# Gradient checkpointing stays off only when the estimate times this margin fits this share of the memory.
ESTIMATE_MARGIN = 1.5
MEMORY_SHARE = 0.85
# Without flash-attention, packed rows are kept apart by a mask over the whole flattened batch, whose cost
# grows with its square: on 2 CPU ranks packing took 0.61x the time of padding at 512 tokens per batch,
# 0.90x at 1,024, 1.02x at 2,048 and 1.61x at 4,096 (BENCHMARKS.md).
MASKED_PACKING_LIMIT = 1024
# CUDA context, cuBLAS workspaces and allocator slack per GPU.
RUNTIME_OVERHEAD = 1.5 * GIB


@dataclass(frozen=True)
class Speed:
    """The speed settings `choose` decided, each with its reason (in the plan's log and `--check --json`)."""

    attention: str = "sdpa"
    packing: bool = False
    gradient_checkpointing: bool = True
    liger: bool = False
    tf32: bool = False
    dataloader_workers: int = 0
    reasons: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "reasons": list(self.reasons)}


def _shape(config: dict[str, Any]) -> dict[str, int] | None:
    """The sizes the estimate needs, from config.json (text configs of multimodal models included)."""
    config = config.get("text_config") or config
    hidden = config.get("hidden_size") or config.get("n_embd") or config.get("d_model")
    layers = config.get("num_hidden_layers") or config.get("n_layer") or config.get("num_layers")
    vocab = config.get("vocab_size")
    if not (hidden and layers and vocab):
        return None
    heads = config.get("num_attention_heads") or config.get("n_head") or 1
    head_dim = config.get("head_dim") or hidden // heads
    experts = config.get("num_local_experts") or config.get("num_experts") or 1
    return {
        "hidden": int(hidden),
        "layers": int(layers),
        "vocab": int(vocab),
        "intermediate": int(config.get("intermediate_size") or config.get("n_inner") or 4 * hidden),
        "q_dim": int(heads * head_dim),
        "kv_dim": int((config.get("num_key_value_heads") or heads) * head_dim),
        "experts": int(experts),
        "tied": bool(config.get("tie_word_embeddings", False)),
    }


def _embeddings(s: dict[str, int]) -> int:
    return s["vocab"] * s["hidden"] * (1 if s["tied"] else 2)


def _parameters(s: dict[str, int]) -> int:
    h = s["hidden"]
    attention = h * s["q_dim"] * 2 + h * s["kv_dim"] * 2
    mlp = 3 * h * s["intermediate"] * s["experts"]
    return s["layers"] * (attention + mlp + 2 * h) + _embeddings(s)


def parameter_count(config: dict[str, Any]) -> int | None:
    s = _shape(config)
    return None if s is None else _parameters(s)


# The linear layers of a decoder block a LoRA target name selects, by the names models give them, each as
# (inputs, outputs, one per expert) over the model's sizes. all-linear adapts the first seven.
ATTENTION_OUT = ("q_dim", "hidden", False)
MLP_IN, MLP_OUT = ("hidden", "intermediate", True), ("intermediate", "hidden", True)
BLOCK_LINEARS = {
    "q_proj": (("hidden", "q_dim", False),),
    "k_proj": (("hidden", "kv_dim", False),),
    "v_proj": (("hidden", "kv_dim", False),),
    "o_proj": (ATTENTION_OUT,),
    "gate_proj": (MLP_IN,),
    "up_proj": (MLP_IN,),
    "down_proj": (MLP_OUT,),
    **dict.fromkeys(("qkv_proj", "c_attn", "query_key_value", "Wqkv"), (("hidden", "qkv_dim", False),)),
    **dict.fromkeys(("dense", "out_proj"), (ATTENTION_OUT,)),
    "gate_up_proj": (("hidden", "gate_up", True),),
    **dict.fromkeys(("c_fc", "fc1", "w1", "w3"), (MLP_IN,)),
    **dict.fromkeys(("fc2", "w2"), (MLP_OUT,)),
    "c_proj": (ATTENTION_OUT, MLP_OUT),  # GPT-2 names both outputs so
}
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_parameter_count(config: Mapping[str, Any], r: int, targets: str) -> int | None:
    """Parameters of a LoRA adapter of rank r: r x (inputs + outputs) per adapted linear layer of each block.
    A name not listed above counts as the widest layer of a block. None when config.json lacks the sizes."""
    s = _shape(dict(config))
    if s is None:
        return None
    sizes = {**s, "qkv_dim": s["q_dim"] + 2 * s["kv_dim"], "gate_up": 2 * s["intermediate"]}
    names = lora_targets(targets)
    names = ALL_LINEAR if names is None else names
    per_layer = 0
    for name in names:
        for inputs, outputs, per_expert in BLOCK_LINEARS.get(name, (MLP_IN,)):
            per_layer += (sizes[inputs] + sizes[outputs]) * (s["experts"] if per_expert else 1)
    return r * per_layer * s["layers"]


def weights_precision(training_mode: str, strategy: str, precision: str) -> str:
    """The precision the weights are loaded and updated in. Full fine-tuning under ddp (or one process) keeps them
    in fp32 while autocast computes in bf16/fp16, as TRL's own default does: bf16 weights lose every update below
    their resolution (a 1e-5 step on a weight near 1), and the fp16 loss scaler refuses fp16 gradients outright.
    FSDP upcasts trainable weights itself, DeepSpeed keeps its own fp32 master copy, and LoRA trains fp32 adapters
    over a frozen 16-bit base: those load in the training precision."""
    return "fp32" if training_mode == "full" and strategy == "ddp" else precision


def merge_precision(training_mode: str, precision: str) -> str:
    """What fuse_model merges the adapter into: a 16-bit (bf16) copy of the base, or fp32 for a LoRA trained in fp32.
    A 4-bit base cannot hold merged values, so a QLoRA adapter is merged into bf16 weights too, and fp16 merges are
    made in bf16, whose range the merged sums cannot overflow."""
    return "fp32" if training_mode == "lora" and precision == "fp32" else "bf16"


def full_training_bytes(strategy: str, width: int, world_size: int) -> float:
    """Bytes per parameter on one device for full fine-tuning: weights, gradients and AdamW's two moments, by
    strategy, as these library versions allocate them.
    - ddp (and one process): fp32 weights, gradients and moments (16), the 16-bit copy autocast keeps of each
      weight during a step (2), and DDP's gradient buckets beside the gradients (4) when there are several ranks;
    - fsdp: accelerate upcasts trainable weights to fp32, all sharded: 16 / world;
    - deepspeed_zero2: 16-bit weights and gradients, fp32 master weights and moments sharded: 2 + 2 + 12 / world;
    - deepspeed_zero3: all of it sharded: 16 / world."""
    if strategy == "fsdp":
        return 16 / world_size
    if strategy == "deepspeed_zero2":
        return 2 * width + 12 / world_size
    if strategy == "deepspeed_zero3":
        return (2 * width + 12) / world_size
    return 16 + (2 if width == 2 else 0) + (4 if world_size > 1 else 0)


# TRL 1.16's fused LM head (trl/kernels/chunked_logprob.py) projects at most this many tokens onto this many
# vocabulary entries at a time: the full (tokens x vocabulary) logits are never built.
LOGITS_TILE_TOKENS = 4096
LOGITS_TILE_VOCAB = 32768
# Per token, besides its hidden state's fp32 gradient: log-probability, entropy, top-1 and the running
# log-sum-exp statistics.
LOGITS_PER_TOKEN = 32
# Without Triton (the CPU) TRL folds each tile in torch, through fp32 temporaries of the tile's size: 8.4 to 8.8
# tiles measured on torch 2.13's CPU build, at 2,048 to 8,192 tokens and 8k to 32k entries (BENCHMARKS.md).
TILES_WITHOUT_TRITON = 9


def logits_memory(s: dict[str, int], tokens: int, width: int, device: str) -> float:
    """The LM head and the loss: the projection tile (on CUDA, in the compute precision, which Triton folds in
    place; elsewhere, torch's fp32 temporaries of its size), the hidden states' fp32 gradient, and a few fp32
    values per token."""
    cells = min(tokens, LOGITS_TILE_TOKENS) * min(s["vocab"], LOGITS_TILE_VOCAB)
    tile = cells * width if device == "cuda" else cells * 4 * TILES_WITHOUT_TRITON
    return tile + tokens * (4 * s["hidden"] + LOGITS_PER_TOKEN)


def estimate_memory(
    config: dict[str, Any],
    p: Params,
    *,
    precision: str,
    world_size: int,
    checkpointing: bool,
    device: str,
) -> float | None:
    """Bytes one device (a GPU on `cuda`, else the RAM of one CPU process) needs for training: weights, gradients
    and optimizer state, activations of one micro-batch of batch_size x maximum_sequence_length tokens, the LM head
    and the loss, and the CUDA runtime. An upper-side estimate (every row at full length); None when config.json
    lacks the sizes."""
    s = _shape(config)
    if s is None:
        return None
    params, embeddings = _parameters(s), _embeddings(s)
    h, layers, inter = s["hidden"], s["layers"], s["intermediate"]
    width = 2 if precision in ("bf16", "fp16") else 4
    strategy = p.distributed_strategy
    if p.training_mode == "full":
        weights_and_states = params * full_training_bytes(strategy, width, world_size)
    else:
        # 4-bit blocks with their scales under qlora; embeddings stay in the compute dtype.
        quantized = p.training_mode == "qlora"
        weights = (params - embeddings) * 0.5625 + embeddings * width if quantized else params * width
        adapter = lora_parameter_count(config, p.lora_r, p.lora_target_modules) or 0
        states = adapter * 16  # fp32 adapter weights, gradients and two moments
        if strategy in ("fsdp", "deepspeed_zero3"):
            weights, states = weights / world_size, states / world_size
        weights_and_states = weights + states
    tokens = p.batch_size * p.maximum_sequence_length
    # Saved for the backward pass per token and layer: norms, attention inputs/outputs, q/k/v, and the MLP's
    # gate, up, activation and down inputs; adapters with dropout keep a dropped copy of each adapted input.
    per_layer = width * (6 * h + s["q_dim"] + 2 * s["kv_dim"] + 4 * inter * min(s["experts"], 2))
    if p.training_mode != "full" and p.lora_dropout > 0:
        # A dropped copy of each adapted linear's input (q, k, v, o, gate, up: hidden wide; down: intermediate)
        # and its one-byte mask.
        per_layer += (width + 1) * (6 * h + inter)
    # Checkpointing keeps each layer's input and recomputes one layer at a time.
    activations = tokens * (layers * h * width + per_layer) if checkpointing else tokens * layers * per_layer
    activations += tokens * width * (4 * h + 2 * inter)  # gradients in flight during the backward pass
    return weights_and_states + activations + logits_memory(s, tokens, width, device) + RUNTIME_OVERHEAD


def masked_packing_is_slow(p: Params, device: str) -> bool:
    """Packing without flash-attention where the whole-batch mask costs more than padding (or is unmeasured)."""
    return device == "cuda" or p.batch_size * p.maximum_sequence_length > MASKED_PACKING_LIMIT


def _ampere(device: str, gpus: list[Gpu]) -> bool:
    return device == "cuda" and bool(gpus) and all(g.ampere_or_newer for g in gpus)


def flash_attention_usable(device: str, gpus: list[Gpu], precision: str) -> bool:
    """flash-attn is installed and can run here: CUDA, Ampere or newer, half precision."""
    return _ampere(device, gpus) and precision in ("bf16", "fp16") and kernel_installed("flash_attn")


def choose(
    p: Params,
    *,
    device: str,
    gpus: list[Gpu],
    precision: str,
    world_size: int,
    cpu_count: int,
    processes_here: int,
    model_config: dict[str, Any] | None,
    ram_bytes: float | None = None,
) -> Speed:
    speed = SimpleNamespace(**asdict(Speed()))  # decided one setting at a time below, then frozen
    why: list[str] = []
    cuda = device == "cuda"

    if flash_attention_usable(device, gpus, precision):
        speed.attention = "flash_attention_2"
        why.append("attention: flash-attention 2 (installed, Ampere or newer, half precision)")
    else:
        missing = (
            "on the CPU"
            if not cuda
            else "flash-attn is not installed"
            if not kernel_installed("flash_attn")
            else "it needs an Ampere or newer GPU and bf16/fp16"
        )
        why.append(f"attention: PyTorch SDPA (flash-attention not used: {missing})")

    if p.packing is AUTO:
        flattened = p.batch_size * p.maximum_sequence_length
        if speed.attention.startswith("flash"):
            speed.packing = True
            why.append("packing: on (best-fit decreasing, padding-free; flash-attention keeps rows apart at no cost)")
        elif not masked_packing_is_slow(p, device):
            speed.packing = True
            why.append(
                f"packing: on (best-fit decreasing, padding-free; SDPA keeps rows apart with a mask over the "
                f"batch's {flattened} tokens, cheaper than padding up to {MASKED_PACKING_LIMIT})"
            )
        else:
            speed.packing = False
            why.append(
                "packing: off (without flash-attention, packed rows are kept apart by a mask over the whole "
                + (
                    "batch, not yet measured on GPUs"
                    if cuda
                    else f"batch of {flattened} tokens, slower than padding above {MASKED_PACKING_LIMIT}"
                )
                + "; set packing=true to pack anyway)"
            )
    else:
        speed.packing = p.packing
        why.append(f"packing: {'on' if speed.packing else 'off'} (set)")

    if cuda and kernel_installed("liger_kernel"):
        model_type = (model_config or {}).get("model_type")
        supported = liger_model_types()
        speed.liger = supported is None or model_type in supported
        why.append(
            f"liger kernels: on (installed; fused RMSNorm, RoPE and SwiGLU for {model_type or 'this model'})"
            if speed.liger
            else f"liger kernels: off (liger-kernel has no kernels for model_type {model_type})"
        )

    if p.gradient_checkpointing is not AUTO:
        speed.gradient_checkpointing = p.gradient_checkpointing
        why.append(f"gradient checkpointing: {'on' if speed.gradient_checkpointing else 'off'} (set)")
    else:
        # Free memory, not total: a GPU shared with another process (an inference server) has less to give.
        budget = min(g.available_mib for g in gpus) * 2**20 if cuda and gpus else None
        if not cuda and ram_bytes:
            budget = ram_bytes / max(1, processes_here)
        needed = (
            estimate_memory(
                model_config, p, precision=precision, world_size=world_size, checkpointing=False, device=device
            )
            if model_config
            else None
        )
        where, available = ("per GPU", "free") if cuda else ("per process in RAM", "available")
        if needed is None or budget is None:
            speed.gradient_checkpointing = True
            why.append("gradient checkpointing: on (the model's size is unknown before loading it)")
        else:
            speed.gradient_checkpointing = needed * ESTIMATE_MARGIN > budget * MEMORY_SHARE
            verdict = "on, since it does not fit with room to spare" if speed.gradient_checkpointing else "off"
            why.append(
                f"gradient checkpointing: {verdict} (about {needed / GIB:.1f} GiB estimated {where} without it, "
                f"{budget / GIB:.1f} GiB {available})"
            )

    speed.tf32 = _ampere(device, gpus)
    if speed.tf32:
        why.append("tf32: on for float32 matmuls (Ampere or newer)")

    if cuda:
        speed.dataloader_workers = max(0, min(2, cpu_count // max(1, processes_here) - 1))
    why.append(
        f"dataloader workers: {speed.dataloader_workers} per process"
        + (
            " (batches are built while the GPU computes)"
            if speed.dataloader_workers
            else " (on the CPU they would take cores from training)"
            if not cuda
            else ""
        )
    )
    return Speed(**{**vars(speed), "reasons": tuple(why)})
