"""QLoRA on two GPUs with FSDP2, trained by the plain transformers `Trainer` (or TRL `SFTTrainer`), quickloris inside.

    torchrun --nproc-per-node 2 examples/fsdp_two_gpus.py                      # SmolLM2-135M (embedded), reverse task
    torchrun --nproc-per-node 2 examples/fsdp_two_gpus.py --model DIR     # e.g. Meta-Llama-3.1-8B-Instruct-bnb-4bit
    accelerate launch --config_file examples/fsdp_accelerate.yaml examples/fsdp_two_gpus.py --trainer sft
    torchrun --nproc-per-node 2 examples/fsdp_two_gpus.py --device cpu         # no GPU: 2 gloo ranks on the CPU

What happens, on every rank:
1. `init_distributed` joins the job (NCCL on GPUs, gloo on the CPU); the model loads on the CPU (a ``*-bnb-4bit``
   folder through quickloris' own NF4 reader: its bytes are kept, no bitsandbytes needed).
2. `build_training_model` assembles the stack in its fixed order: NF4 base + LoRA (r=16 on all linears) ->
   activation checkpointing -> FSDP2 (`FSDPConfig`: a unit per decoder layer + the root, bf16 compute with fp32
   gradient reduction, CPU offload of the parameter shards) -> regional torch.compile (`--compile`).
3. The Trainer runs with ``fsdp_config=fsdp.trainer_fsdp_config(model)`` (FSDP2, the sharded layer class): accelerate
   sees a model that is FSDP2-sharded already and leaves it as it is; its sampler gives each rank its share of every
   batch, and the loss of a step is normalised by the target tokens of the whole step over all ranks
   (``num_items_in_batch``; Trainer scales by the number of processes, FSDP2 averages: the gradient of one GPU's
   loss).
4. The adapter is gathered and saved in PEFT's format (`model.save_pretrained` on every rank; rank 0 writes).
   Rank 0 then loads it onto a fresh, unsharded model - what one GPU would do - and scores held-out problems
   (exact match), next to the base model's score.

On the CPU (``--device cpu``; the executed notebook and the CI smoke run) accelerate has no FSDP support and would
wrap the sharded model in DistributedDataParallel; the script then tells that one accelerator object to leave the
model as it is (`_keep_model_as_is`). Everything else is the same code path.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import transformers

from quickloris.data.chat import tokenize_records
from quickloris.data.packing import collate_padded
from quickloris.data.tasks import get_task
from quickloris.models.loading import load_model, load_tokenizer, resolve_model
from quickloris.models.prepare import QLoRAConfig, prepare_model
from quickloris.parallel import fsdp
from quickloris.parallel.compile import CompileConfig
from quickloris.parallel.compose import CheckpointConfig, build_training_model
from quickloris.utils.atomic import atomic_write_json


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a HF folder, *-bnb-4bit folder or GGUF file (default: the embedded SmolLM2-135M)")
    p.add_argument("--tiny", action="store_true", help="a random-init tiny Llama (smoke tests; learns nothing useful)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--trainer", choices=["trainer", "sft"], default="trainer", help="transformers Trainer or TRL SFTTrainer"
    )
    p.add_argument("--task", default="reverse", help="embedded task: reverse (learnt in ~60 steps) or addition")
    p.add_argument("--steps", type=int, default=60, help="steps of the schedule (the data: steps x global batch)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps of that schedule")
    p.add_argument("--batch", type=int, default=4, help="examples per GPU per micro-batch")
    p.add_argument(
        "--grad-accum", type=int, default=1, help="micro-batches per step (global batch: batch x GPUs x this)"
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--offload", action=argparse.BooleanOptionalAction, default=True, help="FSDP2 CPU offload")
    p.add_argument(
        "--mixed-precision",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="FSDP2 bf16 compute with fp32 gradient reduction (off: the model's own dtype)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="regional torch.compile (off by default: on 2 H200s the 60-step --tiny run did not finish "
        "in 290 s with it, compiling; 30 steps took 3.3 s without)",
    )
    p.add_argument("--eval", type=int, default=100, help="held-out problems scored before/after (0: none)")
    p.add_argument("--out", default="fsdp-adapter", help="adapter folder (PEFT format); also gets run_summary.json")
    return p.parse_args(argv)


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer(task):
    """A small byte-level BPE with a ChatML template, trained on the task's own text (no download needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tk.decoder = decoders.ByteLevel()
    text = [m["content"] for ex in task.generate("train", 50, seed=1) for m in ex.messages()]
    tk.train_from_iterator(
        text + ["system user assistant"] * 5,
        trainers.BpeTrainer(
            vocab_size=384,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML
    )


def load(args, device_type: str):
    """(model on the CPU in its training dtype, tokenizer)."""
    dtype = torch.bfloat16 if device_type == "cuda" else torch.float32  # no fast bf16 matmuls on most CPUs
    if args.tiny:  # every NF4 weight of this shape splits over 2 ranks on whole groups
        tokenizer = tiny_tokenizer(get_task(args.task))
        cfg = transformers.LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            tie_word_embeddings=True,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
        )
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(cfg).to(dtype), tokenizer
    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    if source.format == "bnb-4bit":
        from quickloris.models.prequantized import load_bnb_4bit_model

        return load_bnb_4bit_model(source.folder, dtype=dtype), tokenizer
    return load_model(source, dtype=dtype), tokenizer


