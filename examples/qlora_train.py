"""QLoRA fine-tuning with quickloris in ~30 lines: NF4 base, LoRA, checkpointing, regional compile, PEFT adapter.

    python examples/qlora_train.py                 # a random-init tiny Llama (CPU: compile backend aot_eager)
    python examples/qlora_train.py --model DIR     # a local Hugging Face folder (16-bit: quantized here)

Trains a few steps on a repeated random motif (something a LoRA can learn) and saves the adapter in PEFT's format.
"""

from __future__ import annotations

import argparse

import torch
import transformers

from quickloris.models.prepare import QLoRAConfig
from quickloris.parallel.compile import CompileConfig, compile_stats
from quickloris.parallel.compose import CheckpointConfig, build_training_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="local transformers model folder (default: a random-init tiny Llama)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="qlora-adapter")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.model:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        model = transformers.LlamaForCausalLM(cfg).to(device, dtype)
    model = build_training_model(
        model,
        QLoRAConfig(r=16, lora_alpha=32, attention="sdpa"),
        checkpointing=CheckpointConfig(),
        compile=CompileConfig(backend="inductor" if device == "cuda" else "aot_eager"),
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    motif = torch.randint(0, model.config.vocab_size, (1, 16))
    for step in range(args.steps):
        seq = 16 * int(torch.randint(4, 17, (1,)))  # varying lengths: no recompile
        ids = motif.repeat(2, seq // 16).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(f"step {step:3d}  length {seq:4d}  loss {loss.item():.4f}")
    print("compile:", compile_stats())
    model.save_pretrained(args.out)  # adapter_config.json + adapter_model.safetensors (PEFT format)
    print(f"adapter saved to {args.out}/")


if __name__ == "__main__":
    main()
