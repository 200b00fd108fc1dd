"""The run plan: every decision derived from the parameters and this machine, each with its reason.

The parameters stay what the user asked (`auto` stays `auto`); what `auto` became on this machine lives
here: the device and GPUs, processes per machine, machines and world size, precision, the strategy, the
speed settings (attention, packing, gradient checkpointing, Liger, TF32, dataloader workers) and, once the
data's format is known, whether only completions are trained. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from . import speed
from .machine import Gpu, Machine
from .sources import CHAT_FORMATS, model_config
from .speed import Speed


def selected_gpu_ids(p: Mapping[str, Any], machine: Machine) -> list[int]:
    """gpu_ids as a list: the usable GPUs for auto, else the ids given (unparsable parts left out)."""
    value = str(p["gpu_ids"]).replace(" ", "").lower()
    if value == "auto":
        return [g.index for g in machine.usable_gpus]
    return [int(part) for part in value.split(",") if part.isdigit()]


def asked_processes(p: Mapping[str, Any]) -> int | None:
    """num_processes as a count; None for auto (or for a value its own rule refuses)."""
    value = str(p["num_processes"]).strip()
    return int(value) if value.isdigit() else None


def planned_gpus(p: Mapping[str, Any], machine: Machine) -> list[Gpu]:
    """The GPUs the run will use: none on train_device=cpu, else the selected ones, the first num_processes."""
    if p["train_device"] == "cpu":
        return []
    selected = selected_gpu_ids(p, machine)
    count = asked_processes(p)
    if count is not None:
        selected = selected[:count]
    by_index = {g.index: g for g in machine.usable_gpus}
    return [by_index[i] for i in selected if i in by_index]


def precision_for(p: Mapping[str, Any], gpus: list[Gpu]) -> str:
    """precision, with auto resolved: fp32 on the CPU, bf16 on Ampere or newer, else fp16."""
    if p["precision"] != "auto":
        return p["precision"]
    return "fp32" if not gpus else "bf16" if all(g.supports_bf16 for g in gpus) else "fp16"


def processes_here(p: Mapping[str, Any], machine: Machine) -> int:
    """Processes on this machine: num_processes, or one per planned GPU (one on the CPU)."""
    count = asked_processes(p)
    return count if count is not None else max(1, len(planned_gpus(p, machine)))


def world_size(p: Mapping[str, Any], machine: Machine) -> int:
    return processes_here(p, machine) * p["num_machines"]


def planned_steps(p: Mapping[str, Any], world: int, rows: int) -> int:
    """Optimizer steps the run will take on `rows` training rows."""
    if p["max_steps"] > 0:
        return p["max_steps"]
    batches = -(-rows // (p["batch_size"] * world))
    return max(1, int(-(-batches // p["gradient_accumulation_steps"]) * p["num_train_epochs"]))


@dataclass(frozen=True)
class Plan:
    """What the run will do. Built once, after validation, and never changed (a copy gains the loss mode)."""

    device: str
    gpu_ids: tuple[int, ...]
    num_processes: int  # on this machine
    num_machines: int
    machine_rank: int
    main_process_ip: str
    main_process_port: int  # 0: a free one is picked at launch
    precision: str
    strategy: str
    speed: Speed = field(default_factory=Speed)
    # Whether the loss is taken on completions / assistant turns only; None until the data's format is known.
    completion_only: bool | None = None
    # fuse_model with an adapter to merge (training_mode=full has none).
    merge_adapter: bool = False
    reasons: tuple[str, ...] = ()

    @property
    def world_size(self) -> int:
        return self.num_processes * self.num_machines

    @property
    def gradient_checkpointing(self) -> bool:
        return self.speed.gradient_checkpointing

    def as_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["gpu_ids"] = list(self.gpu_ids)
        values["reasons"] = list(self.all_reasons())
        values["world_size"] = self.world_size
        return values

    def all_reasons(self) -> list[str]:
        return [*self.reasons, *self.speed.reasons]

    def with_loss_mode(self, p: Mapping[str, Any], fmt: str) -> Plan:
        """This plan once the data's format is known: whether only completions (assistant turns) are trained."""
        on, why = loss_mode(p, fmt)
        return replace(self, completion_only=on, reasons=(*self.reasons, why))


def loss_mode(p: Mapping[str, Any], fmt: str) -> tuple[bool, str]:
    """completion_only_loss (and assistant_only_loss) resolved for a data format, with the reason.
    The combinations that cannot work are validation's data rules; here they fall back to the whole text."""
    mode = p["completion_only_loss"]
    if fmt == "text":
        return False, "loss: on the whole text (plain text rows have no completion to split off)"
    if mode == "false" and not p["assistant_only_loss"]:
        return False, "loss: on the whole text (completion_only_loss=false)"
    part = "assistant turns" if fmt in CHAT_FORMATS else "completions"
    how = "set" if mode == "true" or p["assistant_only_loss"] else "auto"
    return True, f"loss: on {part} only ({how}, {fmt} rows)"


def build(p: Mapping[str, Any], machine: Machine) -> Plan:
    """The plan for parameters that passed validation on this machine."""
    gpus = planned_gpus(p, machine)
    count = processes_here(p, machine)
    device = "cuda" if gpus else "cpu"
    reasons = []
    if device == "cuda":
        reasons.append(f"device: GPU {', '.join(str(g.index) for g in gpus)} ({gpus[0].name})")
    else:
        why = "train_device=cpu" if p["train_device"] == "cpu" else "no GPU visible"
        reasons.append(f"device: CPU ({why})")
    asked = asked_processes(p)
    reasons.append(
        f"processes: {count} on this machine"
        + (" (set)" if asked is not None else " (one per GPU)" if device == "cuda" else " (auto: one on the CPU)")
        + (f", {p['num_machines']} machines, world size {count * p['num_machines']}" if p["num_machines"] > 1 else "")
    )
    precision = precision_for(p, gpus)
    if p["precision"] != "auto":
        reasons.append(f"precision: {precision} (set)")
    elif not gpus:
        reasons.append("precision: fp32 (auto: the CPU trains in fp32)")
    else:
        reasons.append(f"precision: {precision} (auto: {'Ampere or newer' if precision == 'bf16' else 'no bf16 here'})")
    reasons.append(f"strategy: {p['distributed_strategy']}")
    chosen = speed.choose(
        p,
        device=device,
        gpus=gpus,
        precision=precision,
        world_size=count * p["num_machines"],
        cpu_count=machine.cpu_count,
        processes_here=count,
        model_config=model_config(p["model_name"]) if p["model_name"] else None,
        ram_bytes=machine.ram_bytes,
    )
    return Plan(
        device=device,
        gpu_ids=tuple(g.index for g in gpus),
        num_processes=count,
        num_machines=p["num_machines"],
        machine_rank=p["machine_rank"],
        main_process_ip=p["main_process_ip"],
        main_process_port=p["main_process_port"],
        precision=precision,
        strategy=p["distributed_strategy"],
        speed=chosen,
        merge_adapter=p["fuse_model"] and p["training_mode"] != "full",
        reasons=tuple(reasons),
    )
