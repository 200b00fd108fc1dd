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

PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
WORDS = [f"w{i}" for i in range(3000)]
BATCH = 4


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


def plugin_arm(tmp: Path, model: Path, data: Path, seq: int, smoke: bool, hide: str = "", **overrides) -> dict:
    """One epoch through the plugin, headless; `hide` lists packages the plugin must treat as missing."""
    out = tmp / f"out-{time.time_ns()}"
    config = {
        "model_name": str(model),
        "dataset_name": str(data),
        "adaptor_name": "bench",
        "output_dir": str(out),
        "num_train_epochs": 1,
        "maximum_sequence_length": seq,
        "logging_steps": 5,
        "save_steps": 100000,
        "num_processes": 1,
        "train_device": "cpu" if smoke else "cuda",
        "batch_size": BATCH,
        "gradient_accumulation_steps": 1,
        "learning_rate": 2e-4,
        "lora_r": 16,
        "lora_alpha": 32,
        **overrides,
    }
    path = tmp / "run.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "SFT_TRAINER_DISABLE": hide}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--config", str(path)], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    summary = json.loads((out / "bench" / "training_summary.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    speed = summary["plan"]["speed"]
    return {
        "seconds": summary["runtime_seconds"],
        "tokens": summary["dataset"]["total_tokens"],
        "settings": f"{speed['attention']}, packing {'on' if speed['packing'] else 'off'}, checkpointing "
        f"{'on' if speed['gradient_checkpointing'] else 'off'}, liger {'on' if speed['liger'] else 'off'}",
    }


def trl_arm(
    tmp: Path, model: Path, data: Path, seq: int, smoke: bool, tokens: int, checkpointing: bool, like: str = ""
) -> dict:
    """One epoch of `trl sft` with the same LoRA settings; `tokens` is the epoch's token count. `like` holds
    the plugin arm's settings line, whose attention kernel and packing are copied."""
    if not trl_available():
        return {"error": "trl is not installed"}
    extra = []
    if like.startswith("flash_attention_2"):
        extra += ["--attn_implementation", "flash_attention_2"]
    if "packing on" in like:
        extra += ["--packing", "true"]
    cmd = trl_sft_command(
        str(model),
        str(data.parent),
        str(tmp / f"trl-{time.time_ns()}"),
        max_length=seq,
        learning_rate=2e-4,
        batch=BATCH,
        cpu_ranks=1 if smoke else 0,
        checkpointing=checkpointing,
        logging_steps=5,
        extra=extra,
    )
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = train_runtime(proc.stdout + proc.stderr)
    if proc.returncode != 0 or seconds is None:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return {
        "seconds": seconds,
        "tokens": tokens,
        "settings": f"{'flash_attention_2' if '--attn_implementation' in extra else 'sdpa'}, packing "
        f"{'on' if '--packing' in extra else 'off'}, checkpointing {'on' if checkpointing else 'off'}",
    }


def report(name: str, result: dict, shape: dict, seq: int, peak_flops: float | None, memory: int | None) -> None:
    if "error" in result:
        print(f"{name:52s} not measured: {result['error'][:160]}", flush=True)
        return
    tokens_per_s = result["tokens"] / result["seconds"]
    flops_per_token = 6 * shape["params"] + 12 * shape["num_hidden_layers"] * shape["hidden_size"] * seq
    mfu = f"{100 * tokens_per_s * flops_per_token / peak_flops:5.1f}%" if peak_flops else "  n/a"
    mem = f"{memory / 1024:6.1f} GiB" if memory else "     n/a"
    print(
        f"{name:52s} {tokens_per_s:9.0f} tok/s  {result['seconds']:7.1f} s  peak {mem}  MFU {mfu}  "
        f"[{result['settings']}]",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=600)
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
        rows = 32 if args.smoke else args.rows
        make_rows(data, rows=rows, max_words=80 if args.smoke else 1500, prompt_words=8 if args.smoke else 40)
        peak_flops, device = None, "cpu (smoke)"
        if not args.smoke:
            import torch

            device = torch.cuda.get_device_name(0)
            peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in device), None)
        have = {
            name: importlib.util.find_spec(name) is not None for name in ("flash_attn", "liger_kernel", "bitsandbytes")
        }
        print(
            f"{device}: model {shape['params'] / 1e6:.0f}M parameters, {rows} rows of up to {seq} tokens, one epoch "
            f"per arm, batch {BATCH}, LoRA r=16 all-linear; installed: "
            + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in have.items()),
            flush=True,
        )

        def missing(package: str) -> dict:
            return {"error": f"{package} is not installed"}

        def plugin(**kw):
            return lambda: plugin_arm(tmp, model, data, seq, args.smoke, **kw)

        defaults = plugin()()
        tokens = defaults.get("tokens", 0)
        default_checkpointing = "checkpointing on" in defaults.get("settings", "")
        arms = [
            ("plugin, gradient checkpointing on", plugin(gradient_checkpointing="true")),
            ("plugin, gradient checkpointing off", plugin(gradient_checkpointing="false")),
            ("plugin, packing on", plugin(packing="true")),
            ("plugin, packing off", plugin(packing="false")),
            (
                "plugin defaults without flash-attention",
                plugin(hide="flash_attn") if have["flash_attn"] else lambda: missing("flash-attn"),
            ),
            (
                "plugin defaults without liger kernels",
                plugin(hide="liger_kernel") if have["liger_kernel"] else lambda: missing("liger-kernel"),
            ),
            (
                "trl sft, the plugin's settings",
                lambda: trl_arm(
                    tmp, model, data, seq, args.smoke, tokens, default_checkpointing, defaults.get("settings", "")
                ),
            ),
            (
                "trl sft, its default checkpointing (on)",
                lambda: trl_arm(tmp, model, data, seq, args.smoke, tokens, True),
            ),
            (
                "TransformerLab multi-GPU plugin config: qlora + packing",
                plugin(training_mode="qlora", packing="true")
                if have["bitsandbytes"]
                else lambda: missing("bitsandbytes"),
            ),
        ]
        report("plugin defaults (auto)", defaults, shape, seq, peak_flops, None)
        for name, arm in arms:
            if args.smoke:
                report(name, arm(), shape, seq, peak_flops, None)
                continue
            with GpuMemory() as memory:
                result = arm()
            report(name, result, shape, seq, peak_flops, memory.peak)
        if not args.smoke:
            lora = 16 * 2 * shape["num_hidden_layers"] * (4 * shape["hidden_size"] + 3 * shape["intermediate_size"])
            print(
                f"two-GPU DDP estimate: all-reduce of ~{lora * 4 / 2**20:.0f} MiB of LoRA gradients per step "
                "(fp32); at ~200 GB/s NVLink that is well under 1 ms against the step time above: expect near "
                "2x tokens/s (an estimate, not a measurement)"
            )


if __name__ == "__main__":
    main()
