"""Cross-parameter rules and the run plan.

Each rule is a few lines: it looks at the parameters (machine rules also at this machine, output rules
at the output folders, data rules at the prepared dataset's statistics) and yields `error(...)` or
`warning(...)`. Configuration rules need no hardware, so a config can be checked on a laptop; machine
rules are kept apart. All findings of a phase are reported at once. A rule's docstring is its line in
info.md's rules table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from . import speed
from .errors import InvalidConfig, Problem, problem
from .machine import Machine, free_disk_gib, has_package
from .speed import Speed
from .templates import chat_syntax_problem, syntax_problem

Finding = tuple[str, Problem]
Rule = Callable[..., Iterator[Finding]]
CONFIG_RULES: list[Rule] = []
MACHINE_RULES: list[Rule] = []
OUTPUT_RULES: list[Rule] = []
DATA_RULES: list[Rule] = []


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


def output_rule(fn: Rule) -> Rule:
    OUTPUT_RULES.append(fn)
    return fn


def data_rule(fn: Rule) -> Rule:
    DATA_RULES.append(fn)
    return fn


def all_rules() -> list[Rule]:
    return [*CONFIG_RULES, *MACHINE_RULES, *OUTPUT_RULES, *DATA_RULES]


# --- required inputs ---------------------------------------------------------------------------


@config_rule
def model_and_dataset_given(p):
    """A model and a dataset are given."""
    if not p["model_name"]:
        yield error("model_name", "no model given", "Set model_name to a local model folder or a Hub id")
    if not p["dataset_name"]:
        yield error("dataset_name", "no dataset given", "Set dataset_name to a data file, folder or dataset id")


@config_rule
def adaptor_name_is_a_name(p):
    """adaptor_name is a plain name, never a path."""
    name = p["adaptor_name"] or ""
    if "/" in name or "\\" in name or name.startswith(".") or name in ("", ".", ".."):
        yield error(
            "adaptor_name",
            f"{name!r} is not a plain name",
            "Use letters, digits, '.', '_' and '-', not starting with '.'; the output folder is chosen for you",
        )


# --- the model ----------------------------------------------------------------------------------


@config_rule
def model_is_reachable(p):
    """model_name is a local model folder, or a Hub id that is cached or reachable (HF_HUB_OFFLINE=1)."""
    name = p["model_name"]
    if not name:
        return
    local = _looks_local(name)
    if local and not os.path.isdir(os.path.expanduser(name)):
        yield error("model_name", f"{name} is not a folder", "Give the model's folder or a Hub id")
    elif not local and model_config(name) is None and os.environ.get("HF_HUB_OFFLINE") == "1":
        yield error("model_name", f"{name} is not in the local Hub cache and HF_HUB_OFFLINE=1", "Download it first")


@config_rule
def model_is_not_an_adapter(p):
    """model_name is a base model, not a LoRA adapter folder (TRL refuses a PeftModel plus a LoRA config)."""
    name = os.path.expanduser(p["model_name"] or "")
    if name and os.path.isfile(os.path.join(name, "adapter_config.json")):
        base = _read_json(os.path.join(name, "adapter_config.json")).get("base_model_name_or_path", "its base model")
        yield error(
            "model_name", f"{name} is a LoRA adapter, not a model", f"Train on {base} (or fuse the adapter first)"
        )


@config_rule
def sequence_fits_model(p):
    """maximum_sequence_length is within the model's max_position_embeddings (read from config.json)."""
    config = model_config(p["model_name"]) if p["model_name"] else None
    limit = next((config[k] for k in ("max_position_embeddings", "n_positions") if config and config.get(k)), None)
    if isinstance(limit, int) and p["maximum_sequence_length"] > limit:
        yield error(
            "maximum_sequence_length",
            f"{p['maximum_sequence_length']} is above the model's context length {limit}",
            f"Use at most {limit}",
        )


@config_rule
def lora_not_on_lm_head(p):
    """LoRA target modules do not include lm_head (TRL and PEFT cannot train an adapter there)."""
    modules = {m.strip() for m in p["lora_target_modules"].split(",")}
    if p["training_mode"] != "full" and "lm_head" in modules:
        yield error("lora_target_modules", "lm_head cannot carry a LoRA adapter", "Remove lm_head from the list")


# --- training length and optimisation ----------------------------------------------------------


@config_rule
def max_steps_not_zero(p):
    """max_steps is not 0 (which would train nothing)."""
    if p["max_steps"] == 0:
        yield error("max_steps", "0 would train nothing", "Use -1 to train by epochs, or a positive step count")


