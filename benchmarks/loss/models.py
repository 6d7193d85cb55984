"""Model-level comparisons for `quickloris bench loss` (train60, grpo), device-agnostic so that CPU tests can run
them at toy size: the same LoRA init and data trained with HF's loss and with `enable_chunked_loss`; one GRPO step
with chunked vs full-logits log-probs. `quantize_nf4_` builds a QLoRA model offline from a random-init one."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    tie_word_embeddings=True,
    rope_theta=500000.0,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
)
SMALL_LLAMA = dict(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    tie_word_embeddings=False,
)


def quantize_nf4_(model, names=tuple(LORA_TARGETS), compute_dtype=None):
    """Replace the named nn.Linear layers by bitsandbytes Linear4bit (NF4, double quant), weights quantized."""
    import bitsandbytes as bnb
    import torch
    from torch import nn

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in names and type(child) is nn.Linear:
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=compute_dtype or child.weight.dtype,
                    compress_statistics=True,
                    quant_type="nf4",
                    device="meta",
                )
                q.weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4"
                ).to(child.weight.device)
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, child_name, q)
    model.is_loaded_in_4bit = True  # what transformers sets after a bnb 4-bit load; PEFT reads it
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return model


def train_compare(
    cfg: dict[str, Any],
    *,
    steps: int,
    batch: int,
    seq: int,
    device: str,
    dtype,
    quantize: bool,
    lr: float = 1e-4,
    seed: int = 0,
    modes=("hf", "chunked", "chunked_grad_in_forward"),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the same LoRA init on the same data with HF's loss and with the chunked loss; per-step losses."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from quickloris.models.chunked_loss import disable_chunked_loss, enable_chunked_loss

    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).to(dtype)
    if quantize:
        quantize_nf4_(model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    init = {n: p.detach().clone() for n, p in lora.items()}
    gen = torch.Generator().manual_seed(seed + 1)
    motif = torch.randint(0, cfg["vocab_size"], (steps, batch, 32), generator=gen)
    data = motif.repeat(1, 1, (seq + 31) // 32)[..., :seq]  # repeated motifs: something a LoRA can learn
    out: dict[str, Any] = {"steps": steps, "batch": batch, "seq": seq, "lr": lr}
    for mode in modes:
        with torch.no_grad():
            for n, p in lora.items():
                p.copy_(init[n])
        if mode == "hf":
            disable_chunked_loss(model)
        else:
            enable_chunked_loss(model, grad_in_forward=mode.endswith("grad_in_forward"))
        opt = torch.optim.AdamW(list(lora.values()), lr=lr, weight_decay=0.0)
        losses, times = [], []
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        for step in range(steps):
            ids = data[step].to(device)
            labels = ids.clone()
            labels[:, :32] = -100  # the first motif is a "prompt"
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())  # synchronizes
            times.append(time.perf_counter() - t0)
        out[mode] = {
            "losses": losses,
            "median_step_s": statistics.median(times[2:] or times),
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None,
        }
        log(
            f"train {mode}: first/last loss {losses[0]:.4f}/{losses[-1]:.4f}, "
            f"{out[mode]['median_step_s'] * 1e3:.0f} ms/step, peak {out[mode]['peak_gb']} GB"
        )
    ref = out["hf"]["losses"]
    for mode in modes[1:]:
        rel = max(abs(a - b) / abs(b) for a, b in zip(out[mode]["losses"], ref))
        out[mode]["max_rel_diff_vs_hf"] = rel
        out[mode]["within_1e-3"] = rel <= 1e-3
    disable_chunked_loss(model)
    return out


def grpo_compare(
    cfg: dict[str, Any],
    *,
    device: str,
    dtype,
    groups: int = 2,
    group_size: int = 8,
    prompt: int = 64,
    completion: int = 192,
    chunk_size: int = 512,
    seed: int = 0,
) -> dict[str, Any]:
    """One GRPO step (clipped ratio + k3 KL to the adapter-free model): chunked vs full-logits log-probs."""
    import torch
    import torch.nn.functional as F
    import transformers
    from peft import LoraConfig, get_peft_model

    from quickloris.models.chunked_loss import ChunkedLossConfig, chunked_head_loss
    from quickloris.ops.linear_losses import grpo_token_loss

    torch.manual_seed(seed)
    with torch.device(device):
        base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).to(dtype)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, init_lora_weights=False))
    model.train()
    B, S, V = groups * group_size, prompt + completion, cfg["vocab_size"]
    ids = torch.randint(0, V, (B, S), device=device)
    targets = F.pad(ids[:, 1:], (0, 1), value=-100)
    targets[:, : prompt - 1] = -100  # only completion tokens are scored
    lengths = torch.randint(completion // 2, completion + 1, (B,), device=device)
    targets[torch.arange(S, device=device)[None] >= (prompt - 1 + lengths)[:, None]] = -100  # ragged ends
    valid = targets != -100
    rewards = torch.randn(groups, group_size, device=device)
    adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).reshape(B, 1)
    adv = adv.expand(B, S).contiguous()
    inner = model.get_base_model()
    with torch.no_grad():
        logp_now = (
            torch.log_softmax(inner(input_ids=ids).logits.float(), -1)
            .gather(-1, targets.clamp_min(0)[..., None])
            .squeeze(-1)
        )
        old = logp_now + 0.3 * torch.randn_like(logp_now)  # a slightly stale policy: clipping is active
        with model.disable_adapter():
            ref = (
                torch.log_softmax(inner(input_ids=ids).logits.float(), -1)
                .gather(-1, targets.clamp_min(0)[..., None])
                .squeeze(-1)
            )
    kw = dict(epsilon_low=0.2, epsilon_high=0.28, beta=0.04)

    def step(chunked: bool):
        model.zero_grad(set_to_none=True)
        hidden = inner.model(input_ids=ids).last_hidden_state
        if chunked:
            per = chunked_head_loss(
                hidden,
                inner.lm_head,
                targets,
                loss="grpo",
                reduction="none",
                advantages=adv,
                old_logprobs=old,
                ref_logprobs=ref,
                config=ChunkedLossConfig(chunk_size=chunk_size),
                **kw,
            )
        else:
            logp = (
                torch.log_softmax(inner.lm_head(hidden).float(), -1)
                .gather(-1, targets.clamp_min(0)[..., None])
                .squeeze(-1)
            )
            per = (
                grpo_token_loss(
                    logp, adv, torch.where(valid, old, logp.detach()), torch.where(valid, ref, logp.detach()), **kw
                )
                * valid
            )
        loss = (per.sum(-1) / valid.sum(-1).clamp_min(1)).mean()
        loss.backward()
        return loss.detach(), {
            n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None
        }

    results: dict[str, Any] = {}
    for name, chunked in (("naive", False), ("chunked", True)):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        loss, grads = step(chunked)
        results[name] = (
            loss,
            grads,
            time.perf_counter() - t0,
            torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None,
        )
    (ln, gn, tn, mn), (lc, gc, tc, mc) = results["naive"], results["chunked"]
    flat = lambda g: torch.cat([g[k].flatten() for k in sorted(g)])  # noqa: E731
    fn, fc = flat(gn), flat(gc)
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "tokens_scored": int(valid.sum()),
        "vocab": V,
        "loss_naive": ln.item(),
        "loss_chunked": lc.item(),
        "loss_rel_diff": abs(lc - ln).item() / abs(ln).item(),
        "lora_grad_rel_diff": ((fc - fn).norm() / fn.norm()).item(),
        "lora_grad_cosine": F.cosine_similarity(fc, fn, dim=0).item(),
        "lora_params": len(gn),
        "same_grad_names": sorted(gn) == sorted(gc),
        "step_s": {"naive": tn, "chunked": tc},
        "peak_gb": {"naive": mn, "chunked": mc},
    }
