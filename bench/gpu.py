"""GPU checks and throughput (run by hand on a GPU machine; `bench/gpu.sh` wraps it and carries the packages).

No downloads: a Qwen2-shaped model of about 0.5B parameters is built from a config with random weights, with a
byte-level BPE tokenizer trained on the spot, and synthetic prompt/completion rows of up to 2048 tokens.

First a preflight: every package the arms need imports, at a release its dependents accept; it stops at once,
naming what is missing, rather than spending the GPU's minutes on arms that fail one by one.

Then the arms, each `python main.py --config ...` as a user runs it, on one GPU:
- throughput, one epoch each: the plugin's defaults (bf16 LoRA; the attention, packing, checkpointing and Liger
  they chose), the same with gradient checkpointing the other way, `trl sft` on the same model, data and dtype,
  and the defaults without Liger or flash-attention when those are installed;
- paths only a GPU runs, a few steps each: QLoRA in bf16 and in fp16, full fine-tuning in fp16 (the loss scaler
  once raised "Attempting to unscale FP16 gradients") and in bf16 (fp32 master weights), DeepSpeed ZeRO-3 with
  one process (DeepSpeed once went looking for mpi4py).
Each arm prints tokens/s, the peak memory torch allocated against the plugin's estimate for that run, nvidia-smi's
peak, MFU, and what the run chose; a failed arm prints its error and the rest go on.

    python bench/gpu.py [--rows 400] [--steps 20] [--smoke] [--preflight]

--smoke runs the same arms with a tiny model on the CPU (the GPU-only ones are refused there, by validation): it
checks the script, not speed. --preflight stops after the package checks.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import train_runtime, trl_available, trl_sft_command  # noqa: E402

# Dense bf16 peaks (FLOP/s). An "H100 PCIe" also contains "H100", so the longer names come first.
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100": 989.4e12,
    "H200": 989.4e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10": 125e12,
}
WORDS = [f"w{i}" for i in range(3000)]
BATCH = 4
GIB = 2**30

# import name -> distribution, and whether the arms can run without it.
PACKAGES = [
    ("torch", "torch", True),
    ("transformers", "transformers", True),
    ("trl", "trl", True),
    ("peft", "peft", True),
    ("accelerate", "accelerate", True),
    ("datasets", "datasets", True),
    ("tokenizers", "tokenizers", True),
    ("huggingface_hub", "huggingface_hub", True),
    ("safetensors", "safetensors", True),
    ("lab", "transformerlab", True),
    ("bitsandbytes", "bitsandbytes", False),
    ("liger_kernel", "liger-kernel", False),
    ("deepspeed", "deepspeed", False),
    ("flash_attn", "flash-attn", False),
]
# Distributions whose own requirements are checked against what is installed (the lab SDK lists much it never
# imports: it is checked by importing it).
CHECKED = ("transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "liger-kernel", "deepspeed")
# Older releases than asked that the arms work with: datasets 5.2 asks for pyarrow 24 but takes a pyarrow-24 branch
# only for parquet files, and the arms read JSONL (bench/gpu.sh --dry-run runs them on pyarrow 23). pyarrow's wheel
# (47 MiB) would not fit the device's 64 MiB carry beside the others.
TOLERATED = {"pyarrow"}


def unmet_requirements(distribution: str) -> list[tuple[str, str]]:
    """(name, what is wrong) of each requirement of an installed distribution the installed packages do not meet."""
    from packaging.requirements import Requirement

    unmet = []
    for line in importlib.metadata.distribution(distribution).requires or []:
        requirement = Requirement(line)
        if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
            continue
        try:
            have = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            unmet.append((requirement.name, f"{requirement} (not installed)"))
            continue
        if requirement.specifier and not requirement.specifier.contains(have, prereleases=True):
            unmet.append((requirement.name, f"{requirement} (found {have})"))
    return unmet


def preflight() -> set[str]:
    """Import every package and check the requirements of the plugin's own; returns the optional packages that
    are usable. Exits with the list of problems when a required one is not."""
    problems, usable = [], set()
    for module, distribution, required in PACKAGES:
        try:
            importlib.import_module(module)
            version = importlib.metadata.version(distribution)
        except Exception as exc:  # an ImportError, or what a package raises while checking its own dependencies
            line = f"{module}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            print(f"  {'MISSING' if required else 'absent '} {line}", flush=True)
            if required:
                problems.append(line)
            continue
        usable.add(module)
        unmet = unmet_requirements(distribution) if distribution in CHECKED else []
        shown = "; unmet: " + ", ".join(what for _, what in unmet) if unmet else ""
        print(f"  ok      {module} {version}{shown}", flush=True)
        if required:
            problems += [f"{distribution} needs {what}" for name, what in unmet if name not in TOLERATED]
    if problems:
        print("preflight failed; carry these in .whl (bench/gpu.sh --fetch-wheels) and rerun:", *problems, sep="\n  ")
        sys.exit(2)
    return usable


def build_model(path: Path, smoke: bool) -> dict:
    """A Qwen2.5-0.5B-shaped model (or a tiny one for --smoke) and a tokenizer, saved to `path`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(50)) for _ in range(2000)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=4000, special_tokens=["<|endoftext|>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    shape = (
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 4096,
        }
        if smoke
        else {
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "vocab_size": 151936,
        }
    )
    config = Qwen2Config(
        **shape,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    model = Qwen2ForCausalLM(config).to(torch.bfloat16 if not smoke else torch.float32)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return {"params": sum(p.numel() for p in model.parameters()), **shape}


def make_rows(path: Path, rows: int, max_words: int, prompt_words: int = 40) -> None:
    """Prompt/completion rows whose lengths spread evenly up to about the sequence length, so that padding
    and packing matter as they do on real SFT data."""
    rng = random.Random(1)
    with path.open("w") as handle:
        for _ in range(rows):
            prompt = " ".join(rng.choice(WORDS) for _ in range(prompt_words))
            completion = " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(max_words // 16, max_words)))
            handle.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")


class GpuMemory:
    """Peak memory.used over the run, from nvidia-smi every 0.2 s (CUDA context included)."""

    def __init__(self, active: bool) -> None:
        self.peak = 0
        self.active = active and shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout
                self.peak = max(self.peak, max(int(v) for v in out.split()))
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            self._stop.wait(0.2)

    def __enter__(self) -> GpuMemory:
        if self.active:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.active:
            self._thread.join()


class Bench:
    """The model, the data and the settings every arm shares."""

    def __init__(self, tmp: Path, smoke: bool, rows: int, steps: int):
        self.tmp, self.smoke, self.steps = tmp, smoke, steps
        self.seq = 128 if smoke else 2048
        self.model = tmp / "model"
        self.shape = build_model(self.model, smoke)
        data_dir = tmp / "data"
        data_dir.mkdir()
        self.data = data_dir / "train.jsonl"
        self.rows = 32 if smoke else rows
        make_rows(self.data, rows=self.rows, max_words=80 if smoke else 1500, prompt_words=8 if smoke else 40)

    def config(self, **overrides) -> dict:
        return {
            "model_name": str(self.model),
            "dataset_name": str(self.data),
            "adaptor_name": "bench",
            "output_dir": str(self.tmp / f"out-{time.time_ns()}"),
            "num_train_epochs": 1,
            "maximum_sequence_length": self.seq,
            "logging_steps": 5,
            "save_steps": 100000,
            "num_processes": 1,
            "train_device": "cpu" if self.smoke else "cuda",
            "batch_size": BATCH,
            "gradient_accumulation_steps": 1,
            "learning_rate": 2e-4,
            "lora_r": 16,
            "lora_alpha": 32,
            **overrides,
        }

    def estimate_gib(self, config: dict, plan: dict) -> float | None:
        """The plugin's own memory estimate for this run, with the checkpointing it chose."""
        from plugin_utils import params, speed

        p = params.read(config, headless=True).params
        shape = json.loads((self.model / "config.json").read_text())
        needed = speed.estimate_memory(
            shape,
            p,
            precision=plan["precision"],
            world_size=1,
            checkpointing=plan["speed"]["gradient_checkpointing"],
            device=plan["device"],
        )
        return needed / GIB if needed else None

    def plugin(self, hide: str = "", **overrides) -> dict:
        """One run of the plugin, headless; `hide` lists packages the plugin must treat as missing."""
        config = self.config(**overrides)
        path = self.tmp / "run.json"
        path.write_text(json.dumps(config))
        env = {**os.environ, "SFT_TRAINER_DISABLE": hide}
        proc = subprocess.run(
            [sys.executable, str(ROOT / "main.py"), "--config", str(path)], capture_output=True, text=True, env=env
        )
        started = next((line for line in proc.stderr.splitlines() if "training started:" in line), "")
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
            errors = [re.split(r"\] (?:error|training failed): ", line, maxsplit=1)[-1] for line in lines]
            errors = [e for e, line in zip(errors, lines, strict=True) if e != line]
            why = "; ".join(errors) or (lines[-1] if lines else f"exit {proc.returncode}")
            return {"error": why, "started": started}
        out = Path(config["output_dir"])
        summary = json.loads((out / "bench" / "training_summary.json").read_text())
        shutil.rmtree(out, ignore_errors=True)
        plan = summary["plan"]
        speed = plan["speed"]
        return {
            "seconds": summary["runtime_seconds"],
            "tokens": summary["dataset"]["total_tokens"] if config.get("max_steps", -1) < 0 else None,
            "steps": summary["steps"],
            "final_loss": summary["final_loss"],
            "peak_allocated_gib": (summary.get("peak_gpu_memory_mib") or 0) / 1024 or None,
            "estimate_gib": self.estimate_gib(config, plan),
            "started": started,
            "checkpointing": speed["gradient_checkpointing"],
            "settings": f"{speed['attention']}, packing {'on' if speed['packing'] else 'off'}, checkpointing "
            f"{'on' if speed['gradient_checkpointing'] else 'off'}, liger {'on' if speed['liger'] else 'off'}, "
            f"weights {plan.get('weights_precision', plan['precision'])} / compute {plan['precision']}",
        }

    def trl(self, tokens: int, like: dict) -> dict:
        """One epoch of `trl sft` with the same LoRA settings, weights in bf16 as the plugin loads them, and the
        plugin arm's attention kernel, packing and checkpointing."""
        if not trl_available():
            return {"error": "trl is not installed"}
        settings = like.get("settings", "")
        extra = []
        if settings.startswith("flash_attention_2"):
            extra += ["--attn_implementation", "flash_attention_2"]
        if "packing on" in settings:
            extra += ["--packing", "true"]
        cmd = trl_sft_command(
            str(self.model),
            str(self.data.parent),
            str(self.tmp / f"trl-{time.time_ns()}"),
            max_length=self.seq,
            learning_rate=2e-4,
            batch=BATCH,
            cpu_ranks=1 if self.smoke else 0,
            checkpointing=bool(like.get("checkpointing")),
            logging_steps=5,
            extra=extra,
        )
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = train_runtime(proc.stdout + proc.stderr)
        if proc.returncode != 0 or seconds is None:
            return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
        return {"seconds": seconds, "tokens": tokens, "settings": f"trl sft --dtype {cmd[cmd.index('--dtype') + 1]}"}


def flops_per_token(shape: dict, seq: int, full: bool) -> float:
    """Training FLOPs per token: forward 2N, backward 4N when every weight gets a gradient (full), 2N when only the
    adapters do (LoRA: frozen weights need activation gradients only), plus attention, as if unpacked."""
    return (6 if full else 4) * shape["params"] + 12 * shape["num_hidden_layers"] * shape["hidden_size"] * seq


def report(name: str, result: dict, bench: Bench, peak_flops: float | None, memory: int | None) -> None:
    if "error" in result:
        print(f"{name:46s} FAILED: {result['error'][:200]}", flush=True)
        return
    parts = [f"{name:46s}"]
    if result.get("tokens"):
        tokens_per_s = result["tokens"] / result["seconds"]
        parts.append(f"{tokens_per_s:9.0f} tok/s")
        if peak_flops:
            full = "full" in name
            mfu = 100 * tokens_per_s * flops_per_token(bench.shape, bench.seq, full) / peak_flops
            parts.append(f"MFU {mfu:4.1f}%")
    else:
        parts.append(f"{result.get('steps', '?')} steps, final loss {result.get('final_loss')}")
    parts.append(f"{result['seconds']:6.1f} s")
    if result.get("peak_allocated_gib"):
        estimate = result.get("estimate_gib")
        shown = f" vs estimate {estimate:5.1f} GiB" if estimate else ""
        parts.append(f"peak allocated {result['peak_allocated_gib']:5.1f} GiB{shown}")
    if memory:
        parts.append(f"nvidia-smi {memory / 1024:5.1f} GiB")
    if result.get("settings"):
        parts.append(f"[{result['settings']}]")
    print("  ".join(parts), flush=True)
    trained = re.search(r"; (.*trainable parameters.*)$", result.get("started", ""))
    if trained:
        print(f"{'':46s}  {trained.group(1)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--steps", type=int, default=20, help="steps of each arm that checks a GPU-only path")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--preflight", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print("preflight:", flush=True)
    usable = preflight()
    if args.preflight:
        return
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        os.environ.setdefault("TFL_HOME_DIR", str(tmp))
        os.environ["SFT_PREPARED_CACHE"] = str(tmp / "prepared")
        bench = Bench(tmp, args.smoke, args.rows, args.steps)
        peak_flops, device = None, "cpu (smoke)"
        if not args.smoke:
            import torch

            device = torch.cuda.get_device_name(0)
            peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in device), None)
        optional = sorted(usable & {"bitsandbytes", "liger_kernel", "deepspeed", "flash_attn"})
        print(
            f"{device}: model {bench.shape['params'] / 1e6:.0f}M parameters, {bench.rows} rows of up to {bench.seq} "
            f"tokens, batch {BATCH}, LoRA r=16 all-linear; throughput arms train one epoch, the others "
            f"{args.steps} steps; optional packages usable: {', '.join(optional) or 'none'}",
            flush=True,
        )

        def missing(package: str):
            return lambda: {"error": f"{package} is not installed"}

        def plugin(**kw):
            return lambda: bench.plugin(**kw)

        def few_steps(**kw):
            return plugin(max_steps=args.steps, logging_steps=5, save_steps=args.steps, **kw)

        with GpuMemory(not args.smoke) as memory:
            defaults = bench.plugin()
        report("plugin defaults (auto), LoRA", defaults, bench, peak_flops, memory.peak)
        tokens = defaults.get("tokens") or 0
        flipped = "false" if defaults.get("checkpointing") else "true"
        arms = [
            (f"plugin, gradient checkpointing {flipped} (auto's other choice)", plugin(gradient_checkpointing=flipped)),
            ("trl sft, the same settings", lambda: bench.trl(tokens, defaults)),
            (
                "plugin defaults without liger kernels",
                plugin(hide="liger_kernel") if "liger_kernel" in usable else missing("liger-kernel"),
            ),
            (
                "plugin defaults without flash-attention",
                plugin(hide="flash_attn") if "flash_attn" in usable else missing("flash-attn"),
            ),
            ("qlora, bf16", few_steps(training_mode="qlora", precision="bf16")),
            ("qlora, fp16 (as on GPUs before Ampere)", few_steps(training_mode="qlora", precision="fp16")),
            ("full, fp16", few_steps(training_mode="full", precision="fp16", learning_rate=1e-5)),
            ("full, bf16 (fp32 master weights)", few_steps(training_mode="full", precision="bf16", learning_rate=1e-5)),
            (
                "deepspeed_zero3, one process",
                few_steps(distributed_strategy="deepspeed_zero3") if "deepspeed" in usable else missing("deepspeed"),
            ),
        ]
        for name, arm in arms:
            with GpuMemory(not args.smoke) as memory:
                result = arm()
            report(name, result, bench, peak_flops, memory.peak)


if __name__ == "__main__":
    main()
