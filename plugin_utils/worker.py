"""One training rank. Started by the parent through `plugin_utils.rank` (`python -m plugin_utils.rank RUN_DIR`,
or through `accelerate launch -m`), it reads the run spec, loads the prepared dataset memory-mapped, builds the model
with its LoRA adapter, and trains with TRL's SFTTrainer. Rank 0 writes progress events; every rank
watches for the stop file and they agree on stopping through one collective, a few times a second.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from typing import Any

from transformers import PrinterCallback, TrainerCallback

from . import checkpoints, samples
from .layers import beside_language_model, beside_pattern
from .runfolder import (
    CheckpointSaved,
    Done,
    Event,
    Logged,
    Progress,
    RunFolder,
    RunSpec,
    Sampled,
    Started,
    Stopped,
    process_start,
)
from .sources import load_tokenizer


def _dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def _quantization(spec: RunSpec) -> dict[str, Any]:
    """QLoRA's 4-bit NF4 base, computing in the training precision, on this rank's device: its GPU (every rank sees
    all the planned GPUs and trains on cuda:LOCAL_RANK), or the CPU, where bitsandbytes' CPU backend runs it."""
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=_dtype(spec.precision),
    )
    device = int(os.environ.get("LOCAL_RANK", "0")) if spec.device == "cuda" else "cpu"
    return {"quantization_config": config, "device_map": {"": device}}


def _load_model(spec: RunSpec):
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": _dtype(spec.weights_precision), "attn_implementation": spec.attention}
    if spec.training_mode == "qlora":
        kwargs.update(_quantization(spec))
    try:
        model = AutoModelForCausalLM.from_pretrained(spec.model_name, **kwargs)
    except (ValueError, ImportError) as exc:
        if kwargs["attn_implementation"] == "sdpa":
            raise
        # An architecture without flash-attention support: SDPA still trains it, packed rows included.
        print(f"flash-attention is not usable for this model ({exc}); using SDPA", file=sys.stderr, flush=True)
        kwargs["attn_implementation"] = "sdpa"
        model = AutoModelForCausalLM.from_pretrained(spec.model_name, **kwargs)
    if spec.liger:
        _apply_liger(model)
    if spec.training_mode == "full":
        _freeze_beside_language_model(model)
    return model


def _say(line: str) -> None:
    """A line in the job's log: the first rank's output is echoed there, and the others would repeat it."""
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)


def _freeze_beside_language_model(model) -> None:
    """Full fine-tuning on text rows trains the language model: a vision tower beside it gets no gradient, would
    hold optimizer state for nothing, and fails DDP's check that every trainable weight gets one (transformers
    turns that search off when activations are checkpointed)."""
    beside = beside_language_model(model)
    for name in beside:
        model.get_submodule(name).requires_grad_(False)
    if beside:
        _say(f"full fine-tuning: the language model's weights; {', '.join(beside)} stay frozen")


