"""`quickloris bench vision`: vision-language QLoRA on the device - a learning check and Qwen2-VL-2B-shaped speed.

Parts (``--parts``, default ``learn,speed``):

* ``learn``: a small random-init Qwen2-VL (``--learn-shape``: text hidden 256 x 4 layers, ViT 4 blocks of 128, the
  2 x 2 merger; a byte-level BPE trained on the task's words) trained with quickloris (NF4 + LoRA r=16 on the
  language model, ``--train-vision``: LoRA on the vision tower and merger too) on an embedded visual task
  (``--task``, default ``colors``: name the colour of the one shape; images drawn on the fly,
  `quickloris.data.vision_tasks`) for ``--learn-steps`` steps; held-out exact match (greedy generation) before and
  after. No VLM weights ship in a package here, so the model starts from random weights: "learning" means going from
  chance to well above it, which the record's ``chance`` (1 / number of answers) lets a reader judge.
* ``speed``: Qwen2-VL-2B's shapes (text: hidden 1536, 28 layers, 12 / 2 heads, MLP 8960, vocab 151936; vision: 32
  blocks of 1280, the merger to 1536), random-init bf16, batches of ``--speed-batch`` rows mixing image rows (one
  448 x 448 image: 256 image tokens) and text-only rows, lengths drawn from ``--speed-lengths``; stacks
  ``ql_padded`` (quickloris as ``quickloris train`` runs it on a GPU: compiled decoder regions, flex attention,
  padded rows), ``ql_packed`` (the same rows packed padding-free into rows of ``--speed-pack`` tokens, a step's
  packed rows flattened into one forward as ``--packing`` does), ``hf_peft_bnb`` (transformers' SDPA,
  bitsandbytes NF4 ``Linear4bit`` holding the same NF4 bytes, PEFT LoRA r=16 on the same linears, padded rows,
  eager), ``unsloth`` (Unsloth's ``FastVisionModel`` in a
  process of its own, `benchmarks.vision.unsloth_stack`: the same weights saved in bf16 and loaded 4-bit NF4, LoRA
  r=16 on the language model's attention and MLP, its offloaded checkpointing, the same padded batches); all with
  gradient checkpointing of the decoder layers, frozen vision tower, AdamW. Tokens/s counts real (non-padding)
  tokens, median over the timed steps; memory is ``max_memory_allocated`` after a reset once the model is built.

``--tiny``: everything on CPU at toy sizes (the tests' smoke run). Results: ``quickloris.utils.provenance.record(
"vision", ...)`` under ``--out``.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
import traceback
from typing import Any

import torch

PARTS = ("learn", "speed")
QWEN2_VL_2B = dict(
    text=dict(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    ),
    vision=dict(
        depth=32,
        embed_dim=1280,
        hidden_size=1536,
        num_heads=16,
        mlp_ratio=4,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    ),
)
LEARN = dict(
    text=dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [8, 12, 12]},
    ),
    vision=dict(
        depth=4,
        embed_dim=128,
        hidden_size=256,
        num_heads=4,
        mlp_ratio=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    ),
)
TINY = dict(
    text=dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]},
    ),
    vision=dict(
        depth=2,
        embed_dim=32,
        hidden_size=64,
        num_heads=4,
        mlp_ratio=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    ),
)
SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
]
TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{% else %}{{ p['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parts", default="learn,speed", help=f"comma-separated: {', '.join(PARTS)}")
    p.add_argument("--tiny", action="store_true", help="toy sizes on CPU (a smoke run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", default="colors", choices=["dots", "shapes", "colors"])
    p.add_argument("--learn-steps", type=int, default=600)
    p.add_argument("--learn-batch", type=int, default=16)
    p.add_argument("--learn-lr", type=float, default=2e-3)
    p.add_argument("--learn-eval", type=int, default=200, help="held-out problems scored before and after")
    p.add_argument("--speed-batch", type=int, default=8)
    p.add_argument("--speed-lengths", default="64-1024", help="text tokens per row, drawn uniformly from A-B")
    p.add_argument("--speed-pack", type=int, default=4096, help="tokens per packed row")
    p.add_argument("--speed-steps", type=int, default=8, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--speed-stacks", default="ql_padded,ql_packed,hf_peft_bnb,unsloth")


def tokenizer(words: list[str], vocab: int):
    """A ChatML byte-level BPE trained on `words` (no tokenizer ships for a random-init model)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator([" ".join(words)] * 50, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=TEMPLATE
    )