@config_rule
def save_steps_within_max_steps(p):
    """save_steps beyond max_steps leaves no checkpoint to resume from (warning)."""
    if p["max_steps"] > 0 and p["save_steps"] > p["max_steps"]:
        yield warning(
            "save_steps",
            f"{p['save_steps']} is beyond max_steps={p['max_steps']}: a stopped run has no checkpoint to resume from",
            f"Use save_steps <= {p['max_steps']}",
        )


@config_rule
def learning_rate_sane(p):
    """A learning rate above 1e-2 is flagged (warning)."""
    if p["learning_rate"] > 1e-2:
        yield warning(
            "learning_rate",
            f"{p['learning_rate']:g} is very high for fine-tuning and usually diverges",
            "Use 1e-4 to 3e-4 for LoRA, 1e-5 to 5e-5 for full fine-tuning",
        )


# --- adapters ------------------------------------------------------------------------------------


@config_rule
def lora_settings_ignored_in_full_mode(p):
    """LoRA settings changed with training_mode=full are flagged as ignored (warning)."""
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
    """A formatting template sent with apply_chat_template is ignored: the chat template wins (warning)."""
    if p["apply_chat_template"] and p["formatting_template"].strip():
        yield warning(
            "formatting_template",
            "ignored because apply_chat_template is on (the chat template wins)",
            "Turn apply_chat_template off to use the formatting template",
        )


# --- distribution --------------------------------------------------------------------------------


@config_rule
def templates_are_valid_jinja(p):
    """formatting_template and formatting_chat_template are valid Jinja (parsed, not rendered)."""
    for parameter, check in (
        ("formatting_template", syntax_problem),
        ("formatting_chat_template", chat_syntax_problem),
    ):
        found = check(p[parameter]) if p[parameter].strip() else None
        if found:
            yield error(parameter, found, "Fix the template")


@config_rule
def qlora_with_ddp_only(p):
    """qlora runs with ddp only (sharding a 4-bit model is not supported here)."""
    if p["training_mode"] == "qlora" and p["distributed_strategy"] != "ddp":
        yield error(
            "distributed_strategy",
            f"{p['distributed_strategy']} with training_mode=qlora is not supported",
            "Use ddp: a 4-bit base model already fits where sharding would be needed",
        )


@config_rule
def fuse_model_explained(p):
    """fuse_model with qlora merges into a 16-bit copy of the base; with full there is nothing to merge (warnings)."""
    if p["fuse_model"] and p["training_mode"] == "qlora":
        yield warning(
            "fuse_model",
            "the adapter is merged into a 16-bit copy of the base model loaded on the CPU (4-bit weights cannot "
            "hold merged values); it needs about 2 bytes of RAM per parameter",
            "",
        )
    if p["fuse_model"] and p["training_mode"] == "full":
        yield warning("fuse_model", "training_mode=full trains the whole model: there is no adapter to merge", "")


@config_rule
def wandb_key(p):
    """log_to_wandb without WANDB_API_KEY runs Weights & Biases offline (warning)."""
    if p["log_to_wandb"] and not os.environ.get("WANDB_API_KEY"):
        yield warning("log_to_wandb", "WANDB_API_KEY is not set: Weights & Biases runs offline", "Set the key")


@config_rule
def multi_node_needs_address(p):
    """A multi-node run has the main node's address and a fixed port; machine_rank < num_machines."""
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
    """num_processes is auto or a positive count."""
    value = str(p["num_processes"]).strip().lower()
    if value != "auto" and not (value.isdigit() and int(value) >= 1):
        yield error("num_processes", f"{p['num_processes']!r} is neither 'auto' nor a count", "Use auto or 1, 2, ...")


@config_rule
def gpu_ids_is_auto_or_list(p):
    """gpu_ids is auto or a comma list of ids."""
    value = str(p["gpu_ids"]).replace(" ", "")
    if value.lower() != "auto" and not all(part.isdigit() for part in value.split(",")):
        yield error("gpu_ids", f"{p['gpu_ids']!r} is not a list of GPU ids", "Use auto, or ids such as 0,1")


# --- this machine ----------------------------------------------------------------------------------


def _looks_local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or os.path.exists(os.path.expanduser(name)) or name.count("/") > 1


def _read_json(path: str) -> dict[str, Any]:
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
        return _read_json(path) if os.path.isfile(path) else None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # a name that is no valid repo id
        return None
    return _read_json(cached) if isinstance(cached, str) else None


def selected_gpu_ids(p, machine: Machine) -> list[int]:
    usable = [g.index for g in machine.usable_gpus]
    value = str(p["gpu_ids"]).replace(" ", "").lower()
    if value == "auto":
        return usable
    return [int(part) for part in value.split(",") if part.isdigit()]


