"""Cross-parameter rules and the run plan.

Each rule is a few lines: it looks at the parameters (and, for machine rules, at this machine) and
yields `error(...)` or `warning(...)`. Configuration rules need no hardware, so a config can be checked
on a laptop; machine rules are kept apart. All findings are reported at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidConfig, Problem, problem
from .machine import Machine, free_disk_gib, has_package

Finding = tuple[str, Problem]
Rule = Callable[..., Iterator[Finding]]
CONFIG_RULES: list[Rule] = []
MACHINE_RULES: list[Rule] = []


def error(parameter: str, what: str, fix: str = "") -> Finding:
    return "error", problem(parameter, what, fix)


def warning(parameter: str, what: str, fix: str = "") -> Finding:
    return "warning", problem(parameter, what, fix)


def config_rule(fn: Rule) -> Rule:
    CONFIG_RULES.append(fn)
    return fn


def machine_rule(fn: Rule) -> Rule:
    MACHINE_RULES.append(fn)
    return fn


# --- required inputs ---------------------------------------------------------------------------


@config_rule
def model_and_dataset_given(p):
    if not p["model_name"]:
        yield error("model_name", "no model given", "Set model_name to a local model folder or a Hub id")
    if not p["dataset_name"]:
        yield error("dataset_name", "no dataset given", "Set dataset_name to a data file, folder or dataset id")


@config_rule
def adaptor_name_is_a_name(p):
    name = p["adaptor_name"] or ""
    if "/" in name or "\\" in name or name.startswith(".") or name in ("", ".", ".."):
        yield error(
            "adaptor_name",
            f"{name!r} is not a plain name",
            "Use letters, digits, '.', '_' and '-', not starting with '.'; the output folder is chosen for you",
        )


# --- training length and optimisation ----------------------------------------------------------


@config_rule
def max_steps_not_zero(p):
    if p["max_steps"] == 0:
        yield error("max_steps", "0 would train nothing", "Use -1 to train by epochs, or a positive step count")


@config_rule
def learning_rate_sane(p):
    if p["learning_rate"] > 1e-2:
        yield warning(
            "learning_rate",
            f"{p['learning_rate']:g} is very high for fine-tuning and usually diverges",
            "Use 1e-4 to 3e-4 for LoRA, 1e-5 to 5e-5 for full fine-tuning",
        )


# --- adapters ------------------------------------------------------------------------------------


@config_rule
def lora_settings_ignored_in_full_mode(p):
    if p["training_mode"] != "full":
        return
    from .params import form_schema

    changed = [k for k in ("lora_r", "lora_alpha", "lora_dropout") if p[k] != form_schema()[k]["default"]]
    if changed:
        yield warning(
            ", ".join(changed),
            "LoRA settings are ignored with training_mode=full",
            "Use training_mode=lora to apply them",
        )


# --- templates -----------------------------------------------------------------------------------


@config_rule
def chat_template_wins_over_formatting_template(p):
    if p["apply_chat_template"] and p["formatting_template"].strip():
        yield warning(
            "formatting_template",
            "ignored because apply_chat_template is on (the chat template wins)",
            "Turn apply_chat_template off to use the formatting template",
        )


# --- distribution --------------------------------------------------------------------------------


@config_rule
def strategy_available(p):
    if p["distributed_strategy"] != "ddp":
        yield error(
            "distributed_strategy",
            f"{p['distributed_strategy']} is not available in this version of the plugin",
            "Use ddp (LoRA adapters fit it well); qlora shrinks the base model if memory is short",
        )


@config_rule
def fuse_model_available(p):
    if p["fuse_model"]:
        yield error("fuse_model", "merging is not available in this version", "Set fuse_model=false")


@config_rule
def wandb_key(p):
    if p["log_to_wandb"] and not os.environ.get("WANDB_API_KEY"):
        yield warning("log_to_wandb", "WANDB_API_KEY is not set: Weights & Biases runs offline", "Set the key")


@config_rule
def multi_node_needs_address(p):
    if p["num_machines"] > 1 and not p["main_process_ip"]:
        yield error("main_process_ip", "a multi-node run needs the main node's address", "Set main_process_ip")
    if p["num_machines"] > 1 and not p["main_process_port"]:
        yield error("main_process_port", "a multi-node run needs a fixed port", "Set the same port on every node")
    if p["machine_rank"] >= p["num_machines"]:
        yield error(
            "machine_rank",
            f"{p['machine_rank']} is not below num_machines={p['num_machines']}",
            "Use 0 .. num_machines-1",
        )


@config_rule
def num_processes_is_auto_or_count(p):
    value = str(p["num_processes"]).strip().lower()
    if value != "auto" and not (value.isdigit() and int(value) >= 1):
        yield error("num_processes", f"{p['num_processes']!r} is neither 'auto' nor a count", "Use auto or 1, 2, ...")


@config_rule
def gpu_ids_is_auto_or_list(p):
    value = str(p["gpu_ids"]).replace(" ", "")
    if value.lower() != "auto" and not all(part.isdigit() for part in value.split(",")):
        yield error("gpu_ids", f"{p['gpu_ids']!r} is not a list of GPU ids", "Use auto, or ids such as 0,1")


# --- this machine ----------------------------------------------------------------------------------


def selected_gpu_ids(p, machine: Machine) -> list[int]:
    usable = [g.index for g in machine.usable_gpus]
    value = str(p["gpu_ids"]).replace(" ", "").lower()
    if value == "auto":
        return usable
    return [int(part) for part in value.split(",") if part.isdigit()]


def planned_gpus(p, machine: Machine) -> list:
    """The GPUs the run will use: the selected ones, the first num_processes of them."""
    selected = selected_gpu_ids(p, machine)
    value = str(p["num_processes"]).strip()
    if value.isdigit():
        selected = selected[: int(value)]
    by_index = {g.index: g for g in machine.usable_gpus}
    return [by_index[i] for i in selected if i in by_index]


@machine_rule
def gpus_exist(p, machine: Machine):
    if p["train_device"] == "cpu":
        return
    usable = [g.index for g in machine.usable_gpus]
    if p["train_device"] == "cuda" and not usable:
        yield error("train_device", "cuda was asked for but no GPU is visible", "Use train_device=auto or cpu")
    missing = [i for i in selected_gpu_ids(p, machine) if i not in usable]
    if missing and str(p["gpu_ids"]).lower() != "auto":
        where = " within CUDA_VISIBLE_DEVICES" if machine.visible is not None else ""
        yield error(
            "gpu_ids",
            f"GPU {', '.join(map(str, missing))} does not exist{where} (visible: {usable or 'none'})",
            "Pick ids from the visible GPUs, or auto",
        )


@machine_rule
def processes_fit_gpus(p, machine: Machine):
    value = str(p["num_processes"]).strip()
    if not value.isdigit():
        return
    gpus = selected_gpu_ids(p, machine) if p["train_device"] != "cpu" else []
    if gpus and int(value) > len(gpus):
        yield error(
            "num_processes",
            f"{value} processes but only {len(gpus)} GPU(s) selected",
            f"Use num_processes={len(gpus)} or auto (one process per GPU)",
        )


@machine_rule
def cpu_only_note(p, machine: Machine):
    if p["train_device"] == "auto" and not machine.usable_gpus:
        yield warning("train_device", "no GPU found: training on the CPU (slow beyond small models)", "")


@machine_rule
def precision_supported(p, machine: Machine):
    gpus = [] if p["train_device"] == "cpu" else planned_gpus(p, machine)
    if p["precision"] == "bf16" and gpus and not all(g.supports_bf16 for g in gpus):
        yield error("precision", "bf16 needs an Ampere or newer GPU", "Use precision=auto (fp16 there) or fp16")
    on_cpu = p["train_device"] == "cpu" or not machine.usable_gpus
    if p["precision"] == "fp16" and on_cpu:
        yield error("precision", "fp16 training needs a GPU", "Use precision=auto or fp32 on the CPU")


@machine_rule
def qlora_needs_cuda_and_bitsandbytes(p, machine: Machine):
    if p["training_mode"] != "qlora":
        return
    if p["train_device"] == "cpu" or not machine.usable_gpus:
        yield error("training_mode", "qlora needs a CUDA GPU", "Use training_mode=lora on this machine")
    elif not has_package("bitsandbytes"):
        yield error("training_mode", "qlora needs bitsandbytes", "Reinstall the plugin with WITH_BITSANDBYTES=1")


@machine_rule
def strategy_packages_installed(p, machine: Machine):
    strategy = p["distributed_strategy"]
    if strategy.startswith("deepspeed") and not has_package("deepspeed"):
        yield error(
            "distributed_strategy", f"{strategy} needs deepspeed", "Reinstall with WITH_DEEPSPEED=1, or use ddp"
        )


@machine_rule
def enough_disk(p, machine: Machine):
    free = free_disk_gib(p["output_dir"] or ".")
    if free < 1:
        yield error("output_dir", f"only {free:.2f} GiB free there", "Free some disk space or pick another output_dir")


# --- the plan -------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What the run will do, derived from the parameters and this machine."""

    device: str
    gpu_ids: list[int]
    num_processes: int
    precision: str
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "gpu_ids": self.gpu_ids,
            "num_processes": self.num_processes,
            "precision": self.precision,
        }