def qwen2_vl(shape: dict, tok, vocab: int, dtype, device, *, logit_room: float | None = None):
    """A random-init Qwen2-VL of `shape`. `logit_room`: text weights drawn with std = logit_room / hidden, so that
    the frozen random head can reach logits of about that size (the final RMSNorm fixes the hidden state's norm at
    ~sqrt(hidden): HF's std 0.02 caps the logits near 0.02 * hidden, too flat to learn an answer from)."""
    import transformers

    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    cfg = transformers.Qwen2VLConfig(
        text_config=dict(
            shape["text"],
            vocab_size=vocab,
            pad_token_id=ids["<|endoftext|>"],
            bos_token_id=None,
            eos_token_id=ids["<|im_end|>"],
        ),
        vision_config=shape["vision"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    if logit_room is not None:
        cfg.text_config.initializer_range = logit_room / shape["text"]["hidden_size"]
    with torch.device(device):
        model = transformers.Qwen2VLForConditionalGeneration(cfg)
    return model.to(dtype)


def processing(model, tok, max_pixels: int):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from quickloris.models.vision_processing import vision_processing

    return vision_processing(model.config, tok, Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=max_pixels))


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


# ---- learn -------------------------------------------------------------------------------------------------------


def part_learn(args, device, dtype) -> dict[str, Any]:
    from quickloris.data.vision import collate_vision, tokenize_vision_records
    from quickloris.data.vision_tasks import COLORS, SHAPES, visual_problems
    from quickloris.models.prepare import QLoRAConfig, prepare_model
    from quickloris.train.vision_eval import evaluate_vision

    answers = {"dots": [str(i) for i in range(1, 7)], "shapes": list(SHAPES), "colors": list(COLORS)}[args.task]
    words = (
        answers
        + "How many dots are in the picture? Answer with a number. Which shape circle square triangle "
        "What colour is the shape? one word user assistant".split()
    )
    vocab = 512
    tok = tokenizer(words, vocab)
    torch.manual_seed(args.seed)
    model = qwen2_vl(TINY if args.tiny else LEARN, tok, vocab, dtype, device, logit_room=16.0)
    proc = processing(model, tok, 56 * 56)
    model = prepare_model(model, QLoRAConfig(r=16, lora_alpha=32, attention="sdpa", train_vision=True))
    n_train = args.learn_steps * args.learn_batch
    train = visual_problems(args.task, "train", min(n_train, 4000), args.seed)
    heldout = visual_problems(args.task, "heldout", args.learn_eval, args.seed)
    examples, _ = tokenize_vision_records(proc, [p.record() for p in train], max_seq_len=256)

    def score(label):
        return evaluate_vision(
            model,
            proc,
            heldout,
            chat_template=None,
            image_max_size=None,
            max_new_tokens=4,
            label=label,
        )

    before = score("before")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.learn_lr, weight_decay=0.0)
    rng = random.Random(args.seed)
    losses, t0 = [], time.perf_counter()
    model.train()
    for step in range(args.learn_steps):
        w = max(1, args.learn_steps // 20)  # linear warm-up over 5 % of the steps, then cosine
        for g in opt.param_groups:
            g["lr"] = args.learn_lr * min(
                (step + 1) / w, 0.5 * (1 + math.cos(math.pi * max(0, step - w) / max(1, args.learn_steps - w)))
            )
        rows = rng.sample(range(len(examples)), args.learn_batch)
        batch = _to(
            collate_vision(proc, [examples[i] for i in rows], packing=False, pad_token_id=tok.pad_token_id), device
        )
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
        loss = model(**{k: v for k, v in batch.items() if k != "labels"}, labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % max(1, args.learn_steps // 10) == 0:
            print(f"learn step {step + 1}/{args.learn_steps} loss {statistics.mean(losses[-20:]):.4f}", flush=True)
    after = score("after")
    return {
        "task": args.task,
        "chance": 1 / len(answers),
        "steps": args.learn_steps,
        "batch": args.learn_batch,
        "lr": args.learn_lr,
        "train_examples": len(examples),
        "heldout": len(heldout),
        "shape": "tiny" if args.tiny else "learn",
        "before": before,
        "after": after,
        "loss_first": statistics.mean(losses[:20]),
        "loss_last": statistics.mean(losses[-20:]),
        "train_seconds": round(time.perf_counter() - t0, 1),
    }


# ---- speed -------------------------------------------------------------------------------------------------------


def _speed_examples(args, proc, tok, n: int):
    from PIL import Image

    from quickloris.data.vision import VisionRecord, tokenize_vision_records

    rng = random.Random(args.seed)
    lo, hi = (int(x) for x in args.speed_lengths.split("-"))
    side = 56 if args.tiny else 448
    words = tok.convert_ids_to_tokens(list(range(len(SPECIALS), len(SPECIALS) + 50)))
    records = []
    for i in range(n):
        text = "".join(rng.choice(words) for _ in range(rng.randint(lo, hi))).replace("Ġ", " ")
        img = i % 2 == 0
        content = ([{"type": "image"}] if img else []) + [{"type": "text", "text": text[: len(text) // 2]}]
        msgs = ({"role": "user", "content": content}, {"role": "assistant", "content": text[len(text) // 2 :]})
        images = (Image.new("RGB", (side, side), (rng.randint(0, 255), 40, 90)),) if img else ()
        records.append(VisionRecord(msgs, images, f"speed #{i}"))
    examples, _ = tokenize_vision_records(proc, records, max_seq_len=1 << 20)
    return examples


def _hf_peft_bnb(model):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    from quickloris.tensor.nf4_tensor import NF4Tensor

    lang = model.model.language_model
    names = []
    for path, mod in list(lang.layers.named_modules()):
        for name, child in list(mod.named_children()):
            if type(child) is torch.nn.Linear:
                nf4 = NF4Tensor.from_float(child.weight.detach(), blocksize=64, double_quant=True)
                lin = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=child.weight.dtype,
                    quant_type="nf4",
                    compress_statistics=True,
                    device="meta",
                )
                lin.weight = nf4.to_bnb()
                lin.weight.module = lin
                if child.bias is not None:
                    lin.bias = torch.nn.Parameter(child.bias.detach(), requires_grad=False)
                setattr(mod, name, lin)
                names.append(f"model.language_model.layers.{path}.{name}" if path else name)
    for p in model.parameters():
        p.requires_grad_(False)
    model.is_loaded_in_4bit = True
    targets = r".*language_model\.layers\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def step_batches(proc, groups: list[list], pack: int | None, batch: int | None = None) -> list[list[dict]]:
    """Each step's rows collated: one padded batch, or (`pack`) as ``quickloris train --packing`` does: the rows
    packed padding-free into rows of <= `pack` tokens (a longer row gets one of its own), and each micro-batch of
    `batch` packed rows (default: all of them) flattened into one row, one forward. (Until 15276c4 each packed row
    was a forward of its own: two forwards per step where the padded stack ran one, which the host-bound eager step
    paid for twice.)"""
    from quickloris.data.packing import pack_greedy
    from quickloris.data.vision import collate_vision

    if pack is None:
        return [[collate_vision(proc, group, packing=False, pad_token_id=0)] for group in groups]
    out = []
    for group in groups:
        rows = pack_greedy([len(e) for e in group], max(pack, max(map(len, group))))
        size = batch or len(rows)
        micro = [rows[k : k + size] for k in range(0, len(rows), size)]
        out.append(
            [collate_vision(proc, [group[i] for r in m for i in r], packing=True, pad_token_id=0) for m in micro]
        )
    return out


def train_step(model, batches: list[dict], opt, device, dtype) -> torch.Tensor:
    """One AdamW step: forward + backward of each of `batches` (pixels in `dtype`), the update, a synchronize;
    returns the last batch's loss."""
    for b in batches:
        b = _to(b, device)
        if "pixel_values" in b:
            b["pixel_values"] = b["pixel_values"].to(dtype)
        loss = model(**{k: v for k, v in b.items() if k != "labels"}, labels=b["labels"]).loss
        loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return loss


def timed_steps(model, batches: list[list[dict]], tokens: list[int], device, dtype) -> dict[str, Any]:
    """One AdamW step (lr 1e-5) per entry of `batches` (forward + backward of each of its batches first); steps 0-1
    warm up, tokens/s = median over the rest of `tokens[s]` / step time (collation is outside the timing); peak =
    ``max_memory_allocated`` since the model was built. Also what the Unsloth stack's process runs."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, counted = [], []
    for s, step in enumerate(batches):
        t0 = time.perf_counter()
        loss = train_step(model, step, opt, device, dtype)
        if s >= 2:
            times.append(time.perf_counter() - t0)
            counted.append(tokens[s])
    rate = statistics.median(n / t for n, t in zip(counted, times))
    mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {
        "tokens_per_s": round(rate, 1),
        "peak_memory_gib": mem and round(mem, 3),
        "loss_last": float(loss),
        "timed_steps": len(times),
    }


def part_speed(args, device, dtype) -> dict[str, Any]:
    from quickloris.models.prepare import QLoRAConfig
    from quickloris.parallel.compile import CompileConfig
    from quickloris.parallel.compose import CheckpointConfig, build_training_model

    vocab = 512 if args.tiny else QWEN2_VL_2B["text"]["vocab_size"]
    tok = tokenizer(["lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor"], 400)
    shape = TINY if args.tiny else QWEN2_VL_2B
    steps = 2 + args.speed_steps
    out: dict[str, Any] = {
        "shape": "tiny" if args.tiny else "Qwen2-VL-2B",
        "batch": args.speed_batch,
        "lengths": args.speed_lengths,
        "pack": args.speed_pack,
        "stacks": {},
    }
    examples = None
    for stack in args.speed_stacks.split(","):
        torch.manual_seed(args.seed)
        try:
            model = qwen2_vl(shape, tok, vocab, dtype, device)
            proc = processing(model, tok, 28 * 28 * 256)
            if examples is None:
                examples = _speed_examples(args, proc, tok, steps * args.speed_batch)
            if stack == "hf_peft_bnb":
                model.set_attn_implementation({"text_config": "sdpa"})
                model = _hf_peft_bnb(model).train()
            elif stack != "unsloth":
                model = build_training_model(
                    model,
                    QLoRAConfig(r=16, lora_alpha=32, attention="sdpa" if args.tiny else "flex"),
                    checkpointing=CheckpointConfig(gradient_checkpointing=True),
                    # quickloris train's default on a GPU: compiled decoder regions (the CPU smoke run stays eager)
                    compile=None if args.tiny else CompileConfig(),
                )
            groups = [examples[s * args.speed_batch : (s + 1) * args.speed_batch] for s in range(steps)]
            pack = args.speed_pack if stack == "ql_packed" else None
            batches = step_batches(proc, groups, pack, args.speed_batch)
            tokens = [sum(len(e) for e in group) for group in groups]
            if stack == "unsloth":  # its own process (it patches transformers): the same padded batches, saved
                from benchmarks.vision.unsloth_stack import run_unsloth_vision

                res = run_unsloth_vision(model, tok, batches, tokens, seed=args.seed)
                model = None
            else:
                res = timed_steps(model, batches, tokens, device, dtype)
            out["stacks"][stack] = res
            if "error" in res:
                print(f"speed {stack}: {res['error']}", flush=True)
                continue
            rate, mem = res["tokens_per_s"], res["peak_memory_gib"]
            print(f"speed {stack}: {rate:.0f} tokens/s, peak {mem} GiB", flush=True)
        except Exception as e:  # noqa: BLE001 - one stack's failure (out of memory, say) is recorded, the rest run
            traceback.print_exc()
            out["stacks"][stack] = {"error": f"{type(e).__name__}: {e}"[:500]}
        finally:
            model = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    s = out["stacks"]
    if "tokens_per_s" in s.get("ql_padded", {}) and "tokens_per_s" in s.get("ql_packed", {}):
        out["packed_over_padded"] = round(s["ql_packed"]["tokens_per_s"] / s["ql_padded"]["tokens_per_s"], 3)
    for base, tag in (("hf_peft_bnb", "hf"), ("unsloth", "unsloth")):
        if "tokens_per_s" in s.get(base, {}):
            for k in ("ql_padded", "ql_packed"):
                if "tokens_per_s" in s.get(k, {}):
                    out[f"{k}_over_{tag}"] = round(s[k]["tokens_per_s"] / s[base]["tokens_per_s"], 3)
                    if s[k]["peak_memory_gib"] and s[base]["peak_memory_gib"]:  # None without CUDA
                        out[f"{k}_memory_over_{tag}"] = round(s[k]["peak_memory_gib"] / s[base]["peak_memory_gib"], 3)
    return out


def run(args) -> int:
    from quickloris.utils.provenance import record

    if not args.tiny and not torch.cuda.is_available():
        print("quickloris bench vision: needs a CUDA GPU (or --tiny for a CPU smoke run); nothing measured")
        return 2
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    results: dict[str, Any] = {"args": vars(args) | {"func": None}}
    for part in args.parts.split(","):
        if part not in PARTS:
            raise SystemExit(f"--parts: unknown part {part!r}; choose from {', '.join(PARTS)}")
        results[part] = (part_learn if part == "learn" else part_speed)(args, device, dtype)
    from benchmarks.report import after_record

    after_record(record("vision", "vision-tiny" if args.tiny else "vision", results, args.out))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--out", default=None)
    raise SystemExit(run(parser.parse_args()))
