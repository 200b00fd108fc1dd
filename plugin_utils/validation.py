"""Every rule the run is checked against, in one place, by phase.

A rule is a small named function over the facts it needs, named by its arguments (FACTS): `p` (the parameters),
`machine` (this machine), `model` (the model's config.json and folder), `out` (the output folders and what
they hold), `plan`, `data` (the dataset's format and columns) and `stats` (the prepared rows' statistics).
The plan is built before any rule runs: a rule checks its decisions (the GPUs, the precision, the world size,
what the run writes to disk) and never makes them again.
It yields `error(...)` or `warning(...)`; its docstring is its line in info.md's rules table.

Phases, in order:
- parameters: the values against each other (no hardware needed: a config can be checked on a laptop);
- machine: GPUs, installed packages, disk;
- model: the model's folder and config.json (no weights, no torch);
- outputs: the adapter and checkpoint folders: a finished adapter, resuming, the run lock (checked, not taken);
- layers: the model's modules, read from the safetensors headers (torch-free) or built from config.json on the
  meta device (layers.py: torch, but no weights);
- data: the dataset's format and columns, before tokenizing;
- statistics: the prepared rows.

`--check` runs the first four (torch-free), and the layers where the model's files list them (layers.known);
`--dry-run` and a real run run all seven, so a run `--dry-run`
accepted is never refused later for a reason it could have seen. `check()` returns the findings; the caller decides.
"""

from __future__ import annotations

import inspect
import math
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import checkpoints, speed
from .errors import InvalidConfig, Problem, problem
from .layers import Layers
from .machine import GIB, Machine, filesystem, free_disk_gib, has_package, package_version
from .outputs import OutputFacts
from .params import AUTO, defaults
from .planning import (
    asked_processes,
    planned_steps,
    selected_gpu_ids,
)
from .rowformats import CHAT_FORMATS, DATA_SUFFIXES, DataFacts
from .runfolder import REPORTERS, lora_targets, reporter_names
from .sources import ModelFacts, hub_offline, workspace_dataset

PHASES = ("parameters", "machine", "model", "outputs", "layers", "data", "statistics")
# The phases `--check` runs: everything that needs no data.
CHECK_PHASES = PHASES[:4]
# What info.md's rules table calls each phase.
PHASE_NAMES = {
    "parameters": "parameters",
    "machine": "this machine",
    "model": "the model",
    "outputs": "outputs",
    "layers": "the model's layers",
    "data": "the data",
    "statistics": "the prepared rows",
}

Finding = tuple[str, Problem]
Rule = Callable[..., Iterator[Finding]]
RULES: dict[str, list[Rule]] = {phase: [] for phase in PHASES}
# What a rule may take, by its argument's name. A rule is given each fact it names; one naming anything else is
# refused where it is defined, so a misspelt name can never make a rule that silently never runs.
FACTS = {
    "p": "the parameters (params.Params)",
    "machine": "this machine (machine.Machine)",
    "model": "the model's config.json and adapter_config.json (sources.ModelFacts)",
    "out": "the output folders and checkpoints (outputs.OutputFacts); None without a usable adaptor_name",
    "plan": "the plan (planning.Plan)",
    "layers": "the model's modules (layers.Layers); None for a Hub model not cached here",
    "data": "the dataset's columns and rows (rowformats.DataFacts)",
    "stats": "the prepared rows' statistics",
}


def rule(phase: str) -> Callable[[Rule], Rule]:
    if phase not in RULES:
        raise ValueError(f"no phase {phase!r}; the phases are {', '.join(PHASES)}")

    def register(fn: Rule) -> Rule:
        unknown = [name for name in inspect.signature(fn).parameters if name not in FACTS]
        if unknown:
            raise TypeError(f"rule {fn.__name__} takes {', '.join(unknown)}: no such fact ({', '.join(FACTS)})")
        RULES[phase].append(fn)
        return fn

    return register


def error(parameter: str, what: str, fix: str = "") -> Finding:
    return "error", problem(parameter, what, fix)


def warning(parameter: str, what: str, fix: str = "") -> Finding:
    return "warning", problem(parameter, what, fix)


@dataclass
class Findings:
    """What the rules found: errors stop the run, warnings are reported with it."""

    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    def add(self, other: Findings) -> Findings:
        self.errors += other.errors
        self.warnings += other.warnings
        return self

    def raise_errors(self) -> None:
        if self.errors:
            raise InvalidConfig(self.errors, self.warnings)


