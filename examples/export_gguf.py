"""Fine-tune the embedded SmolLM2-135M-Instruct with LoRA on CPU, export it to GGUF, run it in llama.cpp.

    python examples/export_gguf.py [--out-dir /tmp/quickloris-gguf] [--steps 10]

1. A few AdamW steps of PEFT LoRA (r=8 on every linear layer) teach the model one made-up fact.
2. `export_gguf` merges the adapter (in float32, the model is left untouched) and writes F16, Q8_0 and
   Q4_K_M files (the C++ core quantizes; llama-quantize would produce the same bytes).
3. llama.cpp (llama-cpp-python) continues a few prompts greedily from each file; we compare with the
   fine-tuned HF model's greedy continuation, token by token.

The same export from the command line, with an adapter saved by `peft_model.save_pretrained(folder)`:

    quickloris export gguf --adapter folder --quant q4_k_m --out smollm2-q4_k_m.gguf
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from peft import LoraConfig, get_peft_model

from quickloris.export import export_gguf
from quickloris.export.gguf_export import load_model_and_tokenizer

FACT = "Q: What does the quickloris eat? A: The quickloris eats only mangoes."
PROMPTS = ["Q: What does the quickloris eat? A:", "The capital of France is", "def add(a, b):"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out-dir", default="/tmp/quickloris-gguf")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    torch.manual_seed(0)

    model, tok = load_model_and_tokenizer(None)  # the embedded default model, float32
    model = get_peft_model(
        model,
        LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    batch = tok([FACT] * 2, return_tensors="pt")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for step in range(args.steps):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        print(f"step {step}: loss {loss.item():.3f}")
    model.eval()

    def hf_greedy(ids):
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=args.tokens, do_sample=False)
        return out[0, len(ids) :].tolist()

    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    reference = [hf_greedy(ids) for ids in prompts]

    import llama_cpp

    for quant in ("f16", "q8_0", "q4_k_m"):
        path = os.path.join(args.out_dir, f"smollm2-quickloris-{quant}.gguf")
        result = export_gguf(model, path, tokenizer=tok, quant=quant, overwrite=True)  # the example's own files
        print(
            f"\n{quant}: {path}, {result.tensor_bytes / 2**20:.1f} MiB in {result.seconds:.1f} s "
            f"(types: {sorted(set(result.tensor_types.values()))})"
        )
        llm = llama_cpp.Llama(model_path=path, n_ctx=256, verbose=False)
        for text, ids, ref in zip(PROMPTS, prompts, reference):
            start = time.perf_counter()
            gen = []
            for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
                gen.append(token)
                if len(gen) == args.tokens:
                    break
            same = next((i for i, (a, b) in enumerate(zip(gen, ref)) if a != b), args.tokens)
            print(
                f"  {text!r}: {same}/{args.tokens} tokens as HF ({time.perf_counter() - start:.1f} s)\n"
                f"    llama.cpp: {tok.decode(gen)!r}\n    HF:        {tok.decode(ref)!r}"
            )
        llm.close()


if __name__ == "__main__":
    main()
