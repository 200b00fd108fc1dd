"""The run plan: every decision derived from the parameters and this machine, each with its reason.

The parameters stay what the user asked (`auto` stays `auto`); what `auto` became on this machine lives
here: the device and GPUs, processes per machine, machines and world size, precision, the strategy, the
speed settings (attention, packing, gradient checkpointing, Liger, TF32, dataloader workers), the disk the
run writes and, once the data's format is known, whether only completions are trained. Nothing here imports
torch.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from . import speed
from .machine import GIB, Gpu, Machine
from .params import AUTO, Params
from .rowformats import CHAT_FORMATS
from .sources import model_config, model_folder, read_json
from .speed import Speed


def selected_gpu_ids(p: Params, machine: Machine) -> list[int]:
    """gpu_ids as a list: the usable GPUs for auto, else the ids given."""
    return [g.index for g in machine.usable_gpus] if p.gpu_ids is AUTO else list(p.gpu_ids)


def asked_processes(p: Params) -> int | None:
    """num_processes as a count; None for auto."""
    return None if p.num_processes is AUTO else p.num_processes


def planned_gpus(p: Params, machine: Machine) -> list[Gpu]:
    """The GPUs the run will use: none on train_device=cpu, else the selected ones, the first num_processes."""
    if p.train_device == "cpu":
        return []
    selected = selected_gpu_ids(p, machine)
    count = asked_processes(p)
    if count is not None:
        selected = selected[:count]
    by_index = {g.index: g for g in machine.usable_gpus}
    return [by_index[i] for i in selected if i in by_index]


def precision_for(p: Params, gpus: list[Gpu]) -> str:
    """precision, with auto resolved: fp32 on the CPU, bf16 on Ampere or newer, else fp16."""
    if p.precision != "auto":
        return p.precision
    return "fp32" if not gpus else "bf16" if all(g.supports_bf16 for g in gpus) else "fp16"


def processes_here(p: Params, machine: Machine) -> int:
    """Processes on this machine: num_processes, or one per planned GPU (one on the CPU)."""
    count = asked_processes(p)
    return count if count is not None else max(1, len(planned_gpus(p, machine)))


def planned_steps(p: Params, world: int, rows: int) -> int:
    """Optimizer steps the run will take on `rows` training rows."""
    if p.max_steps > 0:
        return p.max_steps
    batches = -(-rows // (p.batch_size * world))
    return max(1, int(-(-batches // p.gradient_accumulation_steps) * p.num_train_epochs))


@dataclass(frozen=True)
class Plan:
    """What the run will do. Built once, before validation, whose rules read its decisions instead of making them
    again; used as it is once they pass, and never changed (a copy gains the loss mode)."""

    device: str
    gpu_ids: tuple[int, ...]
    num_processes: int  # on this machine
    num_machines: int
    machine_rank: int
    main_process_ip: str
    main_process_port: int  # 0: a free one is picked at launch
    precision: str  # what autocast computes in
    # What the weights are loaded and updated in: the precision, or fp32 where full fine-tuning needs a master copy.
    weights_precision: str
    strategy: str
    speed: Speed = field(default_factory=Speed)
    # Whether the loss is taken on completions / assistant turns only; None until the data's format is known.
    completion_only: bool | None = None
    # fuse_model with an adapter to merge (training_mode=full has none).
    merge_adapter: bool = False
    # What fuse_model merges into (speed.merge_precision).
    merged_precision: str = "bf16"
    reasons: tuple[str, ...] = ()
    # The planned GPUs as this process's CUDA_VISIBLE_DEVICES names them (GPU- and MIG- ids kept), else by index.
    visible_devices: tuple[str, ...] = ()
    # What the run writes at most (outputs and checkpoints together); None when the model's size is unknown.
    disk_gib: float | None = None
    # For validation's rules, never recorded (as_dict leaves them out): the planned GPUs themselves, and what the
    # run writes, part by part.
    gpus: tuple[Gpu, ...] = ()
    disk: DiskEstimate | None = None

    @property
    def world_size(self) -> int:
        return self.num_processes * self.num_machines

    @property
    def cuda_visible_devices(self) -> str:
        """The ranks' CUDA_VISIBLE_DEVICES: the planned GPUs; empty (every GPU hidden) on the CPU."""
        if self.device != "cuda":
            return ""
        return ",".join(self.visible_devices or map(str, self.gpu_ids))

    @property
    def gradient_checkpointing(self) -> bool:
        return self.speed.gradient_checkpointing

    def as_dict(self) -> dict[str, Any]:
        values = asdict(self)
        del values["gpus"], values["disk"]
        values["gpu_ids"] = list(self.gpu_ids)
        values["reasons"] = list(self.all_reasons())
        values["world_size"] = self.world_size
        return values

    def all_reasons(self) -> list[str]:
        return [*self.reasons, *self.speed.reasons]

    def with_loss_mode(self, p: Params, fmt: str) -> Plan:
        """This plan once the data's format is known: whether only completions (assistant turns) are trained."""
        on, why = loss_mode(p, fmt)
        return replace(self, completion_only=on, reasons=(*self.reasons, why))