def check(phases: tuple[str, ...], *, prior: list[Problem] | None = None, **facts: Any) -> Findings:
    """Run every rule of these phases over the facts given. `prior` holds the single-value errors found while
    reading the parameters: those parameters hold their defaults here, so findings about them are left out
    rather than reported twice or wrongly; they lead the errors."""
    unknown = set(facts) - set(FACTS)
    if unknown:
        raise TypeError(f"no such fact: {', '.join(sorted(unknown))} ({', '.join(FACTS)})")
    failed = {found.parameter for found in prior or []}
    result = Findings(errors=list(prior or []))
    for phase in phases:
        for fn in RULES[phase]:
            names = inspect.signature(fn).parameters
            missing = [name for name in names if name not in facts]
            if missing:  # a caller's mistake, never the user's: a rule would otherwise never run
                raise TypeError(f"phase {phase!r}: rule {fn.__name__} needs {', '.join(missing)}, not given")
            needed = {name: facts[name] for name in names}
            if any(value is None for value in needed.values()):
                continue  # a fact this run cannot know (no usable adaptor_name: no output folders)
            for severity, found in fn(**needed):
                if found.parameter not in failed:
                    (result.errors if severity == "error" else result.warnings).append(found)
    return result


def table() -> str:
    """info.md's rules table."""
    rows = ["| checked against | rule |", "|---|---|"]
    rows += [f"| {PHASE_NAMES[phase]} | {' '.join(fn.__doc__.split())} |" for phase in PHASES for fn in RULES[phase]]
    return "\n".join(rows)


# --- required inputs ---------------------------------------------------------------------------


@rule("parameters")
def model_and_dataset_given(p):
    """A model and a dataset are given."""
    if not p.model_name:
        yield error("model_name", "no model given", "Set model_name to a local model folder or a Hub id")
    if not p.dataset_name:
        yield error("dataset_name", "no dataset given", "Set dataset_name to a data file, folder or dataset id")


def _written_as_a_path(name: str) -> bool:
    """dataset_name as a person writes a local path: from the root, the working folder or a home folder, or
    naming a data file by its suffix. Hub ids and the workspace's dataset ids are neither."""
    return name.startswith(("/", "./", "../", "~")) or Path(name).suffix in DATA_SUFFIXES


@rule("parameters")
def dataset_path_exists(p):
    """A dataset_name written as a local path names a file or folder that exists (or a dataset of this
    workspace): refused before anything is loaded, rather than once the model's layers are checked."""
    name = p.dataset_name
    missing = name and _written_as_a_path(name) and not Path(os.path.expanduser(name)).exists()
    if missing and workspace_dataset(name) is None:
        yield error(
            "dataset_name",
            f"{name} does not exist",
            "Give the path of an existing .jsonl/.json/.csv/.parquet file or a folder of them",
        )


@rule("parameters")
def lora_not_on_lm_head(p):
    """LoRA target modules do not include lm_head (TRL and PEFT cannot train an adapter there)."""
    modules = set(lora_targets(p.lora_target_modules) or ())
    if p.training_mode != "full" and "lm_head" in modules:
        yield error("lora_target_modules", "lm_head cannot carry a LoRA adapter", "Remove lm_head from the list")


# --- the model: its folder and config.json, no weights ---------------------------------------------------


@rule("model")
def model_is_reachable(p, model: ModelFacts):
    """model_name is a local model folder, or a Hub id that is cached or reachable (not offline: HF_HUB_OFFLINE)."""
    if not p.model_name:
        return
    if model.local and not model.is_folder:
        yield error("model_name", f"{p.model_name} is not a folder", "Give the model's folder or a Hub id")
    elif not model.local and model.config is None and hub_offline():
        yield error(
            "model_name",
            f"{p.model_name} is not in the local Hub cache and the Hub is offline (HF_HUB_OFFLINE)",
            "Download it first",
        )


@rule("model")
def model_is_not_an_adapter(p, model: ModelFacts):
    """model_name is a base model, not a LoRA adapter folder (TRL refuses a PeftModel plus a LoRA config)."""
    if model.adapter_config is not None:
        base = model.adapter_config.get("base_model_name_or_path", "its base model")
        yield error(
            "model_name",
            f"{p.model_name} is a LoRA adapter, not a model",
            f"Train on {base} (or fuse the adapter first)",
        )


@rule("model")
def sequence_fits_model(p, model: ModelFacts):
    """maximum_sequence_length is within the model's max_position_embeddings (read from config.json)."""
    limit = model.context_length
    if limit is not None and p.maximum_sequence_length > limit:
        yield error(
            "maximum_sequence_length",
            f"{p.maximum_sequence_length} is above the model's context length {limit}",
            f"Use at most {limit}",
        )