def _apply_liger(model) -> None:
    """Liger's fused RMSNorm, RoPE and SwiGLU kernels, patched into this model instance (what TRL's deprecated
    `use_liger_kernel` does at train time). Its cross-entropy kernels stay off: TRL's fused LM head already computes
    the loss without building the logits, and replaces the model's forward that they would patch."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(
        model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )


def _adapters_in_fp32(model) -> None:
    """QLoRA's adapters as fp32 master weights over the 4-bit base, as LoRA's are. TRL 1.16 casts them to bf16 when it
    wraps a quantized model, but a resumed run reloads them through PEFT in fp32, so a stopped and resumed run would
    train in another precision than one that never stopped; and under fp16 (GPUs older than Ampere, which lack bf16)
    the loss scaler would meet bf16 gradients. Autocast still computes in the run's precision. Done before the
    optimizer exists, so it holds these tensors."""
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def _peft_config(spec: RunSpec, model):
    """The LoRA adapter, in the language model alone: on a checkpoint that also holds a vision tower, adapters there
    would get no gradient from text rows, and DDP (which is told no parameter goes unused) fails at its second step."""
    if spec.training_mode == "full":
        return None
    from peft import LoraConfig

    beside = beside_language_model(model)
    if beside:
        _say(f"LoRA: adapters in the language model only; not in {', '.join(beside)}")
    modules = spec.lora.lora_target_modules
    return LoraConfig(
        r=spec.lora.lora_r,
        lora_alpha=spec.lora.lora_alpha,
        lora_dropout=spec.lora.lora_dropout,
        target_modules="all-linear" if modules == ("all-linear",) else list(modules),
        exclude_modules=beside_pattern(beside),
        bias="none",
        task_type="CAUSAL_LM",
    )


def _sft_config(spec: RunSpec):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=spec.checkpoint_staging,  # saves are moved into checkpoint_dir once complete
        per_device_train_batch_size=spec.training.batch_size,
        per_device_eval_batch_size=spec.training.batch_size,
        gradient_accumulation_steps=spec.training.gradient_accumulation_steps,
        learning_rate=spec.training.learning_rate,
        lr_scheduler_type=spec.training.learning_rate_schedule,
        warmup_steps=spec.training.warmup_ratio,  # a float below 1 is a ratio of the total steps
        num_train_epochs=spec.training.num_train_epochs,
        max_steps=spec.training.max_steps,
        logging_steps=spec.training.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=spec.training.save_steps,
        save_total_limit=spec.training.save_total_limit,
        eval_strategy="steps" if spec.has_eval else "no",
        eval_steps=spec.training.save_steps if spec.has_eval else None,
        seed=spec.training.seed,
        data_seed=spec.training.seed,
        bf16=spec.precision == "bf16",
        fp16=spec.precision == "fp16",
        use_cpu=spec.device == "cpu",  # without it, CPU ranks never join one gloo group
        # Under FSDP, the FSDP config checkpoints activations instead.
        activation_checkpointing=spec.gradient_checkpointing and spec.strategy != "fsdp",
        deepspeed=spec.deepspeed_config,
        max_length=spec.max_length,
        packing=spec.packing,
        # Rows arrive tokenized, truncated and labelled; TRL only has work left when it packs.
        dataset_kwargs=None if spec.packing else {"skip_prepare_dataset": True},
        remove_unused_columns=False,
        # The trainer reports from the first rank alone; the others would still import every tracker (seconds of
        # CPU each, shared with the rank that trains) for callbacks that do nothing there.
        report_to=list(spec.reporting.reporters) if os.environ.get("RANK", "0") == "0" else [],
        project=spec.reporting.project,
        run_name=spec.reporting.run_name or None,
        ddp_find_unused_parameters=False if spec.training_mode != "full" else None,
        tf32=True if spec.tf32 else None,
        dataloader_num_workers=spec.dataloader_workers,
        dataloader_persistent_workers=spec.dataloader_workers > 0,
        ddp_timeout=1800,
        disable_tqdm=True,
        save_only_model=False,
    )


class StoppedBeforeTraining(Exception):
    """A stop arrived while the model loaded: nothing was trained, nothing is saved."""


_SIGNALLED = {"at": None}
STOP_SIGNALS = {signal.SIGTERM, signal.SIGHUP}
# A signal is a stop when the parent asks for one (or is gone) within this long; else the rank ends at once.
STOP_CONFIRM_SECONDS = 1.0


def _watch_stop_signals(folder: RunFolder) -> None:
    """SIGTERM or SIGHUP to a rank. A task host's Stop signals every process of the run at once, the parent
    included, which then writes the stop file: the rank finishes its step, every rank agrees, and the run saves
    a checkpoint and ends. Without that confirmation (torch's launcher ending the siblings of a failed rank, or
    a rank killed by hand) the rank ends at once, as by default. A thread takes the signal, since a rank blocked
    in a collective runs no Python signal handler."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    # A forked child (a data-loader worker) keeps the default: SIGTERM ends it.
    os.register_at_fork(after_in_child=lambda: signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS))

    def wait() -> None:
        while True:
            signum = signal.sigwait(STOP_SIGNALS)
            deadline = time.time() + STOP_CONFIRM_SECONDS
            while not (folder.stop_requested() or _parent_gone()):
                if time.time() > deadline:  # the default action (end the process), taken by this thread
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
                    os.kill(os.getpid(), signum)
                    return
                time.sleep(0.05)
            if _SIGNALLED["at"] is None:
                _SIGNALLED["at"] = time.time()
                rank = os.environ.get("RANK", "0")
                print(f"rank {rank}: signal {signum}: stopping after this step", file=sys.stderr, flush=True)

    threading.Thread(target=wait, name="stop-signals", daemon=True).start()


def _signalled() -> bool:
    return _SIGNALLED["at"] is not None