def asked_processes(p) -> int | None:
    """num_processes as a count; None for auto (or for a value its own rule refuses)."""
    value = str(p["num_processes"]).strip()
    return int(value) if value.isdigit() else None


def planned_gpus(p, machine: Machine) -> list:
    """The GPUs the run will use: the selected ones, the first num_processes of them."""
    selected = selected_gpu_ids(p, machine)
    count = asked_processes(p)
    if count is not None:
        selected = selected[:count]
    by_index = {g.index: g for g in machine.usable_gpus}
    return [by_index[i] for i in selected if i in by_index]


@machine_rule
def gpus_exist(p, machine: Machine):
    """Requested GPUs exist (within CUDA_VISIBLE_DEVICES when set); train_device=cuda has a GPU."""
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
    """num_processes is not above the number of selected GPUs."""
    count = asked_processes(p)
    if count is None:
        return
    gpus = selected_gpu_ids(p, machine) if p["train_device"] != "cpu" else []
    if gpus and count > len(gpus):
        yield error(
            "num_processes",
            f"{count} processes but only {len(gpus)} GPU(s) selected",
            f"Use num_processes={len(gpus)} or auto (one process per GPU)",
        )


@machine_rule
def cpu_only_note(p, machine: Machine):
    """No GPU: the run trains on the CPU (note)."""
    if p["train_device"] == "auto" and not machine.usable_gpus:
        yield warning("train_device", "no GPU found: training on the CPU (slow beyond small models)", "")


@machine_rule
def precision_supported(p, machine: Machine):
    """bf16 only on Ampere or newer GPUs; fp16 only on a GPU."""
    gpus = [] if p["train_device"] == "cpu" else planned_gpus(p, machine)
    if p["precision"] == "bf16" and gpus and not all(g.supports_bf16 for g in gpus):
        yield error("precision", "bf16 needs an Ampere or newer GPU", "Use precision=auto (fp16 there) or fp16")
    on_cpu = p["train_device"] == "cpu" or not machine.usable_gpus
    if p["precision"] == "fp16" and on_cpu:
        yield error("precision", "fp16 training needs a GPU", "Use precision=auto or fp32 on the CPU")


@machine_rule
def qlora_needs_cuda_and_bitsandbytes(p, machine: Machine):
    """qlora needs a CUDA GPU and bitsandbytes."""
    if p["training_mode"] != "qlora":
        return
    if p["train_device"] == "cpu" or not machine.usable_gpus:
        yield error("training_mode", "qlora needs a CUDA GPU", "Use training_mode=lora on this machine")
    elif not has_package("bitsandbytes"):
        yield error("training_mode", "qlora needs bitsandbytes", "Reinstall the plugin with WITH_BITSANDBYTES=1")


@machine_rule
def strategy_packages_installed(p, machine: Machine):
    """deepspeed strategies need a CUDA GPU and the deepspeed package."""
    strategy = p["distributed_strategy"]
    if not strategy.startswith("deepspeed"):
        return
    if p["train_device"] == "cpu" or not machine.usable_gpus:
        yield error("distributed_strategy", f"{strategy} needs CUDA GPUs", "Use ddp or fsdp on this machine")
    elif not has_package("deepspeed"):
        yield error(
            "distributed_strategy", f"{strategy} needs deepspeed", "Reinstall with WITH_DEEPSPEED=1, or use ddp"
        )


@machine_rule
def strategy_needs_several_processes(p, machine: Machine):
    """fsdp/deepspeed with a single process shard nothing (warning)."""
    if p["distributed_strategy"] != "ddp" and make_plan(p, machine).num_processes * p["num_machines"] == 1:
        yield warning(
            "distributed_strategy",
            f"{p['distributed_strategy']} with one process shards nothing",
            "Use ddp, or select more GPUs",
        )


@machine_rule
def packing_without_flash_attention(p, machine: Machine):
    """packing=true without flash-attention, on a GPU or above 1024 tokens per batch, is likely slower (warning)."""
    if p["packing"] != "true":
        return
    plan = make_plan(p, machine)
    gpus = planned_gpus(p, machine) if plan.device == "cuda" else []
    if not speed.flash_attention_usable(plan.device, gpus, plan.precision) and speed.masked_packing_is_slow(
        p, plan.device
    ):
        yield warning(
            "packing",
            "without flash-attention, packed rows are kept apart by a mask over the whole batch "
            f"({p['batch_size'] * p['maximum_sequence_length']} tokens): correct, but likely slower than padding",
            "Install flash-attn on an Ampere or newer GPU, or use packing=auto",
        )