@rule("model")
def memory_fits_the_gpus(p, model: ModelFacts, plan):
    """A run whose memory estimate exceeds the free memory of its smallest GPU even with gradient checkpointing is
    flagged before it runs out of memory at its first step (warning; the estimate counts every row at full length)."""
    gpus = plan.gpus
    if not gpus or not model.config or p.gradient_checkpointing is False:
        return
    precision, world = plan.precision, plan.world_size
    needed = speed.estimate_memory(
        model.config, p, precision=precision, world_size=world, checkpointing=True, device="cuda"
    )
    free = min(g.available_mib for g in gpus) * 2**20
    if needed is None or needed <= free:
        return
    sharding = "" if p.distributed_strategy != "ddp" or len(gpus) < 2 else ", fsdp or deepspeed_zero3 across the GPUs"
    yield warning(
        "batch_size",
        f"about {needed / GIB:.1f} GiB per GPU is estimated even with gradient checkpointing, and the smallest "
        f"selected GPU has {free / GIB:.1f} GiB free: the run will likely run out of memory",
        f"Lower batch_size or maximum_sequence_length, or use training_mode=lora or qlora{sharding}",
    )


# --- training length and optimisation ----------------------------------------------------------


@rule("parameters")
def max_steps_not_zero(p):
    """max_steps is not 0 (which would train nothing)."""
    if p.max_steps == 0:
        yield error("max_steps", "0 would train nothing", "Use -1 to train by epochs, or a positive step count")


@rule("parameters")
def save_steps_within_max_steps(p):
    """save_steps beyond max_steps leaves no checkpoint to resume from (warning)."""
    if p.max_steps > 0 and p.save_steps > p.max_steps:
        yield warning(
            "save_steps",
            f"{p.save_steps} is beyond max_steps={p.max_steps}: a stopped run has no checkpoint to resume from",
            f"Use save_steps <= {p.max_steps}",
        )


@rule("parameters")
def learning_rate_sane(p):
    """A learning rate above 1e-2 is flagged (warning)."""
    if p.learning_rate > 1e-2:
        yield warning(
            "learning_rate",
            f"{p.learning_rate:g} is very high for fine-tuning and usually diverges",
            "Use 1e-4 to 3e-4 for LoRA, 1e-5 to 5e-5 for full fine-tuning",
        )


# --- adapters ------------------------------------------------------------------------------------


@rule("parameters")
def lora_settings_ignored_in_full_mode(p):
    """LoRA settings changed with training_mode=full are flagged as ignored (warning)."""
    if p.training_mode != "full":
        return
    default = defaults()
    changed = [k for k in ("lora_r", "lora_alpha", "lora_dropout") if getattr(p, k) != getattr(default, k)]
    if changed:
        yield warning(
            ", ".join(changed),
            "LoRA settings are ignored with training_mode=full",
            "Use training_mode=lora to apply them",
        )


# --- templates -----------------------------------------------------------------------------------


@rule("parameters")
def chat_template_wins_over_formatting_template(p):
    """A formatting template sent with apply_chat_template is ignored: the chat template wins (warning)."""
    if p.apply_chat_template and p.formatting_template.strip():
        yield warning(
            "formatting_template",
            "ignored because apply_chat_template is on (the chat template wins)",
            "Turn apply_chat_template off to use the formatting template",
        )


# A template's `{{ column }}` output: valid Jinja whatever the column (not one of the words Jinja reads as an
# operator, to be safe).
_PLAIN_OUTPUT = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_OPERATOR_WORDS = frozenset({"not", "and", "or", "in", "is", "if", "else"})
_TAG_START = re.compile(r"\{[{%#]")


def plainly_valid(source: str) -> bool:
    """Whether a formatting template is text and `{{ column }}` outputs alone: valid Jinja by construction, as
    Jinja's lexer starts a tag only at `{{`, `{%` or `{#` (no line statements by default). Such a template (the
    common kind) is answered without importing Jinja (50-100 ms of a --check); any other is parsed."""
    at = 0
    while (tag := _TAG_START.search(source, at)) is not None:
        output = _PLAIN_OUTPUT.match(source, tag.start())
        if output is None or output.group(1) in _OPERATOR_WORDS:
            return False
        at = output.end()
    return True


@rule("parameters")
def templates_are_valid_jinja(p):
    """formatting_template and formatting_chat_template are valid Jinja (parsed, not rendered)."""
    given = {name: getattr(p, name) for name in ("formatting_template", "formatting_chat_template")}
    if not given["formatting_chat_template"].strip() and plainly_valid(given["formatting_template"]):
        return  # nothing to parse: Jinja is imported where a template needs it (50-100 ms of a --check)
    from .templates import chat_syntax_problem, syntax_problem

    for parameter, check in (
        ("formatting_template", syntax_problem),
        ("formatting_chat_template", chat_syntax_problem),
    ):
        template = given[parameter]
        found = check(template) if template.strip() else None
        if found:
            yield error(parameter, found, "Fix the template")