def _keep_model_as_is(trainer) -> None:
    """CPU only: accelerate would put the FSDP2-sharded model into DDP (it has no FSDP on the CPU); don't."""
    trainer.accelerator.prepare_model = lambda model, *args, **kwargs: model


def score(args, tokenizer, adapter: str | None) -> dict | None:
    """Rank 0: exact match on held-out problems of an unsharded model (+ the adapter), as one GPU would run it."""
    from quickloris.train.exact_match import evaluate_task

    if args.eval <= 0:
        return None
    model, _ = load(args, args.device)  # (--tiny: the same random base again: seeded)
    model = model.to(args.device)
    if adapter is not None:
        prepare_model(model, QLoRAConfig(), adapter=adapter)
    return evaluate_task(model, tokenizer, args.task, n=args.eval, batch_size=64).to_dict()


def main() -> None:
    args = parse()
    ctx = fsdp.init_distributed(args.device)
    log = (lambda *a: print(*a, flush=True)) if ctx.is_main else (lambda *a: None)
    model, tokenizer = load(args, args.device)
    task = get_task(args.task)
    records = task.records("train", args.steps * args.batch * ctx.world_size * args.grad_accum, seed=0)
    examples, _ = tokenize_records(tokenizer, records, max_seq_len=256, overflow="drop")
    base_score = score(args, tokenizer, None) if ctx.is_main else None
    dist.barrier()

    torch.manual_seed(0)  # the same LoRA initialisation on every rank
    compiled = args.compile
    model = build_training_model(
        model,
        QLoRAConfig(r=16, lora_alpha=32, target_modules=["all-linear"]),
        checkpointing=CheckpointConfig(),
        sharding=fsdp.FSDPConfig(cpu_offload=args.offload, mixed_precision=args.mixed_precision),
        mesh=ctx.mesh,
        compile=CompileConfig(backend="inductor" if args.device == "cuda" else "aot_eager") if compiled else None,
    )
    plan = fsdp.sharding_summary(model)
    log(
        f"{ctx.world_size} ranks on {args.device}; NF4 weights sharded: {plan['nf4_sharded']}, replicated (cannot be "
        f"split on whole 16384-value groups): {len(plan['nf4_replicated'])} {plan['nf4_replicated'][:4]}"
    )

    common = dict(
        output_dir=os.path.join(args.out, "trainer"),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.max_steps or args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        disable_tqdm=True,
        remove_unused_columns=False,
        gradient_checkpointing=False,
        bf16=False,
    )  # both done by quickloris / FSDP2's mixed precision
    if args.device == "cuda":
        common.update(fsdp=True, fsdp_config=fsdp.trainer_fsdp_config(model))
    else:
        common.update(use_cpu=True, ddp_backend="gloo")
    collate = lambda batch: collate_padded(batch, tokenizer.pad_token_id)  # noqa: E731
    if args.trainer == "trainer":
        trainer = transformers.Trainer(
            model=model, args=transformers.TrainingArguments(**common), train_dataset=examples, data_collator=collate
        )
    else:
        import datasets
        import trl

        rows = [{"prompt": list(r.messages[:-1]), "completion": [r.messages[-1]]} for r in records]
        trainer = trl.SFTTrainer(
            model=model,
            args=trl.SFTConfig(**common, max_length=256),
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer,
        )
    if args.device == "cpu":
        _keep_model_as_is(trainer)
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    model.save_pretrained(args.out)  # every rank: the LoRA matrices are gathered, rank 0 writes PEFT files
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    log(
        f"trained {len(losses)} steps in {train_s:.1f} s; loss {losses[0]:.4f} -> {losses[-1]:.4f}; adapter: {args.out}"
    )
    if ctx.is_main:
        after = score(args, tokenizer, args.out)
        summary = {
            "world_size": ctx.world_size,
            "device": args.device,
            "trainer": args.trainer,
            "task": args.task,
            "steps": args.steps,
            "global_batch": args.batch * ctx.world_size * args.grad_accum,
            "train_s": train_s,
            "losses": losses,
            "sharding": plan,
            "compiled": compiled,
            "offload": args.offload,
            "mixed_precision": args.mixed_precision,
            "eval_before": base_score,
            "eval_after": after,
        }
        atomic_write_json(os.path.join(args.out, "run_summary.json"), summary)
        if after is not None:
            log(
                f"held-out exact match ({args.eval} problems, adapter loaded on one unsharded model): "
                f"{base_score['accuracy']:.1%} before -> {after['accuracy']:.1%} after"
            )
        log(json.dumps({k: summary[k] for k in ("world_size", "device", "steps", "global_batch", "train_s")}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