@machine_rule
def enough_disk(p, machine: Machine):
    """At least 1 GiB is free where outputs go."""
    free = free_disk_gib(p["output_dir"] or ".")
    if free < 1:
        yield error("output_dir", f"only {free:.2f} GiB free there", "Free some disk space or pick another output_dir")


# --- outputs ---------------------------------------------------------------------------------------


def _writable(path: str) -> bool:
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return os.access(probe, os.W_OK)


@output_rule
def finished_adapter_kept(p, adapter_dir: str, checkpoint_dir: str):
    """A finished adapter of the same name is not replaced unless overwrite_output."""
    from .outputs import is_complete_adapter

    if is_complete_adapter(adapter_dir) and not p["overwrite_output"]:
        yield error(
            "overwrite_output",
            f"{adapter_dir} already holds a finished adapter",
            "Pick another adaptor_name, or set overwrite_output=true to replace it",
        )


@output_rule
def outputs_writable(p, adapter_dir: str, checkpoint_dir: str):
    """The adapter and checkpoint folders can be written."""
    for path in (adapter_dir, checkpoint_dir):
        if not _writable(path):
            name = "adaptor_output_dir" if p["adaptor_output_dir"] else "output_dir"
            yield error(name, f"{path} cannot be written", "Pick a folder you can write to")
            return


# --- the data (after preparation) ------------------------------------------------------------------