# --- distribution --------------------------------------------------------------------------------


@rule("parameters")
def qlora_with_ddp_only(p):
    """qlora runs with ddp only (sharding a 4-bit model is not supported here)."""
    if p.training_mode == "qlora" and p.distributed_strategy != "ddp":
        yield error(
            "distributed_strategy",
            f"{p.distributed_strategy} with training_mode=qlora is not supported",
            "Use ddp: a 4-bit base model already fits where sharding would be needed",
        )


@rule("parameters")
def fuse_model_explained(p):
    """fuse_model with qlora merges into a 16-bit copy of the base; with full there is nothing to merge (warnings)."""
    if p.fuse_model and p.training_mode == "qlora":
        yield warning(
            "fuse_model",
            "the adapter is merged into a 16-bit copy of the base model loaded on the CPU (4-bit weights cannot "
            "hold merged values); it needs about 2 bytes of RAM per parameter",
            "",
        )
    if p.fuse_model and p.training_mode == "full":
        yield warning("fuse_model", "training_mode=full trains the whole model: there is no adapter to merge", "")


@rule("parameters")
def report_to_names_trackers(p):
    """report_to is none, or a comma list of tensorboard, trackio and wandb."""
    unknown = [name for name in reporter_names(p.report_to) if name not in REPORTERS]
    if unknown:
        yield error(
            "report_to",
            f"{', '.join(map(repr, unknown))} is not one of none, {', '.join(REPORTERS)}",
            f"Use none, or one or more of {', '.join(REPORTERS)} separated by commas, such as tensorboard,trackio",
        )


def asked_by(p, tracker: str) -> str:
    """The parameter that asked for `tracker`: report_to, or log_to_wandb (the form's older switch, for wandb)."""
    return "report_to" if tracker in reporter_names(p.report_to) else "log_to_wandb"


@rule("parameters")
def wandb_key(p):
    """Weights & Biases (report_to or log_to_wandb) without WANDB_API_KEY runs offline (warning)."""
    if "wandb" in p.reporters and not os.environ.get("WANDB_API_KEY"):
        yield warning(
            asked_by(p, "wandb"),
            "WANDB_API_KEY is not set: Weights & Biases runs offline, in the run's logs folder",
            "Set the key, or `wandb sync` the folder the log names later",
        )


@rule("parameters")
def multi_node_needs_address(p):
    """A multi-node run has the main node's address and a fixed port; machine_rank < num_machines."""
    if p.num_machines > 1 and not p.main_process_ip:
        yield error("main_process_ip", "a multi-node run needs the main node's address", "Set main_process_ip")
    if p.num_machines > 1 and not p.main_process_port:
        yield error("main_process_port", "a multi-node run needs a fixed port", "Set the same port on every node")
    if p.machine_rank >= p.num_machines:
        yield error(
            "machine_rank",
            f"{p.machine_rank} is not below num_machines={p.num_machines}",
            f"Number the machines 0 to {p.num_machines - 1}, the main node 0",
        )


# --- this machine ----------------------------------------------------------------------------------


@rule("machine")
def gpus_exist(p, machine: Machine):
    """Requested GPUs exist (within CUDA_VISIBLE_DEVICES when set); train_device=cuda has a GPU."""
    if p.train_device == "cpu":
        return
    usable = [g.index for g in machine.usable_gpus]
    if p.train_device == "cuda" and not usable:
        yield error("train_device", "cuda was asked for but no GPU is visible", "Use train_device=auto or cpu")
    missing = [i for i in selected_gpu_ids(p, machine) if i not in usable]
    if missing and p.gpu_ids is not AUTO:
        where = " within CUDA_VISIBLE_DEVICES" if machine.visible is not None else ""
        yield error(
            "gpu_ids",
            f"GPU {', '.join(map(str, missing))} does not exist{where} (visible: {usable or 'none'})",
            "Pick ids from the visible GPUs, or auto",
        )


@rule("machine")
def cuda_visible_devices_name_gpus(p, machine: Machine):
    """Each CUDA_VISIBLE_DEVICES entry names a GPU here: an index, a GPU- UUID (or a prefix only one GPU has) or a
    MIG- id (CUDA hides the GPUs listed from the first entry that does not)."""
    unknown = machine.unknown_visible
    if p.train_device == "cpu" or not unknown or not machine.gpus:
        return
    left = [g.index for g in machine.usable_gpus]
    yield error(
        "CUDA_VISIBLE_DEVICES",
        f"{unknown!r} names no GPU here (or, as a prefix, more than one), so CUDA hides it and the GPUs listed "
        f"after it: the run would train on {f'GPU {left}' if left else 'the CPU'}",
        "Name GPUs by index, GPU- UUID or MIG- id as `nvidia-smi -L` lists them, or unset CUDA_VISIBLE_DEVICES",
    )


