"""FSDP2 over 2 gloo ranks on CPU with a vision-language model and --train-vision: one rank's rows have an image,
the other's none, so only one rank runs the vision tower. The vision tower stays whole on every rank (outside FSDP2)
and its LoRA gradients are averaged by every rank (`quickloris.models.vision.reduce_vision_grads`, a zero gradient
where no image was seen): the step completes, and one SGD step gives every LoRA matrix - text (sharded) and vision
(replicated) - the values of one process training on both rows."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quickloris.models.prepare import QLoRAConfig  # noqa: E402
from quickloris.parallel import fsdp  # noqa: E402
from quickloris.parallel.compose import build_training_model  # noqa: E402
from tests.helpers import assert_close_rel, reorder_tolerance  # noqa: E402
from tests.parallel.dist_utils import run_ranks  # noqa: E402


def _setup(tmp, seed):
    from quickloris.data.vision import tokenize_vision_records
    from tests.models.test_vision import write_data
    from tests.vlm_tiny import vlm_model, vlm_processing, vlm_tokenizer

    records = write_data(tmp, seed)
    tok = vlm_tokenizer("qwen2_vl")
    torch.manual_seed(seed)
    model = vlm_model("qwen2_vl", tok)
    proc = vlm_processing("qwen2_vl", tok, model.config)
    examples, _ = tokenize_vision_records(proc, [records[0], records[1]], max_seq_len=512)  # image row, text row
    assert examples[0].images and not examples[1].images
    return model, proc, examples


def _full_trainable(model):
    from torch.distributed.tensor import DTensor

    return {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def _step(model, proc, examples, dist=None):
    """One SGD step (lr 1, no clipping) of both rows; returns the change of every LoRA matrix (= -gradient)."""
    from quickloris.train.config import TrainConfig
    from quickloris.train.loop import train_loop
    from quickloris.train.vision import VisionCausalLM

    before = _full_trainable(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    cfg = TrainConfig(
        batch_size=2, max_steps=1, lr=1.0, warmup_steps=0, lr_schedule="constant", progress=False, max_grad_norm=None
    )
    train_loop(
        model,
        examples,
        cfg,
        optimizer=opt,
        pad_token_id=0,
        packing=False,
        max_seq_len=512,
        objective=VisionCausalLM(proc, None),
        dist=dist,
        log=lambda m: None,
    )
    return {n: w - before[n] for n, w in _full_trainable(model).items()}


def _ranks(ctx, tmp, seed):
    model, proc, examples = _setup(tmp, seed)
    cfg = QLoRAConfig(r=4, init_lora_weights="random", train_vision=True, attention="sdpa")
    torch.manual_seed(seed)
    ref = build_training_model(copy.deepcopy(model), cfg)
    want = _step(ref, proc, examples)  # one process, both rows (no collective)
    torch.manual_seed(seed)
    sharded = build_training_model(model, cfg, sharding=fsdp.FSDPConfig(mixed_precision=False), mesh=ctx.mesh)
    got = _step(sharded, proc, examples, dist=ctx)
    assert got.keys() == want.keys() and any(".visual." in n for n in got)
    bound = reorder_tolerance(torch.float32, 320, 2 * 13)
    for name, w in want.items():
        assert_close_rel(got[name], w, bound, f"rank {ctx.rank} {name}")


@pytest.mark.slow  # ~2 min on 2 busy cores (two ranks, two model builds each)
def test_vision_lora_reduced_when_one_rank_has_no_image(seed, tmp_path):
    run_ranks(_ranks, 2, tmp_path, seed, timeout=240)