def planned_steps(p, plan, rows: int) -> int:
    if p["max_steps"] > 0:
        return p["max_steps"]
    batches = -(-rows // (p["batch_size"] * plan.num_processes * p["num_machines"]))
    return max(1, int(-(-batches // p["gradient_accumulation_steps"]) * p["num_train_epochs"]))


@data_rule
def effective_batch_fits_dataset(p, plan, stats):
    """An effective batch larger than the training rows is flagged (warning)."""
    effective = p["batch_size"] * p["gradient_accumulation_steps"] * plan.num_processes * p["num_machines"]
    if effective > stats["rows_used"]:
        yield warning(
            "gradient_accumulation_steps",
            f"the effective batch ({effective}) is larger than the {stats['rows_used']} training rows",
            "Lower batch_size or gradient_accumulation_steps",
        )


@data_rule
def checkpoint_before_the_end(p, plan, stats):
    """save_steps beyond the planned step count leaves no checkpoint to resume from (warning)."""
    rows = stats["rows_used"]
    if plan.speed.packing and stats.get("total_tokens"):
        rows = -(-stats["total_tokens"] // p["maximum_sequence_length"])  # packs hold about this many rows
    steps = planned_steps(p, plan, rows)
    if p["max_steps"] <= 0 and p["save_steps"] > steps:
        yield warning(
            "save_steps",
            f"{p['save_steps']} is beyond the {steps} planned steps: a stopped run has no checkpoint to resume from",
            f"Use save_steps <= {steps}",
        )


@data_rule
def evaluation_named(p, plan, stats):
    """The dataset's own eval split replaces eval_split's fraction; at eval_split 0 it is unused (warnings)."""
    own, rows = stats.get("own_eval_split"), stats.get("own_eval_rows", 0)
    if own and p["eval_split"] > 0:
        yield warning(
            "eval_split",
            f"{p['eval_split']:g} is not applied: the dataset's own {own!r} split ({rows} rows) is the evaluation set",
            "Set eval_split to 0 to train without evaluation",
        )
    elif own:
        yield warning(
            "eval_split",
            f"the dataset's {own!r} split ({rows} rows) is not used because eval_split is 0",
            "Set eval_split above 0 to evaluate on it",
        )


@data_rule
def rows_with_nothing_to_train(p, plan, stats):
    """Rows without an assistant turn are left out, and rows whose answer is empty are counted (warnings)."""
    if stats.get("no_answer"):
        yield warning(
            "dataset_name",
            f"{stats['no_answer']} of {stats['rows']} rows have no assistant turn and are left out",
            "Check their roles (assistant, or gpt/model/bot)",
        )
    if stats.get("empty_answers"):
        yield warning(
            "dataset_name",
            f"{stats['empty_answers']} of {stats['rows']} rows have an empty answer (or tool calls the chat "
            "template does not render): only the end of that turn is trained",
            "Fill in or remove those rows",
        )


@data_rule
def chat_template_keeps_answers(p, plan, stats):
    """Reasoning a chat template leaves out, and turns it closes without a stop token, are counted (warnings)."""
    if stats.get("reasoning_dropped"):
        yield warning(
            "formatting_chat_template",
            f"the chat template leaves out the reasoning of assistant turns in {stats['reasoning_dropped']} of "
            f"{stats['rows']} rows, so that reasoning is not trained (it is trained as the template renders it)",
            "To train it, give a formatting_chat_template that keeps reasoning in every turn",
        )
    if stats.get("open_turns"):
        yield warning(
            "formatting_chat_template",
            f"the chat template ends assistant turns without a special token in {stats['open_turns']} of "
            f"{stats['rows']} rows, so the model never learns to stop",
            "Give a formatting_chat_template that closes each assistant turn with {{ eos_token }}",
        )


def check_data(p: dict[str, Any], plan, stats: dict[str, Any], warnings: list[Problem]) -> list[Problem]:
    """The data rules; their warnings are added to `warnings` and returned (errors raise)."""
    before = len(warnings)
    _collect([f for rule in DATA_RULES for f in rule(p, plan, stats)], warnings)
    return warnings[before:]


def _collect(findings: list[Finding], warnings: list[Problem]) -> None:
    errors: list[Problem] = []
    for severity, found in findings:
        (errors if severity == "error" else warnings).append(found)
    if errors:
        raise InvalidConfig(errors, warnings)


# --- the plan -------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What the run will do, derived from the parameters and this machine."""

    device: str
    gpu_ids: list[int]
    num_processes: int
    precision: str
    notes: list[str] = field(default_factory=list)
    speed: Speed = field(default_factory=Speed)

    def as_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "gpu_ids": self.gpu_ids,
            "num_processes": self.num_processes,
            "precision": self.precision,
            "speed": self.speed.as_dict(),
        }

    def settled(self, p: dict[str, Any]) -> dict[str, Any]:
        """The parameters with their `auto` speed switches replaced by what this run does."""
        return {**p, "packing": self.speed.packing, "gradient_checkpointing": self.speed.gradient_checkpointing}


def make_plan(p: dict[str, Any], machine: Machine) -> Plan:
    gpus = [] if p["train_device"] == "cpu" else planned_gpus(p, machine)
    count = asked_processes(p)
    if count is None:
        count = max(1, len(gpus))
    precision = p["precision"]
    if precision == "auto":
        precision = "fp32" if not gpus else "bf16" if all(g.supports_bf16 for g in gpus) else "fp16"
    return Plan(
        device="cuda" if gpus else "cpu", gpu_ids=[g.index for g in gpus], num_processes=count, precision=precision
    )


def check(
    p: dict[str, Any],
    machine: Machine | None,
    warnings: list[Problem],
    outputs: tuple[str, str] | None = None,
    prior: list[Problem] | None = None,
) -> Plan | None:
    """Every configuration rule, plus the machine rules (given a machine) and the output rules (given the
    adapter and checkpoint folders); raises InvalidConfig with all errors at once. `prior` holds the
    single-value errors found before: those parameters hold their defaults here, so findings about them
    are left out rather than reported twice or wrongly."""
    findings = [f for rule in CONFIG_RULES for f in rule(p)]
    if machine is not None:
        findings += [f for rule in MACHINE_RULES for f in rule(p, machine)]
    if outputs is not None:
        findings += [f for rule in OUTPUT_RULES for f in rule(p, *outputs)]
    failed = {problem.parameter for problem in prior or []}
    findings = [(severity, found) for severity, found in findings if found.parameter not in failed]
    _collect([("error", problem) for problem in prior or []] + findings, warnings)
    if machine is None:
        return None
    plan = make_plan(p, machine)
    gpus = planned_gpus(p, machine) if plan.device == "cuda" else []
    plan.speed = speed.choose(
        p,
        device=plan.device,
        gpus=gpus,
        precision=plan.precision,
        world_size=plan.num_processes * p["num_machines"],
        cpu_count=machine.cpu_count,
        processes_here=plan.num_processes,
        model_config=model_config(p["model_name"]) if p["model_name"] else None,
        ram_bytes=machine.ram_bytes,
    )
    return plan


def rank_environment(plan: Plan) -> dict[str, str]:
    """Environment for the launcher: GPUs are selected here, never inside the ranks after torch starts.

    Ids are as nvidia-smi shows them, which is what CUDA_VISIBLE_DEVICES takes; an empty value hides every GPU.
    """
    visible = ",".join(str(i) for i in plan.gpu_ids) if plan.device == "cuda" else ""
    # CUDA numbers cards fastest first unless told otherwise; nvidia-smi numbers them by bus.
    return {"CUDA_VISIBLE_DEVICES": visible, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