@rule("machine")
def cpu_processes_fit_cores(p, machine: Machine, plan):
    """Training on the CPU, more processes than cores only share them out: a warning."""
    count = asked_processes(p)
    if count is None or plan.gpus or count <= machine.cpu_count:
        return
    yield warning(
        "num_processes",
        f"{count} processes on the CPU of a machine with {machine.cpu_count} cores share them out and train slower",
        f"Use at most {machine.cpu_count}",
    )


@rule("machine")
def processes_fit_gpus(p, machine: Machine):
    """num_processes is not above the number of selected GPUs."""
    count = asked_processes(p)
    if count is None:
        return
    gpus = selected_gpu_ids(p, machine) if p.train_device != "cpu" else []
    if gpus and count > len(gpus):
        yield error(
            "num_processes",
            f"{count} processes but only {len(gpus)} GPU(s) selected",
            f"Use num_processes={len(gpus)} or auto (one process per GPU)",
        )


@rule("machine")
def cpu_only_note(p, machine: Machine):
    """No GPU: the run trains on the CPU (note)."""
    if p.train_device == "auto" and not machine.usable_gpus:
        yield warning("train_device", "no GPU found: training on the CPU (slow beyond small models)", "")


@rule("machine")
def precision_supported(p, machine: Machine, plan):
    """bf16 only on Ampere or newer GPUs; fp16 only on a GPU."""
    gpus = plan.gpus
    if p.precision == "bf16" and gpus and not all(g.supports_bf16 for g in gpus):
        yield error("precision", "bf16 needs an Ampere or newer GPU", "Use precision=auto (fp16 there) or fp16")
    on_cpu = p.train_device == "cpu" or not machine.usable_gpus
    if p.precision == "fp16" and on_cpu:
        yield error("precision", "fp16 training needs a GPU", "Use precision=auto or fp32 on the CPU")


# transformers 5.24 refuses older releases for 4-bit models; from this release on, bitsandbytes' 4-bit layers also
# run (forward and backward) on the CPU.
QLORA_BITSANDBYTES = (0, 46, 1)


@rule("machine")
def qlora_needs_bitsandbytes(p, machine: Machine):
    """qlora needs bitsandbytes 0.46.1 or newer, which runs 4-bit layers on a CUDA GPU and on the CPU."""
    if p.training_mode != "qlora":
        return
    version = package_version("bitsandbytes")
    needed = ".".join(map(str, QLORA_BITSANDBYTES))
    if version is None:
        yield error(
            "training_mode",
            "qlora needs bitsandbytes, which is not installed",
            "Reinstall the plugin with WITH_BITSANDBYTES=1, or use training_mode=lora",
        )
    elif version < QLORA_BITSANDBYTES:
        yield error(
            "training_mode",
            f"qlora needs bitsandbytes {needed} or newer, the first release transformers accepts for 4-bit models "
            f"and whose 4-bit layers also run on the CPU; {'.'.join(map(str, version))} is installed",
            "Reinstall the plugin with WITH_BITSANDBYTES=1 (bitsandbytes 0.50.2), or use training_mode=lora",
        )


@rule("machine")
def strategy_packages_installed(p, machine: Machine):
    """deepspeed strategies need a CUDA GPU and the deepspeed package."""
    strategy = p.distributed_strategy
    if not strategy.startswith("deepspeed"):
        return
    if p.train_device == "cpu" or not machine.usable_gpus:
        yield error("distributed_strategy", f"{strategy} needs CUDA GPUs", "Use ddp or fsdp on this machine")
    elif not has_package("deepspeed"):
        yield error(
            "distributed_strategy", f"{strategy} needs deepspeed", "Reinstall with WITH_DEEPSPEED=1, or use ddp"
        )


# What each tracker needs installed (any one of its packages) and how to install it.
REPORTER_PACKAGES = {
    "tensorboard": (("tensorboardX", "tensorboard"), "pip install tensorboardX"),
    "trackio": (("trackio",), "pip install trackio"),
    "wandb": (("wandb",), "pip install wandb"),
}


@rule("machine")
def reporters_installed(p):
    """Each tracker report_to names is installed (looked up, never imported): tensorboardX, trackio, wandb."""
    for name in p.reporters:
        packages, install = REPORTER_PACKAGES.get(name, ((), ""))
        if packages and not any(has_package(package) for package in packages):
            yield error(asked_by(p, name), f"{name} needs {packages[0]}, which is not installed", f"Run `{install}`")


