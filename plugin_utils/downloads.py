"""What a lab SDK job's Artifacts hold of the trained model: what `lab job download` and the job page's Artifacts
pane give (TransformerLab 0.40). The model itself is registered in the job's models, which `lab job download`
does not fetch; the artifacts get the whole adapter when it is small, else its card and where its weights are.

Why a bound: TransformerLab builds `lab job download`'s zip in the API server's memory, reading every file whole,
and a copy in the artifacts doubles the model's disk use. An adapter is tens to hundreds of megabytes (rank 64
on every linear layer of an 8B model: about 670 MB in float32); a fully trained or merged model is the base
model's size, gigabytes. So a LoRA adapter up to WHOLE_BOUND is copied whole, and anything else gets a folder of
the same name with the files beside the weights (the card, the configs, the tokenizer, the loss curve, the sample
answers) and WHERE.md, which says where the weights are and how to fetch them.
"""

from __future__ import annotations

import os
import shutil
import tempfile

WHOLE_BOUND = 1 << 30  # bytes: the largest adapter copied whole into a job's artifacts
ADAPTER_CONFIG = "adapter_config.json"  # what PEFT writes beside an adapter's weights
POINTER_FILE = "WHERE.md"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")


def folder_bytes(path: str) -> int:
    """The size of every file under `path`."""
    return sum(os.path.getsize(os.path.join(root, name)) for root, _dirs, files in os.walk(path) for name in files)


def copied_whole(path: str) -> bool:
    """Whether the model at `path` goes into the artifacts whole: a LoRA adapter of at most WHOLE_BOUND bytes."""
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG)) and folder_bytes(path) <= WHOLE_BOUND


def is_weights(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES)


def without_weights(path: str) -> str:
    """A new temporary folder holding the files of `path` that are not weights, at the same relative paths (the
    caller removes it)."""
    spare = tempfile.mkdtemp(prefix="sft-artifact-")
    for root, _dirs, files in os.walk(path):
        for name in files:
            if is_weights(name):
                continue
            relative = os.path.relpath(os.path.join(root, name), path)
            os.makedirs(os.path.dirname(os.path.join(spare, relative)), exist_ok=True)
            shutil.copy2(os.path.join(root, name), os.path.join(spare, relative))
    return spare


def size_text(size: int) -> str:
    return f"{size / (1 << 30):.1f} GiB" if size >= 1 << 30 else f"{size / (1 << 20):.1f} MiB"


def pointer_text(name: str, size: int, adapter: bool, saved: str, job_id: str, *, in_job: bool) -> str:
    """WHERE.md: why the weights are not here, where they are, and how to fetch them. `in_job`: the model was
    moved into the job's models (a task's job), else it stays where the run wrote it (a headless run)."""
    if adapter:
        why = (
            f"The adapter is {size_text(size)}, more than the {size_text(WHOLE_BOUND)} that a job's artifacts hold"
            " whole (TransformerLab builds `lab job download`'s zip in its server's memory)."
        )
    else:
        why = f"This is a whole model ({size_text(size)}): a copy among the job's artifacts would double its disk use."
    lines = [
        f"# {name}: where its weights are",
        "",
        why,
        "This folder holds the files beside the weights: the model card (README.md), the configs, the tokenizer,"
        " the loss curve and the sample answers.",
        "",
        f"The weights: `{saved}`",
        "",
    ]
    if in_job:
        lines += [
            "They are this job's model, on the job page's Models. To fetch them with TransformerLab's CLI, publish"
            " the model, then download it (`lab model list` shows its id):",
            "",
            "```",
            f"lab job publish model {job_id} {os.path.basename(saved.rstrip('/'))}",
            "lab model download <model id> <folder>",
            "```",
        ]
    else:
        lines.append("They are on the machine that ran the training, where the run's output_dir put them.")
    return "\n".join(lines) + "\n"
