"""Speed settings, chosen before launch without importing torch: the attention kernel, packing, gradient
checkpointing, Liger kernels, TF32 and dataloader workers. `auto` values are resolved here, each with the
reason the run log shows. BENCHMARKS.md holds the figures behind each choice.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .machine import Gpu, has_package


def kernel_installed(name: str) -> bool:
    """An optional kernel package (flash_attn, liger_kernel) is installed and not listed in SFT_TRAINER_DISABLE,
    the comma list that makes the plugin treat a package as missing (a broken install, or a comparison)."""
    disabled = {part.strip() for part in os.environ.get("SFT_TRAINER_DISABLE", "").split(",")}
    return name not in disabled and has_package(name)


GIB = 2**30
# Gradient checkpointing stays off only when the estimate times this margin fits this share of the memory.
ESTIMATE_MARGIN = 1.5
MEMORY_SHARE = 0.85
# Without flash-attention, packed rows are kept apart by a mask over the whole flattened batch, whose cost
# grows with its square: on 2 CPU ranks packing took 0.61x the time of padding at 512 tokens per batch,
# 0.90x at 1,024, 1.02x at 2,048 and 1.61x at 4,096 (BENCHMARKS.md).
MASKED_PACKING_LIMIT = 1024
# CUDA context, cuBLAS workspaces and allocator slack per GPU.
RUNTIME_OVERHEAD = 1.5 * GIB


@dataclass
class Speed:
    attention: str = "sdpa"
    packing: bool = False
    gradient_checkpointing: bool = True
    liger: bool = False
    tf32: bool = False
    dataloader_workers: int = 0
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def estimate_memory(
    config: dict[str, Any],
    p: dict[str, Any],
    *,
    precision: str,
    world_size: int,
    checkpointing: bool,
    liger: bool = False,
) -> float | None:
    """Bytes one device needs for training: weights, gradients and optimizer state, activations of one
    micro-batch of batch_size x maximum_sequence_length tokens, logits and the loss. An upper-side estimate
    (every row at full length); None when config.json lacks the sizes."""
    s = _shape(config)
    if s is None:
        return None
    params, embeddings = _parameters(s), _embeddings(s)
    h, layers, inter = s["hidden"], s["layers"], s["intermediate"]
    width = 2 if precision in ("bf16", "fp16") else 4
    sharded = p["distributed_strategy"] in ("fsdp", "deepspeed_zero3")
    # 4-bit blocks with their scales under qlora; embeddings stay in the compute dtype.
    quantized = p["training_mode"] == "qlora"
    weights = (params - embeddings) * 0.5625 + embeddings * width if quantized else params * width
    if p["training_mode"] == "full":
        states = params * (width + 2 * width)  # gradients and two Adam moments in the weights' dtype
        if p["distributed_strategy"] == "deepspeed_zero2":
            states /= world_size
    else:
        adapted = layers * (2 * h + s["q_dim"] + 2 * s["kv_dim"] + s["q_dim"] + h + 3 * (h + inter))
        states = p["lora_r"] * adapted * 4 * 4  # fp32 adapter weights, gradients and two moments
    if sharded:
        weights, states = weights / world_size, states / world_size
    tokens = p["batch_size"] * p["maximum_sequence_length"]
    # Saved for the backward pass per token and layer: norms, attention inputs/outputs, q/k/v, and the MLP's
    # gate, up, activation and down inputs; adapters with dropout keep a dropped copy of each adapted input.
    per_layer = width * (6 * h + s["q_dim"] + 2 * s["kv_dim"] + 4 * inter * min(s["experts"], 2))
    if p["training_mode"] != "full" and p["lora_dropout"] > 0:
        # A dropped copy of each adapted linear's input (q, k, v, o, gate, up: hidden wide; down: intermediate)
        # and its one-byte mask.
        per_layer += (width + 1) * (6 * h + inter)
    # Checkpointing keeps each layer's input and recomputes one layer at a time.
    activations = tokens * (layers * h * width + per_layer) if checkpointing else tokens * layers * per_layer
    activations += tokens * width * (4 * h + 2 * inter)  # gradients in flight during the backward pass
    # Logits in the compute dtype, their fp32 copy for the loss and its gradient; Liger fuses them away.
    logits = 0 if liger else tokens * s["vocab"] * (width + 4 + 4)
    return weights + states + activations + logits + RUNTIME_OVERHEAD


def masked_packing_is_slow(p: dict[str, Any], device: str) -> bool:
    """Packing without flash-attention where the whole-batch mask costs more than padding (or is unmeasured)."""
    return device == "cuda" or p["batch_size"] * p["maximum_sequence_length"] > MASKED_PACKING_LIMIT


def _ampere(device: str, gpus: list[Gpu]) -> bool:
    return device == "cuda" and bool(gpus) and all(g.ampere_or_newer for g in gpus)


def flash_attention_usable(device: str, gpus: list[Gpu], precision: str) -> bool:
    """flash-attn is installed and can run here: CUDA, Ampere or newer, half precision."""
    return _ampere(device, gpus) and precision in ("bf16", "fp16") and kernel_installed("flash_attn")


def choose(
    p: dict[str, Any],
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
    speed = Speed()
    why = speed.reasons
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

    if p["packing"] == "auto":
        flattened = p["batch_size"] * p["maximum_sequence_length"]
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
        speed.packing = p["packing"] == "true"
        why.append(f"packing: {'on' if speed.packing else 'off'} (set)")

    speed.liger = cuda and kernel_installed("liger_kernel")
    if speed.liger:
        why.append("liger kernels: on (installed): fused RMSNorm, RoPE, SwiGLU and linear+cross-entropy")

    if p["gradient_checkpointing"] != "auto":
        speed.gradient_checkpointing = p["gradient_checkpointing"] == "true"
        why.append(f"gradient checkpointing: {'on' if speed.gradient_checkpointing else 'off'} (set)")
    else:
        budget = min(g.memory_mib for g in gpus) * 2**20 if cuda and gpus else None
        if not cuda and ram_bytes:
            budget = ram_bytes / max(1, processes_here)
        needed = (
            estimate_memory(
                model_config, p, precision=precision, world_size=world_size, checkpointing=False, liger=speed.liger
            )
            if model_config
            else None
        )
        where = "per GPU" if cuda else "per process in RAM"
        if needed is None or budget is None:
            speed.gradient_checkpointing = True
            why.append("gradient checkpointing: on (the model's size is unknown before loading it)")
        else:
            speed.gradient_checkpointing = needed * ESTIMATE_MARGIN > budget * MEMORY_SHARE
            verdict = "on, since it does not fit with room to spare" if speed.gradient_checkpointing else "off"
            why.append(
                f"gradient checkpointing: {verdict} (about {needed / GIB:.1f} GiB estimated {where} without it, "
                f"{budget / GIB:.1f} GiB available)"
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
    return speed