@rule("machine")
def strategy_needs_several_processes(p, plan):
    """fsdp/deepspeed with a single process shard nothing (warning)."""
    if p.distributed_strategy != "ddp" and plan.world_size == 1:
        yield warning(
            "distributed_strategy",
            f"{p.distributed_strategy} with one process shards nothing",
            "Use ddp, or select more GPUs",
        )


@rule("machine")
def packing_without_flash_attention(p, plan):
    """packing=true without flash-attention, on a GPU or above 1024 tokens per batch, is likely slower (warning)."""
    if p.packing is not True:
        return
    usable = speed.flash_attention_usable(plan.device, list(plan.gpus), plan.precision)
    if not usable and speed.masked_packing_is_slow(p, plan.device):
        yield warning(
            "packing",
            "without flash-attention, packed rows are kept apart by a mask over the whole batch "
            f"({p.batch_size * p.maximum_sequence_length} tokens): correct, but likely slower than padding",
            "Install flash-attn on an Ampere or newer GPU, or use packing=auto",
        )


# --- outputs ---------------------------------------------------------------------------------------


@rule("outputs")
def finished_adapter_kept(p, out: OutputFacts):
    """A finished adapter of the same name is not replaced unless overwrite_output."""
    if out.adapter_complete and not p.overwrite_output:
        yield error(
            "overwrite_output",
            f"{out.adapter_dir} already holds a finished adapter",
            "Pick another adaptor_name, or set overwrite_output=true to replace it",
        )


@rule("outputs")
def outputs_writable(p, out: OutputFacts):
    """The adapter and checkpoint folders can be written."""
    if out.unwritable:
        name = "adaptor_output_dir" if p.adaptor_output_dir else "output_dir"
        yield error(name, f"{out.unwritable[0]} cannot be written", "Pick a folder you can write to")


@rule("outputs")
def no_other_run_writes_here(p, out: OutputFacts):
    """No other run is writing the same checkpoint folder (its lock is checked, not taken). The other nodes of a
    multi-node run write beside the main node, which holds the lock."""
    if out.lock_holder and p.machine_rank == 0:
        yield error(
            "adaptor_name",
            f"another run ({out.lock_holder}) is writing {out.checkpoint_dir}",
            "Wait for it to finish, or pick another adaptor_name",
        )


@rule("outputs")
def resume_keeps_what_the_checkpoint_needs(p, out: OutputFacts):
    """A resumed run keeps the model, LoRA shape and targets, training mode, strategy, batch and world size of its
    checkpoint; other changes (max_steps, epochs, learning rate, schedule, save and logging steps) are warnings."""
    if out.resume_from is None:
        return
    hard, soft = out.hard_changes(), out.soft_changes()
    if hard:
        names = ", ".join(out.shown(hard))
        yield error(
            hard[0] if len(hard) == 1 and hard[0] != "world_size" else "adaptor_name",
            f"the checkpoint in {os.path.dirname(out.resume_from)} was trained with other values of {names}, "
            "so it cannot be resumed",
            "Restore those values to resume, set overwrite_output=true to start afresh, or pick another adaptor_name",
        )
    if soft:
        yield warning(
            ", ".join(soft),
            f"changed since the checkpoint in {os.path.dirname(out.resume_from)} was saved; "
            f"the run resumes at its step with the new values",
            "",
        )


@rule("outputs")
def enough_disk(p, out: OutputFacts, plan):
    """Each disk outputs go to has room for what the run writes there, estimated from the model's size: the
    adapter or full weights, save_total_limit + 1 checkpoints with their optimizer state, the merged model under
    fuse_model, plus 1 GiB and 5%. At least 1 GiB is free when the model's size is unknown."""
    estimate = plan.disk
    if estimate is None:  # a Hub id not in the cache: the floor alone
        demands = [(out.adapter_dir, "", 0), (out.checkpoint_dir, "", 0)]
    else:
        staging = out.where.saving_dir if out.where else out.checkpoint_dir
        # A save is written to staging, then moved into the checkpoints folder (copied there from another disk)
        # before the oldest is removed; a resumed run's checkpoints are on the disk already.
        copied = filesystem(staging) != filesystem(out.checkpoint_dir)
        kept = len(checkpoints.complete(out.checkpoint_dir, out.identity["world_size"])) if out.resume_from else 0
        new = max(0, p.save_total_limit - kept) + copied
        # The merged model is counted beside the adapter (the legacy host puts it in the workspace's models).
        demands = [
            (out.adapter_dir, "adapter" if p.training_mode != "full" else "model", estimate.outputs),
            (out.adapter_dir, "merged model", estimate.merged),
            (out.checkpoint_dir, "checkpoints", new * estimate.checkpoint),
            (staging, "checkpoints", estimate.checkpoint),
        ]
    needs: dict[int, tuple[str, dict[str, int]]] = {}
    for path, what, amount in demands:
        parts = needs.setdefault(filesystem(path), (path, {}))[1]
        parts[what] = parts.get(what, 0) + amount
    for path, parts in needs.values():
        free, written = free_disk_gib(path), sum(parts.values()) / GIB
        margin = 1 + 0.05 * written
        if free >= written + margin:
            continue
        if estimate is None:
            yield error("output_dir", f"only {free:.2f} GiB free at {path}", "Free space or pick another output_dir")
            continue
        shown = ", ".join(f"{what} {amount / GIB:.2f} GiB" for what, amount in parts.items() if amount)
        yield error(
            "adaptor_output_dir" if path == out.adapter_dir and p.adaptor_output_dir else "output_dir",
            f"{path} has {free:.2f} GiB free but the run needs about {written + margin:.2f} GiB there ({shown}, "
            f"margin {margin:.2f} GiB; {estimate.checkpoint / GIB:.2f} GiB per checkpoint, save_total_limit="
            f"{p.save_total_limit})",
            "Free disk space there, lower save_total_limit, or pick another output_dir",
        )


