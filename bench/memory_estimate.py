"""Benchmark (run by hand): the memory estimate behind `gradient_checkpointing: auto` next to what a real
training step takes, on the CPU (float32, SDPA). Each case runs in its own process: it builds a
Qwen2-shaped model with a LoRA adapter and TRL's fused LM head (as SFTTrainer installs it), runs forward +
backward + an optimizer step on one micro-batch, and reports its peak resident memory above the baseline taken
after imports. The estimate is
`speed.estimate_memory` without its fixed CUDA allowance.

    .venv/bin/python bench/memory_estimate.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {
    "qwen2-shaped, 8 layers x 512": {
        "model_type": "qwen2",
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": 8192,
        "tie_word_embeddings": True,
    },
    "qwen2-shaped, 4 layers x 1024, vocab 32k": {
        "model_type": "qwen2",
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 4,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
}
SIZES = ((2, 1024), (4, 512))
CASES = [(shape, batch, seq, ckpt) for shape in SHAPES for batch, seq in SIZES for ckpt in (False, True)]
# Per shape, a 1 x 16-token step measures what does not grow with the batch: weights, optimizer state and
# the CPU runtime's own buffers. "growth" compares only what the batch adds, measured and estimated.
FLOOR = (1, 16)


def child(shape: str, batch: int, seq: int, checkpointing: bool) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    torch.set_num_threads(2)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    config = Qwen2Config(**{k: v for k, v in SHAPES[shape].items() if k != "model_type"})
    config._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(config)
    # SFTTrainer's own LM head: the loss from 4096-token x 32768-entry tiles, never the whole logits.
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    log_probs = model(input_ids=ids, labels=ids, use_cache=False, fused_lm_head=True).log_probs
    (-log_probs.sum() / log_probs.numel()).backward()
    optimizer.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"measured": peak - base}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        shape, batch, seq, ckpt = json.loads(sys.argv[2])
        return child(shape, batch, seq, ckpt)
    from plugin_utils import params, speed

    def measure(shape: str, batch: int, seq: int, ckpt: bool) -> int:
        out = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps([shape, batch, seq, ckpt])],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return json.loads(out.strip().splitlines()[-1])["measured"]

    def estimate(shape: str, batch: int, seq: int, ckpt: bool) -> float:
        p = params.defaults().replace(batch_size=batch, maximum_sequence_length=seq, lora_r=16, lora_dropout=0.05)
        options = {"precision": "fp32", "world_size": 1, "checkpointing": ckpt, "device": "cpu"}
        return speed.estimate_memory(SHAPES[shape], p, **options) - speed.RUNTIME_OVERHEAD

    print(
        f"{'model':42s} {'batch x seq':>11s} {'ckpt':>5s} {'measured':>10s} {'estimate':>10s} {'ratio':>6s}"
        f" {'growth measured':>16s} {'estimated':>10s} {'ratio':>6s}"
    )
    floors = {(shape, ckpt): (measure(shape, *FLOOR, ckpt), estimate(shape, *FLOOR, ckpt)) for shape, *_, ckpt in CASES}
    for shape, batch, seq, ckpt in CASES:
        measured, guessed = measure(shape, batch, seq, ckpt), estimate(shape, batch, seq, ckpt)
        floor_measured, floor_guessed = floors[(shape, ckpt)]
        grown, grown_guess = measured - floor_measured, guessed - floor_guessed
        print(
            f"{shape:42s} {f'{batch} x {seq}':>11s} {'on' if ckpt else 'off':>5s} {measured / 2**20:6.0f} MiB"
            f" {guessed / 2**20:6.0f} MiB {guessed / measured:6.2f} {grown / 2**20:12.0f} MiB"
            f" {grown_guess / 2**20:6.0f} MiB {grown_guess / grown:6.2f}"
        )


if __name__ == "__main__":
    main()