def loss_mode(p: Params, fmt: str) -> tuple[bool, str]:
    """completion_only_loss (and assistant_only_loss) resolved for a data format, with the reason.
    The combinations that cannot work are validation's data rules; here they fall back to the whole text."""
    mode = p.completion_only_loss
    if fmt == "text":
        return False, "loss: on the whole text (plain text rows have no completion to split off)"
    if mode is False and not p.assistant_only_loss:
        return False, "loss: on the whole text (completion_only_loss=false)"
    part = "assistant turns" if fmt in CHAT_FORMATS else "completions"
    how = "set" if mode is True or p.assistant_only_loss else "auto"
    return True, f"loss: on {part} only ({how}, {fmt} rows)"


def build(p: Params, machine: Machine) -> Plan:
    """The plan for these parameters on this machine. Built before they are checked (validation's rules read it),
    so it takes whatever it is given: a value that failed its own check holds its default here."""
    gpus = planned_gpus(p, machine)
    count = processes_here(p, machine)
    device = "cuda" if gpus else "cpu"
    reasons = []
    visible = tuple(machine.cuda_id(g) for g in gpus)
    if device == "cuda":
        named = ", ".join(v for v in visible if not v.isdigit())
        reasons.append(
            f"device: GPU {', '.join(str(g.index) for g in gpus)} ({gpus[0].name})"
            + (f", as CUDA_VISIBLE_DEVICES names them: {named}" if named else "")
        )
    else:
        why = "train_device=cpu" if p.train_device == "cpu" else "no GPU visible"
        reasons.append(f"device: CPU ({why})")
    asked = asked_processes(p)
    reasons.append(
        f"processes: {count} on this machine"
        + (" (set)" if asked is not None else " (one per GPU)" if device == "cuda" else " (auto: one on the CPU)")
        + (f", {p.num_machines} machines, world size {count * p.num_machines}" if p.num_machines > 1 else "")
    )
    precision = precision_for(p, gpus)
    if p.precision != "auto":
        reasons.append(f"precision: {precision} (set)")
    elif not gpus:
        reasons.append("precision: fp32 (auto: the CPU trains in fp32)")
    else:
        reasons.append(f"precision: {precision} (auto: {'Ampere or newer' if precision == 'bf16' else 'no bf16 here'})")
    reasons.append(f"strategy: {p.distributed_strategy}")
    weights = speed.weights_precision(p.training_mode, p.distributed_strategy, precision)
    if weights != precision:
        reasons.append(
            f"weights: fp32, computed in {precision} (full fine-tuning updates an fp32 copy: {precision} weights "
            "would lose small updates)"
        )
    config = model_config(p.model_name) if p.model_name else None
    disk = disk_estimate(p, config, model_parameters(p.model_name, config), precision)
    reasons.append(disk.reason() if disk else "disk: the model's size is unknown here: at least 1 GiB free is asked")
    chosen = speed.choose(
        p,
        device=device,
        gpus=gpus,
        precision=precision,
        world_size=count * p.num_machines,
        cpu_count=machine.cpu_count,
        processes_here=count,
        model_config=config,
        ram_bytes=machine.ram_bytes,
    )
    return Plan(
        device=device,
        gpu_ids=tuple(g.index for g in gpus),
        num_processes=count,
        num_machines=p.num_machines,
        machine_rank=p.machine_rank,
        main_process_ip=p.main_process_ip,
        main_process_port=p.main_process_port,
        precision=precision,
        strategy=p.distributed_strategy,
        speed=chosen,
        weights_precision=weights,
        merge_adapter=p.fuse_model and p.training_mode != "full",
        merged_precision=speed.merge_precision(p.training_mode, precision),
        reasons=tuple(reasons),
        visible_devices=visible if device == "cuda" else (),
        disk_gib=round(disk.peak / GIB, 2) if disk else None,
        gpus=tuple(gpus),
        disk=disk,
    )