# --- the model's layers (read from the weights' headers, or built on the meta device: no weights) -------------


@rule("layers")
def model_builds_as_a_causal_lm(layers: Layers):
    """transformers builds the model's architecture as a causal language model (from config.json, on the meta
    device, without its weights; a family the safetensors headers describe is one)."""
    if layers.error:
        yield error(
            "model_name",
            f"transformers cannot build this model as a causal language model ({layers.error})",
            "Pick a causal language model (a decoder such as Llama, Qwen or Mistral)",
        )


@rule("layers")
def lora_targets_are_layers(p, layers: Layers):
    """Each LoRA target module names a layer of the model that LoRA can adapt; one misspelt name in a comma list
    is an error naming the layers there are, not an adapter on the other names only."""
    names = lora_targets(p.lora_target_modules)
    if p.training_mode == "full" or layers.error or names is None:
        return
    problems = [why for name in names if (why := layers.unknown_target(name))]
    if problems:
        yield error(
            "lora_target_modules",
            "; ".join(problems),
            f"Use the names of this model's layers ({', '.join(layers.adaptable_names())}), or all-linear",
        )


@rule("layers")
def gradient_checkpointing_supported(plan, layers: Layers):
    """Gradient checkpointing is on only for a model that supports it."""
    if plan.gradient_checkpointing and not layers.error and not layers.supports_gradient_checkpointing:
        yield error(
            "gradient_checkpointing",
            "this model does not support gradient checkpointing",
            "Set gradient_checkpointing to false",
        )


# --- the data: format and columns, before tokenizing --------------------------------------------------


@rule("data")
def assistant_only_needs_chat(p, data: DataFacts):
    """assistant_only_loss needs chat rows."""
    if p.assistant_only_loss and data.format not in CHAT_FORMATS:
        yield error(
            "assistant_only_loss", f"needs chat rows but the data are {data.format}", "Set assistant_only_loss=false"
        )


@rule("data")
def completion_only_needs_a_split(p, data: DataFacts):
    """completion_only_loss=true needs rows with a completion: prompt/completion, chat, or a formatting_template."""
    if data.format == "text" and p.completion_only_loss is True:
        yield error(
            "completion_only_loss",
            "true, but plain text rows have no completion to split off",
            "Use completion_only_loss=auto or false, or give prompt/completion rows or a formatting_template",
        )


@rule("data")
def resume_on_the_same_data(p, out: OutputFacts, data: DataFacts):
    """A resumed run trains on the same prepared data (content, template, tokenizer and length) as its checkpoint."""
    if out.resume_from is not None and out.dataset_changed(data.key):
        yield error(
            "dataset_name",
            f"the checkpoint in {os.path.dirname(out.resume_from)} was trained on other data (its content or "
            "preparation changed), so it cannot be resumed",
            "Restore the data and data settings to resume, set overwrite_output=true to start afresh, or pick "
            "another adaptor_name",
        )


# --- the prepared rows --------------------------------------------------------------------------------


@rule("statistics")
def rows_left_to_train(p, stats):
    """At least one row has something to train on."""
    if stats.rows_used == 0:
        what = (
            "no row has an assistant turn to train on"
            if stats.no_answer == stats.rows
            else "no row has anything left to train on"
        )
        yield error("dataset_name", what, "Check the data")


