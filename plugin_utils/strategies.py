"""Distributed strategies: the accelerate launcher's config and the generated DeepSpeed config.

Every launch of two or more processes (and FSDP, even with one) gets an accelerate config file written into the
run folder and passed with `--config_file`: accelerate then never reads a user's saved default config
(`~/.cache/huggingface/accelerate/default_config.yaml`), whose `gpu_ids`, `num_processes` or `mixed_precision` would
otherwise override the plan's, or refuse the launch.

- ddp: `MULTI_GPU` (a full model copy per process; the right choice for LoRA). On the CPU the ranks form one gloo
  group (`use_cpu`).
- fsdp: an FSDP2 config (parameters, gradients and optimizer state sharded).
- deepspeed_zero2 / deepspeed_zero3: `MULTI_GPU` processes, and a DeepSpeed config handed to the training arguments.
"""

from __future__ import annotations

import json
from typing import Any

from .runfolder import ACCELERATE_CONFIG, DEEPSPEED_CONFIG, RunFolder


def mixed_precision(plan) -> str:
    return {"bf16": "bf16", "fp16": "fp16"}.get(plan.precision, "no")


def launched_by_accelerate(plan) -> bool:
    """Whether the ranks start through `accelerate launch` (else one plain Python process)."""
    return plan.world_size > 1 or plan.strategy == "fsdp"


def accelerate_config(plan, port: int) -> dict[str, Any]:
    """The whole launcher configuration: every key accelerate would otherwise take from a saved default config."""
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "FSDP" if plan.strategy == "fsdp" else "MULTI_GPU",
        "num_processes": plan.world_size,
        "num_machines": plan.num_machines,
        "machine_rank": plan.machine_rank,
        "main_process_ip": plan.main_process_ip or None,
        "main_process_port": port,
        "mixed_precision": mixed_precision(plan),
        "use_cpu": plan.device == "cpu",
        # The plan's GPUs are this process's CUDA_VISIBLE_DEVICES already; "all" leaves it as it is.
        "gpu_ids": "all",
        "rdzv_backend": "static",
        "same_network": True,
        "dynamo_config": {"dynamo_backend": "NO"},
    }
    if plan.strategy == "fsdp":
        config["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_reshard_after_forward": True,
            "fsdp_offload_params": False,
            "fsdp_cpu_ram_efficient_loading": True,
            # A full state dict on rank 0: adapters and checkpoints save as in a single-process run.
            "fsdp_state_dict_type": "FULL_STATE_DICT",
            # FSDP checkpoints activations itself; the Trainer's own checkpointing is then turned off.
            "fsdp_activation_checkpointing": plan.gradient_checkpointing,
        }
    return config


def deepspeed_config(plan) -> dict[str, Any]:
    stage = 3 if plan.strategy == "deepspeed_zero3" else 2
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if stage == 3:
        zero.update(
            stage3_prefetch_bucket_size="auto",
            stage3_param_persistence_threshold="auto",
            # Saving an adapter or model needs the full weights gathered on rank 0.
            stage3_gather_16bit_weights_on_model_save=True,
        )
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }


def write_configs(folder: RunFolder, plan, port: int) -> dict[str, str]:
    """Write what the launch and the strategy need into the run folder; returns {'accelerate'|'deepspeed': path}."""
    written = {}
    if launched_by_accelerate(plan):
        written["accelerate"] = folder.file(ACCELERATE_CONFIG)
        with open(written["accelerate"], "w") as handle:
            json.dump(accelerate_config(plan, port), handle, indent=2)
    if plan.strategy.startswith("deepspeed"):
        written["deepspeed"] = folder.file(DEEPSPEED_CONFIG)
        with open(written["deepspeed"], "w") as handle:
            json.dump(deepspeed_config(plan), handle, indent=2)
    return written