def _parent_gone() -> bool:
    parent = int(os.environ.get("SFT_PARENT_PID", "0") or 0)
    if not parent:
        return False
    try:
        os.kill(parent, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    # Killed but not yet reaped by its own parent (a zombie): gone all the same.
    try:
        with open(f"/proc/{parent}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


def _trained(model) -> dict[str, Any]:
    """What the trainer is about to train, as built: trainable parameters, their dtypes, and whether activations
    are checkpointed (a module's own `gradient_checkpointing` flag, through PEFT's and DDP's wrappers)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {
        "trainable_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in trainable),
        "trainable_dtypes": tuple(sorted({str(p.dtype).removeprefix("torch.") for p in trainable})),
        "checkpointing": any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()),
    }


# How much training may pass between two stop agreements: a stop takes effect within about this long after the
# step that sees it. Agreeing at every step cost a collective each: on 2 CPU ranks, 1.1 ms a step alone, and 2.4 to
# 3.9 ms of a 72 ms step in training, most of it waiting for the other rank (which the step's other collectives
# then wait less for).
AGREE_EVERY_SECONDS = 0.2
# Steps seldom vary much in length, but the pace is only measured: a bound for steps that suddenly slow down a lot.
AGREE_AT_LEAST_EVERY_STEPS = 50


class StopChecks:
    """The steps at which the ranks check for a stop and agree on it. Every rank must reach the same collective at
    the same step, so each agreement also fixes the next one: every rank proposes as many steps as it trained in
    about AGREE_EVERY_SECONDS since the last one, and all take the smallest proposal. One rank, which agrees with
    nobody, keeps the same schedule and skips the stop file's and the parent's system calls in between."""

    def __init__(self, step: int = 0):
        self.next_step = step + 1  # the first step's end: its time says how long the steps take
        self.last = (step, time.monotonic())

    def due(self, step: int) -> bool:
        return step >= self.next_step

    def proposal(self, step: int) -> int:
        """Steps until the next check, at the pace since the last one (one at least)."""
        steps, seconds = step - self.last[0], time.monotonic() - self.last[1]
        paced = int(AGREE_EVERY_SECONDS * steps / seconds) if seconds > 0 else AGREE_AT_LEAST_EVERY_STEPS
        return max(1, min(AGREE_AT_LEAST_EVERY_STEPS, paced))

    def agreed(self, step: int, interval: int) -> None:
        self.next_step = step + interval
        self.last = (step, time.monotonic())


class Reporter(TrainerCallback):
    """Progress events from each node's first rank, and the stop every rank agrees on."""

    def __init__(self, folder: RunFolder, is_main: bool):
        self.folder = folder
        self.events = folder.event_writer() if is_main else None
        self.last_progress = 0.0
        self.last_tokens: tuple[float, float] | None = None
        self.stopped = False
        self.orphaned = False
        self.marks: dict[str, float] = {}
        self.checks = StopChecks()

    def emit(self, event: Event) -> None:
        if self.events:
            self.events.emit(event)

    def on_train_begin(self, args, state, control, **kwargs):
        if _agree(self.folder.stop_requested() or _signalled()):
            raise StoppedBeforeTraining()
        self.checks = StopChecks(state.global_step)
        self.emit(
            Started(
                world_size=args.world_size,
                max_steps=state.max_steps,
                global_step=state.global_step,
                marks=self.marks,
                **_trained(kwargs["model"]),
            )
        )

    def on_step_end(self, args, state, control, **kwargs):
        now = time.time()
        if now - self.last_progress >= 1.0 or state.global_step >= state.max_steps:
            self.last_progress = now
            self.emit(Progress(step=state.global_step, max_steps=state.max_steps))
        if self.checks.due(state.global_step) and self._agree_to_stop(state.global_step):
            self.stopped = True
            control.should_training_stop = True
            control.should_save = True
        if control.should_training_stop:
            # The last trained step is always logged, whatever logging_steps is: the final loss, the job's score
            # and the last row of its metrics are the loss up to that step, never one from steps before.
            control.should_log = True
        return control

    def _agree_to_stop(self, step: int) -> bool:
        # The parent passes a stop on as a file; a parent that vanished gets the same treatment.
        orphaned = _parent_gone()
        if orphaned and not self.orphaned:
            self.orphaned = True
            rank = os.environ.get("RANK", "0")
            print(f"rank {rank}: the parent process is gone: saving a checkpoint and stopping", flush=True)
        stop, interval = _agree_with_next(
            self.folder.stop_requested() or orphaned or _signalled(), self.checks.proposal(step)
        )
        self.checks.agreed(step, interval)
        return stop

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not self.events:
            return
        row = {k: v for k, v in logs.items() if isinstance(v, int | float)}
        tokens = row.get("num_tokens")
        if tokens is not None:
            now = time.time()
            if self.last_tokens and now > self.last_tokens[0]:
                row["tokens_per_second"] = (tokens - self.last_tokens[1]) / (now - self.last_tokens[0])
            self.last_tokens = (now, tokens)
        self.emit(Logged(step=state.global_step, max_steps=state.max_steps, metrics=row))


class Publisher(TrainerCallback):
    """Moves each save from the staging folder into the checkpoints folder in one rename, once every rank has
    written its part (checkpoints.py), and tells the parent (which lists it for the host)."""

    def __init__(self, spec: RunSpec, folder: RunFolder, reporter: Reporter, is_world_main: bool, is_local_main: bool):
        self.spec = spec
        self.folder = folder
        self.reporter = reporter
        self.is_world_main = is_world_main
        self.is_local_main = is_local_main

    def _publish(self, args, state) -> None:
        staged = os.path.join(args.output_dir, f"{checkpoints.PREFIX}{state.global_step}")
        if not os.path.isdir(staged):
            return
        final = checkpoints.publish(staged, self.spec.checkpoint_dir, self.folder.identity_file)
        checkpoints.rotate(self.spec.checkpoint_dir, self.spec.training.save_total_limit, args.world_size)
        self.reporter.emit(CheckpointSaved(step=state.global_step, path=final))

    def on_save(self, args, state, control, **kwargs):
        _agree(False)  # a barrier: every rank has written its part of the save
        if self.is_world_main:
            self._publish(args, state)
        _agree(False)
        if self.is_local_main and not self.is_world_main:
            # Another node whose staging folder is its own (no shared filesystem): its part stays on this node.
            self._publish(args, state)


_STOP_GROUP = None


def _largest(values: list[int]) -> list[int]:
    """Each value's largest over every rank: one small all-reduce. It runs over a CPU (gloo) group even when training
    uses NCCL, so it never waits for the GPU's queue."""
    global _STOP_GROUP
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    import torch

    if _STOP_GROUP is None:
        # Created by every rank at the same call (the first check, at train begin).
        _STOP_GROUP = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    tensor = torch.tensor(values)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_STOP_GROUP)
    return tensor.tolist()


def _agree(flag: bool) -> bool:
    """True on every rank when any rank says so (every rank calls it at the same point: also a barrier)."""
    return bool(_largest([int(flag)])[0])


def _agree_with_next(flag: bool, steps: int) -> tuple[bool, int]:
    """Whether any rank says stop, and the fewest steps any rank proposes until the next check: in the same
    collective, so every rank knows the step of the next one."""
    stop, fewest = _largest([int(flag), -steps])
    return bool(stop), -fewest


def _final_loss(history: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    train = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    return (train[-1] if train else None, evals[-1] if evals else None)


def import_libraries() -> None:
    """What every run trains with, beyond this module's own imports (rank.import_libraries times them)."""
    import datasets  # noqa: F401
    from trl import SFTTrainer  # noqa: F401


def _wait_for_spec(folder: RunFolder) -> RunSpec | None:
    """The run's spec, which the parent writes once the data is prepared and the job is open; None when the
    parent is gone first (it ends waiting ranks itself when the run ends before training)."""
    while not folder.has_spec():
        if _parent_gone():
            return None
        time.sleep(0.02)
    return folder.read_spec()


def train(folder: RunFolder) -> int:
    marks = {"rank_started": process_start()}  # absolute times; the parent makes them relative
    from datasets import load_from_disk
    from trl import SFTTrainer

    marks["libraries_imported"] = time.time()
    spec = _wait_for_spec(folder)
    if spec is None:
        return 0
    marks["spec_read"] = time.time()

    data = load_from_disk(spec.prepared_path)  # memory-mapped: ranks share the page cache
    tokenizer = load_tokenizer(spec.model_name)  # as the parent loaded it to prepare the rows
    args = _sft_config(spec)
    is_world_main = args.process_index == 0
    reporter = Reporter(folder, is_main=args.local_process_index == 0)
    publisher = Publisher(spec, folder, reporter, is_world_main, args.local_process_index == 0)
    model = _load_model(spec)
    marks["model_loaded"] = time.time()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data.get("eval"),
        processing_class=tokenizer,
        peft_config=_peft_config(spec, model),
        callbacks=[reporter, publisher],
    )
    # Each logged step reaches the log once, as the parent's line; the trainer would print its raw dict too.
    trainer.remove_callback(PrinterCallback)
    if spec.training_mode == "qlora":
        _adapters_in_fp32(trainer.model)
    marks["trainer_ready"] = time.time()
    reporter.marks = marks
    started = time.time()
    try:
        trainer.train(resume_from_checkpoint=spec.resume_from)
    except StoppedBeforeTraining:
        reporter.emit(Stopped(step=0))
        return 0
    runtime = time.time() - started
    state = trainer.state
    if reporter.stopped:
        reporter.emit(Stopped(step=state.global_step))
        return 0
    final_loss, eval_loss = _final_loss(state.log_history)
    staging = spec.adapter_staging
    if spec.weights_precision != spec.precision and spec.strategy == "ddp":
        # The fp32 weights were the optimizer's master copy; the model is published in the precision it trained in.
        trainer.model.to(_dtype(spec.precision))
    trainer.save_model(staging)  # every rank takes part (sharded strategies gather); rank 0 writes
    peak_memory = _peak_gpu_memory_mib()  # the training's: the sample answers below load and generate on rank 0 alone
    if is_world_main:
        tokenizer.save_pretrained(staging)
        if spec.sample_generations:
            # The other ranks go on to their end meanwhile: generating takes no collective.
            reporter.emit(sample_answers(spec, data, tokenizer, trainer.model))
    if spec.fuse_model and is_world_main:
        del trainer
        merge_adapter(spec, staging, tokenizer)
    history = tuple({"step": h["step"], "loss": h["loss"]} for h in state.log_history if "loss" in h and "step" in h)
    reporter.emit(
        Done(
            step=state.global_step,
            max_steps=state.max_steps,
            world_size=args.world_size,
            final_loss=final_loss,
            eval_loss=eval_loss,
            runtime=runtime,
            has_adapter=is_world_main,
            peak_gpu_memory_mib=peak_memory,
            loss_history=history,
        )
    )
    return 0


def _peak_gpu_memory_mib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


# Strategies that shard the weights over the ranks: no rank holds the whole trained model in memory.
SHARDED = ("fsdp", "deepspeed_zero3")


def sample_answers(spec: RunSpec, data, tokenizer, trained) -> Sampled:
    """The trained model's greedy answers to a few held-out prompts (samples.py), made by the first rank once the
    adapter is saved. A model sharded over the ranks is loaded again, whole, from what was just saved; any other
    is answered in memory. Whatever goes wrong here is a note for one warning, never the run's failure."""
    try:
        rows, source = samples.held_out(data, spec.sample_generations)
        prompts = samples.prompts_of(rows, set(tokenizer.all_special_ids))
        if not prompts:
            note = "none: no row has a prompt (every token is trained: text rows, or completion-only loss off)"
            return Sampled(samples=(), note=note)
        model = _whole_model(spec) if spec.strategy in SHARDED else trained
        answers = samples.answer(model, tokenizer, prompts, spec.max_length)
        return Sampled(samples=tuple(samples.records(tokenizer, prompts, answers)), note=source)
    except Exception as exc:
        return Sampled(samples=(), note=f"{type(exc).__name__}: {exc}".strip(), failed=True)


def _whole_model(spec: RunSpec):
    """The trained model as saved, on this rank's device: the base (4-bit for QLoRA, as trained) with the adapter,
    or the fully trained model itself."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": _dtype(spec.precision)}
    if spec.training_mode == "qlora":
        kwargs.update(_quantization(spec))
    if spec.training_mode == "full":
        model = AutoModelForCausalLM.from_pretrained(spec.adapter_staging, **kwargs)
    else:
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(spec.model_name, **kwargs), spec.adapter_staging
        )
    if spec.training_mode != "qlora" and spec.device == "cuda":
        model.to(f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
    return model


def merge_adapter(spec: RunSpec, adapter_dir: str, tokenizer) -> None:
    """Write the base model with the adapter merged in. The base is reloaded unquantized on the CPU: a
    4-bit (QLoRA) base cannot hold merged weights, and the GPUs may still be busy."""
    import gc

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    gc.collect()
    base = AutoModelForCausalLM.from_pretrained(spec.model_name, dtype=_dtype(spec.merged_precision))
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(spec.merged_staging)
    tokenizer.save_pretrained(spec.merged_staging)


def main(argv: list[str] | None = None) -> int:
    folder = RunFolder((argv or sys.argv[1:])[0])
    _watch_stop_signals(folder)
    rank = int(os.environ.get("RANK", "0"))
    try:
        return train(folder)
    except BaseException as exc:
        folder.write_error(rank, f"{type(exc).__name__}: {exc}".strip(), traceback.format_exc())
        raise