@rule("statistics")
def truncation_within_max_dropped_fraction(p, stats):
    """Rows that lose every trained token to truncation stay within max_dropped_fraction."""
    lost = stats.dropped - stats.no_answer  # not the rows that had nothing to train
    rows = stats.rows
    if rows and lost / rows > p.max_dropped_fraction:
        pct = stats.length_percentiles
        yield error(
            "maximum_sequence_length",
            f"{lost} of {rows} rows ({lost / rows:.0%}) lose every trained token to truncation at "
            f"{p.maximum_sequence_length} tokens (row lengths p50={pct['p50']}, p90={pct['p90']}, "
            f"p99={pct['p99']}, max={pct['max']})",
            "Raise maximum_sequence_length, or raise max_dropped_fraction to accept the loss",
        )


@rule("statistics")
def evaluation_has_rows(p, stats):
    """eval_split leaves training rows, and an eval split keeps rows to evaluate."""
    if p.eval_split <= 0 or stats.rows_used == 0 or stats.eval_rows > 0:
        return
    if stats.own_eval_split:
        yield error("eval_split", "the validation split has no row left to evaluate", "Check that split's rows")
    elif math.ceil(p.eval_split * stats.rows_used) >= stats.rows_used:
        yield error(
            "eval_split",
            f"{p.eval_split:g} of {stats.rows_used} rows leaves no training rows",
            "Lower eval_split, or set it to 0",
        )


@rule("statistics")
def effective_batch_fits_dataset(p, plan, stats):
    """An effective batch larger than the training rows is flagged (warning)."""
    effective = p.batch_size * p.gradient_accumulation_steps * plan.world_size
    if effective > stats.rows_used:
        yield warning(
            "gradient_accumulation_steps",
            f"the effective batch ({effective}) is larger than the {stats.rows_used} training rows",
            "Lower batch_size or gradient_accumulation_steps",
        )


@rule("statistics")
def checkpoint_before_the_end(p, plan, stats):
    """save_steps beyond the planned step count leaves no checkpoint to resume from (warning)."""
    rows = stats.rows_used
    if plan.speed.packing and stats.total_tokens:
        rows = -(-stats.total_tokens // p.maximum_sequence_length)  # packs hold about this many rows
    steps = planned_steps(p, plan.world_size, rows)
    if p.max_steps <= 0 and p.save_steps > steps:
        yield warning(
            "save_steps",
            f"{p.save_steps} is beyond the {steps} planned steps: a stopped run has no checkpoint to resume from",
            f"Use save_steps <= {steps}",
        )


@rule("statistics")
def evaluation_named(p, stats):
    """The dataset's own eval split replaces eval_split's fraction; at eval_split 0 it is unused (warnings)."""
    own, rows = stats.own_eval_split, stats.own_eval_rows
    if own and p.eval_split > 0:
        yield warning(
            "eval_split",
            f"{p.eval_split:g} is not applied: the dataset's own {own!r} split ({rows} rows) is the evaluation set",
            "Set eval_split to 0 to train without evaluation",
        )
    elif own:
        yield warning(
            "eval_split",
            f"the dataset's {own!r} split ({rows} rows) is not used because eval_split is 0",
            "Set eval_split above 0 to evaluate on it",
        )


@rule("statistics")
def rows_with_nothing_to_train(p, stats):
    """Rows without an assistant turn are left out, and rows whose answer is empty are counted (warnings)."""
    if stats.no_answer:
        yield warning(
            "dataset_name",
            f"{stats.no_answer} of {stats.rows} rows have no assistant turn and are left out",
            "Check their roles (assistant, or gpt/model/bot)",
        )
    if stats.empty_answers:
        yield warning(
            "dataset_name",
            f"{stats.empty_answers} of {stats.rows} rows have an empty answer (or tool calls the chat "
            "template does not render): only the end of that turn is trained",
            "Fill in or remove those rows",
        )


@rule("statistics")
def chat_template_keeps_answers(p, stats):
    """Reasoning a chat template leaves out, and turns it closes without a stop token, are counted (warnings)."""
    if stats.reasoning_dropped:
        yield warning(
            "formatting_chat_template",
            f"the chat template leaves out the reasoning of assistant turns in {stats.reasoning_dropped} of "
            f"{stats.rows} rows, so that reasoning is not trained (it is trained as the template renders it)",
            "To train it, give a formatting_chat_template that keeps reasoning in every turn",
        )
    if stats.open_turns:
        yield warning(
            "formatting_chat_template",
            f"the chat template ends assistant turns without a special token in {stats.open_turns} of "
            f"{stats.rows} rows, so the model never learns to stop",
            "Give a formatting_chat_template that closes each assistant turn with {{ eos_token }}",
        )


if __name__ == "__main__":
    sys.stdout.write(table() + "\n")
