"""GPU throughput benchmark (run by hand on a GPU machine; `bench/gpu.sh` wraps it).

No downloads: a Qwen2-shaped model of about 0.5B parameters is built from a config with random weights,
with a byte-level BPE tokenizer trained on the spot, and synthetic prompt/completion rows whose tokens
fill 2048-token sequences. Every arm trains the same number of steps on one GPU and reports tokens/s,
peak GPU memory (nvidia-smi, CUDA context included, the same for every arm) and MFU
(6·N + 12·layers·hidden·seq FLOPs per token against the card's dense bf16 peak).

    python bench/gpu.py [--steps 20] [--smoke]

--smoke runs the same arms with a tiny model on the CPU for a few steps: it checks the script, not speed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
WORDS = [f"w{i}" for i in range(3000)]


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


def make_rows(path: Path, rows: int, words: int, prompt_words: int = 40) -> None:
    rng = random.Random(1)
    with path.open("w") as handle:
        for _ in range(rows):
            prompt = " ".join(rng.choice(WORDS) for _ in range(prompt_words))
            completion = " " + " ".join(rng.choice(WORDS) for _ in range(words))
            handle.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")


class GpuMemory:
    """Peak memory.used over the run, from nvidia-smi every 0.2 s."""

    def __init__(self) -> None:
        self.peak = 0
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
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def plugin_arm(tmp: Path, model: Path, data: Path, steps: int, seq: int, smoke: bool, **overrides) -> dict:
    out = tmp / f"out-{time.time_ns()}"
    config = {
        "model_name": str(model),
        "dataset_name": str(data),
        "adaptor_name": "bench",
        "output_dir": str(out),
        "max_steps": steps,
        "maximum_sequence_length": seq,
        "logging_steps": 5,
        "save_steps": 100000,
        "num_processes": 1,
        "train_device": "cpu" if smoke else "cuda",
        "batch_size": 4,
        "gradient_accumulation_steps": 1,
        **overrides,
    }
    path = tmp / "run.json"
    path.write_text(json.dumps(config))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--config", str(path)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    summary = json.loads((out / "bench" / "training_summary.json").read_text())
    return {"seconds": summary["runtime_seconds"], "steps": summary["steps"], "batch": config["batch_size"]}


def trl_arm(tmp: Path, model: Path, data: Path, steps: int, seq: int, smoke: bool) -> dict:
    trl = Path(sys.executable).with_name("trl")
    if not trl.exists() and importlib.util.find_spec("trl") is None:
        return {"error": "trl is not installed"}
    cmd = [
        str(trl) if trl.exists() else sys.executable,
        *([] if trl.exists() else ["-m", "trl.cli"]),
        "sft",
        "--model_name_or_path",
        str(model),
        "--dataset_name",
        str(data.parent),
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
        "4",
        "--max_steps",
        str(steps),
        "--max_length",
        str(seq),
        "--learning_rate",
        "2e-4",
        "--lr_scheduler_type",
        "cosine",
        "--logging_steps",
        "5",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--output_dir",
        str(tmp / f"trl-{time.time_ns()}"),
        *(["--use_cpu"] if smoke else ["--bf16"]),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = re.findall(r"'train_runtime': '?([0-9.]+)", proc.stdout + proc.stderr)
    if proc.returncode != 0 or not found:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return {"seconds": float(found[-1]), "steps": steps, "batch": 4}


def report(name: str, result: dict, seq: int, shape: dict, peak_flops: float | None, memory: int | None) -> None:
    if "error" in result:
        print(f"{name:44s} not measured: {result['error'][:120]}")
        return
    tokens_per_s = result["steps"] * result["batch"] * seq / result["seconds"]
    flops_per_token = 6 * shape["params"] + 12 * shape["num_hidden_layers"] * shape["hidden_size"] * seq
    mfu = f"{100 * tokens_per_s * flops_per_token / peak_flops:5.1f}%" if peak_flops else "  n/a"
    mem = f"{memory / 1024:6.1f} GiB" if memory else "     n/a"
    print(f"{name:44s} {tokens_per_s:10.0f} tok/s   peak {mem}   MFU {mfu}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    seq = 128 if args.smoke else 2048
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        os.environ.setdefault("TFL_HOME_DIR", str(tmp))
        os.environ["SFT_PREPARED_CACHE"] = str(tmp / "prepared")
        model = tmp / "model"
        shape = build_model(model, args.smoke)
        data_dir = tmp / "data"
        data_dir.mkdir()
        data = data_dir / "train.jsonl"
        make_rows(
            data,
            rows=64 if args.smoke else 2000,
            words=80 if args.smoke else 1400,
            prompt_words=8 if args.smoke else 40,
        )
        peak_flops, device = None, "cpu (smoke)"
        if not args.smoke:
            import torch

            device = torch.cuda.get_device_name(0)
            peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in device), None)
        print(
            f"{device}: model {shape['params'] / 1e6:.0f}M parameters, {seq}-token sequences, {args.steps} steps,"
            " batch 4, LoRA r=16 all-linear"
        )
        arms = [
            (
                "plugin defaults (gradient checkpointing on)",
                lambda: plugin_arm(tmp, model, data, args.steps, seq, args.smoke),
            ),
            (
                "plugin, gradient checkpointing off",
                lambda: plugin_arm(tmp, model, data, args.steps, seq, args.smoke, gradient_checkpointing=False),
            ),
            ("plugin, packing on", lambda: plugin_arm(tmp, model, data, args.steps, seq, args.smoke, packing=True)),
            ("trl sft (same settings)", lambda: trl_arm(tmp, model, data, args.steps, seq, args.smoke)),
            (
                "TransformerLab multi-GPU plugin: qlora+packing",
                lambda: (
                    plugin_arm(tmp, model, data, args.steps, seq, args.smoke, training_mode="qlora", packing=True)
                    if importlib.util.find_spec("bitsandbytes")
                    else {"error": "bitsandbytes is not installed"}
                ),
            ),
        ]
        for name, arm in arms:
            if args.smoke:
                report(name, arm(), seq, shape, peak_flops, None)
                continue
            with GpuMemory() as memory:
                result = arm()
            report(name, result, seq, shape, peak_flops, memory.peak)
        if not args.smoke:
            lora = 16 * 2 * shape["num_hidden_layers"] * (4 * shape["hidden_size"] + 3 * shape["intermediate_size"])
            print(
                f"two-GPU DDP estimate: all-reduce of ~{lora * 4 / 2**20:.0f} MiB of LoRA gradients per step "
                "(fp32); at ~200 GB/s NVLink that is well under 1 ms against the step time above: expect near "
                "2x tokens/s (an estimate, not a measurement)"
            )


if __name__ == "__main__":
    main()