def make_plan(p: dict[str, Any], machine: Machine) -> Plan:
    gpus = [] if p["train_device"] == "cpu" else planned_gpus(p, machine)
    value = str(p["num_processes"]).strip().lower()
    count = int(value) if value.isdigit() else max(1, len(gpus))
    precision = p["precision"]
    if precision == "auto":
        precision = "fp32" if not gpus else "bf16" if all(g.supports_bf16 for g in gpus) else "fp16"
    return Plan(
        device="cuda" if gpus else "cpu", gpu_ids=[g.index for g in gpus], num_processes=count, precision=precision
    )


def check(p: dict[str, Any], machine: Machine | None, warnings: list[Problem]) -> Plan | None:
    """Run every configuration rule (and the machine rules when a machine is given); raise on errors."""
    errors: list[Problem] = []
    findings = [f for rule in CONFIG_RULES for f in rule(p)]
    if machine is not None:
        findings += [f for rule in MACHINE_RULES for f in rule(p, machine)]
    for severity, found in findings:
        (errors if severity == "error" else warnings).append(found)
    if errors:
        raise InvalidConfig(errors, warnings)
    if machine is None:
        return None
    return make_plan(p, machine)


def rank_environment(plan: Plan) -> dict[str, str]:
    """Environment for the launcher: GPUs are selected here, never inside the ranks after torch starts.

    Ids are as nvidia-smi shows them, which is what CUDA_VISIBLE_DEVICES takes; an empty value hides every GPU.
    """
    visible = ",".join(str(i) for i in plan.gpu_ids) if plan.device == "cuda" else ""
    # CUDA numbers cards fastest first unless told otherwise; nvidia-smi numbers them by bus.
    return {"CUDA_VISIBLE_DEVICES": visible, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
