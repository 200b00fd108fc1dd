"""What a lab SDK job's Artifacts hold of the trained model: what `lab job download` and the job page's Artifacts
pane give (TransformerLab 0.40). The model itself is registered in the job's models, which `lab job download`
does not fetch; the artifacts get `<name>.zip`, holding the whole adapter when it is small, else its card and where
its weights are.

One zip file rather than a folder: TransformerLab 0.40.1 lists a job's artifacts through the SDK, which lists files
only, and serves a folder alone only where the job's record names an artifacts_dir, which the SDK never writes; a
file is listed, previewed by name, downloaded alone (`lab job download <job> --file <name>.zip`) and zipped with
the rest. Stored, not compressed: weights do not compress, and the server zips the artifacts again.

Why a bound: the server builds `lab job download`'s zip in its memory, reading every file whole, and a copy in the
artifacts doubles the model's disk use. An adapter is tens to hundreds of megabytes (rank 64 on every linear layer
of an 8B model: about 670 MB in float32); a fully trained or merged model is the base model's size, gigabytes. So
a LoRA adapter up to WHOLE_BOUND goes in whole, and anything else without its weights, with WHERE.md, which says
where they are and how to fetch them.
"""

from __future__ import annotations

import os
import posixpath
import shutil

WHOLE_BOUND = 1 << 30  # bytes: the largest adapter copied whole into a job's artifacts
ADAPTER_CONFIG = "adapter_config.json"  # what PEFT writes beside an adapter's weights
POINTER_FILE = "WHERE.md"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")


def folder_bytes(path: str) -> int:
    """The size of every file under `path`."""
    return sum(os.path.getsize(os.path.join(root, name)) for root, _dirs, files in os.walk(path) for name in files)


def is_adapter(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def copied_whole(adapter: bool, size: int) -> bool:
    """Whether a model goes into the artifacts whole: a LoRA adapter of at most WHOLE_BOUND bytes."""
    return adapter and size <= WHOLE_BOUND


def is_weights(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES)


def archive(path: str, name: str, *, weights: bool) -> str:
    """`<name>.zip` of the model folder at `path`, its files under `<name>/` (without the weight files unless
    `weights`), in a new temporary folder beside `path` (the caller removes it): on the output's disk, not /tmp."""
    import tempfile  # with zipfile, 10 ms that `--check` never needs
    import zipfile

    spare = tempfile.mkdtemp(prefix=".artifact-", dir=os.path.dirname(os.path.abspath(path)))
    target = os.path.join(spare, f"{name}.zip")
    try:
        with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED, allowZip64=True) as bundle:
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for file in sorted(files):
                    if weights or not is_weights(file):
                        full = os.path.join(root, file)
                        bundle.write(full, posixpath.join(name, *os.path.relpath(full, path).split(os.sep)))
    except BaseException:  # a full disk, say: no half-written zip left beside the model
        shutil.rmtree(spare, ignore_errors=True)
        raise
    return target


def add_text(bundle: str, name: str, file: str, text: str) -> None:
    """`<name>/<file>` added to the zip `bundle`."""
    import zipfile

    with zipfile.ZipFile(bundle, "a", zipfile.ZIP_STORED, allowZip64=True) as opened:
        opened.writestr(posixpath.join(name, file), text)


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
        "This zip holds the files beside the weights: the model card (README.md), the configs, the tokenizer, the"
        " loss curve and the sample answers.",
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
