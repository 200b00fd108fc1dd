"""What the benchmarks share: the `trl sft` command they compare the plugin with, and reading its result."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

from plugin_utils.launch import free_port


def trl_available() -> bool:
    return Path(sys.executable).with_name("trl").exists() or importlib.util.find_spec("trl") is not None


def trl_sft_command(
    model: str,
    data_dir: str,
    output_dir: str,
    *,
    max_length: int,
    learning_rate: float,
    batch: int = 4,
    steps: int | None = None,
    cpu_ranks: int = 0,
    checkpointing: bool = False,
    logging_steps: int = 10,
    dtype: str | None = None,
    extra: tuple[str, ...] | list[str] = (),
) -> list[str]:
    """`trl sft` with the LoRA settings every benchmark uses (r=16, alpha 32, dropout 0.05, all-linear, linear
    schedule, no saving), `batch` rows per process. `steps` None trains one epoch. `cpu_ranks` > 0 runs that many
    CPU processes (from 2 on, in one gloo group launched on a port of its own: back-to-back runs on the
    default 29500 hung once); 0 runs one bf16 GPU process. `dtype` is what the weights load in (`trl sft` loads
    float32 unless told; the plugin loads LoRA's base in the training precision): bfloat16 on the GPU by default.
    On the CPU both compute in fp32."""
    dtype = dtype or ("float32" if cpu_ranks else "bfloat16")
    trl = Path(sys.executable).with_name("trl")
    launch = ["--multi_gpu", "--num_processes", str(cpu_ranks), "--main_process_port", str(free_port())]
    return [
        # Without its console script beside this Python (installed with --target, as bench/gpu.sh does), its entry
        # point is called directly: trl.cli is a package with no __main__.
        *([str(trl)] if trl.exists() else [sys.executable, "-c", "import sys, trl.cli; sys.exit(trl.cli.main())"]),
        "sft",
        *(launch if cpu_ranks > 1 else []),
        "--model_name_or_path",
        model,
        "--dataset_name",
        data_dir,
        "--use_peft",
        "--lora_r",
        "16",
        "--lora_alpha",
        "32",
        "--lora_dropout",
        "0.05",
        "--lora_target_modules",
        "all-linear",
        "--per_device_train_batch_size",
        str(batch),
        "--gradient_accumulation_steps",
        "1",
        "--learning_rate",
        str(learning_rate),
        "--lr_scheduler_type",
        "linear",
        *(["--max_steps", str(steps)] if steps else ["--num_train_epochs", "1"]),
        "--max_length",
        str(max_length),
        "--logging_steps",
        str(logging_steps),
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--gradient_checkpointing",
        "true" if checkpointing else "false",
        "--output_dir",
        output_dir,
        "--dtype",
        dtype,
        # On the CPU, TRL's SFTConfig computes in bf16 unless told not to (bf16 defaults to "not fp16"): an autocast
        # that a CPU without bf16 instructions emulates, about 4x slower per step here. The plugin plans fp32 there.
        *(["--use_cpu", "--bf16", "false"] if cpu_ranks else ["--bf16"]),
        *extra,
    ]


def train_runtime(output: str) -> float | None:
    """The trainer's own train_runtime from `trl sft` output (quoted or not, by transformers version)."""
    found = re.findall(r"'train_runtime': '?([0-9.]+)", output)
    return float(found[-1]) if found else None