# --- disk: what the run writes, from the model's size ---------------------------------------------------------

# Saved beside the weights each time: the tokenizer (a large one is about 35 MB), trainer and scheduler state,
# one RNG state per rank, the run's parameters.
SMALL_FILES = 64 * 2**20


def _safetensors_parameters(folder: str) -> int | None:
    """The exact parameter count of a model's weights, from their safetensors headers (a few kB each, the
    weights never read); None unless every file the index lists (or model.safetensors) is here."""
    index = read_json(os.path.join(folder, "model.safetensors.index.json")).get("weight_map")
    files = sorted(set(index.values())) if isinstance(index, dict) else ["model.safetensors"]
    total = 0
    for name in files:
        try:
            with open(os.path.join(folder, name), "rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(size)) if 0 < size < 2**28 else None
        except (OSError, ValueError):
            return None
        if not isinstance(header, dict):
            return None
        total += sum(math.prod(t["shape"]) for key, t in header.items() if key != "__metadata__")
    return total or None


def model_parameters(name: str, config: Mapping[str, Any] | None) -> int | None:
    """The model's parameter count: exact from its safetensors files when they are here (and not quantized,
    whose packed tensors undercount), else from config.json's sizes; None when neither is known."""
    folder = model_folder(name) if name else None
    if folder and not (config or {}).get("quantization_config"):
        exact = _safetensors_parameters(folder)
        if exact:
            return exact
    return speed.parameter_count(dict(config)) if config else None


@dataclass(frozen=True)
class DiskEstimate:
    """Bytes a run writes: its outputs (the adapter or the full weights), the merged model under fuse_model,
    and each checkpoint (the trained weights, AdamW's state and small files); `checkpoints` exist at once at
    most: save_total_limit kept and the one being saved."""

    outputs: int
    merged: int
    checkpoint: int
    checkpoints: int

    @property
    def peak(self) -> int:
        return self.outputs + self.merged + self.checkpoints * self.checkpoint

    def reason(self) -> str:
        merged = f", merged model {self.merged / GIB:.2f} GiB" if self.merged else ""
        return (
            f"disk: about {self.peak / GIB:.2f} GiB written at most: outputs {self.outputs / GIB:.2f} GiB{merged}, "
            f"{self.checkpoints} checkpoints of {self.checkpoint / GIB:.2f} GiB (save_total_limit and the one saving)"
        )


def disk_estimate(
    p: Params, config: Mapping[str, Any] | None, parameters: int | None, precision: str
) -> DiskEstimate | None:
    """What the run writes, from the model's parameter count (None: unknown, so no estimate). An upper bound:
    - full: the model saved in the training precision (2 bytes in bf16/fp16, 4 in fp32; FSDP saves the fp32 weights
      it trains); its checkpoints hold the weights as they are trained (fp32 under ddp and FSDP, 16-bit under
      DeepSpeed) and AdamW's two moments in their dtype, or DeepSpeed's fp32 master weights and moments (12 bytes);
    - lora/qlora: the adapter in fp32 (PEFT keeps adapter weights in fp32 over a 16-bit base, and saves them so),
      and AdamW's two moments beside it in each checkpoint;
    - fuse_model: the base with the adapter merged, in the precision the merge loads it in."""
    if not parameters:
        return None
    width = 4 if precision == "fp32" else 2
    strategy = p.distributed_strategy
    if p.training_mode == "full":
        weights = parameters * (4 if strategy == "fsdp" else width)
        deepspeed = strategy.startswith("deepspeed")
        trained = parameters * (width if deepspeed else 4)
        checkpoint = trained + parameters * (12 if deepspeed else 8)
        merged = 0
    else:
        adapter = speed.lora_parameter_count(config, p.lora_r, p.lora_target_modules) if config else None
        weights = (adapter or parameters // 20) * 4  # an adapter of an unknown shape: a generous 5% of the model
        checkpoint = weights * 3
        merged_width = 4 if speed.merge_precision(p.training_mode, precision) == "fp32" else 2
        merged = parameters * merged_width if p.fuse_model else 0
    return DiskEstimate(
        outputs=weights + SMALL_FILES,
        merged=merged,
        checkpoint=checkpoint + SMALL_FILES,
        checkpoints=p.save_total_limit + 1,
    )
