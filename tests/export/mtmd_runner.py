"""llama.cpp's multimodal runtime (libmtmd, through llama-cpp-python's bindings) on an exported pair of files, and the
Hugging Face model on the same inputs, for the vision export tests.

`run_mtmd` loads ``model.gguf`` + ``model.mmproj.gguf``, tokenizes a prompt holding one image (libmtmd's marker
``<__media__>``), returns every chunk's text tokens and image embeddings (as libmtmd encodes them), evaluates the
prompt and generates greedily, with the logits of every step. `ggml_activations` makes an HF model compute GELU and
quick-GELU as ggml's CPU code does (through tables of fp16 values), the one place where llama.cpp's F32 arithmetic
is not float32.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

MARKER = "<__media__>"


@dataclass
class MtmdRun:
    text_chunks: list[list[int]] = field(default_factory=list)
    image_embeddings: list[np.ndarray] = field(default_factory=list)  # one [n_tokens, n_embd] per image chunk
    chunk_kinds: list[str] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)  # after the prompt, then after each generated token
    tokens: list[int] = field(default_factory=list)


def _bindings(lib_dir):
    os.environ["MTMD_CPP_LIB"] = str(lib_dir)  # read when llama_cpp.mtmd_cpp is first imported
    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd

    loaded = Path(mtmd._libmtmd._name).resolve().parent
    if loaded != Path(lib_dir).resolve():
        raise RuntimeError(f"llama_cpp.mtmd_cpp was loaded from {loaded}, not {lib_dir}")
    return llama_cpp, mtmd


def run_mtmd(
    lib_dir, model_path, mmproj_path, prompt: str, image, n_gen: int, *, threads: int = 2, never: tuple[int, ...] = ()
) -> MtmdRun:
    """Encode `image` and generate `n_gen` tokens greedily after `prompt` (which holds `MARKER` once), never choosing
    a token of `never` (a random model may rank an image placeholder first; fed back to the HF model it would be read
    as an image slot, a different computation). The logits are returned as computed, those tokens' included."""
    llama_cpp, M = _bindings(lib_dir)
    out = MtmdRun()
    mparams = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), mparams)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {model_path}")
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = 512
    cparams.n_threads = cparams.n_threads_batch = threads
    cparams.type_k = cparams.type_v = 0  # F32 KV cache: an F16 one alone costs ~1e-3 of the logits
    cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    mp = M.mtmd_context_params_default()
    mp.use_gpu, mp.n_threads, mp.warmup, mp.print_timings = False, threads, False, False
    mp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # its CPU kernel rounds K and V to fp16
    mctx = M.mtmd_init_from_file(str(mmproj_path).encode(), model, mp)
    if not mctx:
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
        raise RuntimeError(f"libmtmd could not load {mmproj_path}")
    chunks = bitmap = None
    try:
        rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        buf = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes())
        bitmap = M.mtmd_bitmap_init(image.width, image.height, buf)
        chunks = M.mtmd_input_chunks_init()
        text = M.mtmd_input_text(prompt.encode(), len(prompt.encode()), True, True)
        bitmaps = (M.mtmd_bitmap_p_ctypes * 1)(bitmap)
        if M.mtmd_tokenize(mctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
            raise RuntimeError("mtmd_tokenize failed")
        n_embd = llama_cpp.llama_model_n_embd(model)
        for i in range(M.mtmd_input_chunks_size(chunks)):
            chunk = M.mtmd_input_chunks_get(chunks, i)
            n = M.mtmd_input_chunk_get_n_tokens(chunk)
            if M.mtmd_input_chunk_get_type(chunk) == M.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n_tok = ctypes.c_size_t()
                ptr = M.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n_tok))
                out.text_chunks.append([ptr[j] for j in range(n_tok.value)])
                out.chunk_kinds.append("text")
            else:
                if M.mtmd_encode_chunk(mctx, chunk) != 0:
                    raise RuntimeError("mtmd_encode_chunk failed")
                emb = M.mtmd_get_output_embd(mctx)
                out.image_embeddings.append(np.ctypeslib.as_array(emb, shape=(n * n_embd,)).reshape(n, n_embd).copy())
                out.chunk_kinds.append("image")
        n_past = llama_cpp.llama_pos(0)
        if M.mtmd_helper_eval_chunks(mctx, ctx, chunks, 0, 0, 512, True, ctypes.byref(n_past)) != 0:
            raise RuntimeError("mtmd_helper_eval_chunks failed")
        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        batch = llama_cpp.llama_batch_init(1, 0, 1)
        try:
            pos = n_past.value
            for step in range(n_gen + 1):
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).copy()
                out.logits.append(logits)
                if step == n_gen:
                    break
                allowed = logits.copy()
                allowed[list(never)] = -np.inf
                tok = int(allowed.argmax())
                out.tokens.append(tok)
                batch.n_tokens = 1
                batch.token[0], batch.pos[0], batch.n_seq_id[0], batch.logits[0] = tok, pos, 1, 1
                batch.seq_id[0][0] = 0
                if llama_cpp.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed")
                pos += 1
        finally:
            llama_cpp.llama_batch_free(batch)
    finally:
        if chunks:
            M.mtmd_input_chunks_free(chunks)
        if bitmap:
            M.mtmd_bitmap_free(bitmap)
        M.mtmd_free(mctx)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    return out


# ---- the HF side ------------------------------------------------------------------------------------------------


def ggml_gelu(x: torch.Tensor) -> torch.Tensor:
    """ggml's CPU GELU: x rounded to fp16, the tanh approximation looked up in a table of fp16 values (0 below -10,
    x above 10)."""
    x16 = _rounded(x, "F16")
    g = 0.5 * x16 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * x16 * (1.0 + 0.044715 * x16 * x16)))
    g = _rounded(g, "F16")
    return torch.where(x <= -10.0, torch.zeros_like(x), torch.where(x >= 10.0, x, g))


def ggml_gelu_quick(x: torch.Tensor) -> torch.Tensor:
    """ggml's CPU quick-GELU, x * sigmoid(1.702 x): x rounded to fp16, the value looked up in a table of fp16 values."""
    x16 = _rounded(x, "F16")
    return _rounded(x16 * (1.0 / (1.0 + torch.exp(-1.702 * x16))), "F16")


class _Act(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def round_to(x: torch.Tensor, qtype: str) -> torch.Tensor:
    """`x` as ggml rounds a matmul's activations for weights of `qtype` (their ``vec_dot_type``): F32 kept, F16 /
    BF16 rounded to that type, Q8_0 quantized in blocks of 32 along the last dimension (the C++ core's quantizer,
    byte-identical to ggml's)."""
    if qtype in ("F32", "F16W"):
        return x
    if qtype in ("F16", "BF16", "Q8_0"):
        return _rounded(x, qtype)
    raise ValueError(qtype)


# ---- how far one rounding falling the other way moves the twin's output -----------------------------------------

# inside `flip_bound`: each rounding the twin made, as (its value, one step there, for Q8_0 the relative step of each
# block's fp16 scale, else None)
_FLIPS: list | None = None


def _step(r: torch.Tensor, qtype: str) -> torch.Tensor:
    """The distance from each rounded value `r` to its farther neighbour of `qtype`: one step of the type there.
    fp16 / bf16: the spacing of the binade of r (2^(e-11) / 2^(e-8) for |r| in [2^(e-1), 2^e)), an upper bound for
    either neighbour, at least the smallest subnormal; Q8_0: the block's quantum, its largest magnitude / 127."""
    if qtype == "Q8_0":
        blocks = r.reshape(*r.shape[:-1], -1, 32)
        return (blocks.abs().amax(-1, keepdim=True) / 127).expand_as(blocks).reshape(r.shape)
    mant = {"F16": 11, "BF16": 8}[qtype]
    _, e = torch.frexp(r)
    return torch.exp2((e - mant).float()).clamp_min(2.0**-24 if qtype == "F16" else 2.0**-133)


def _rounded(x: torch.Tensor, qtype: str) -> torch.Tensor:
    """x rounded as ggml rounds it to `qtype`; inside `flip_bound` the rounding passes gradients straight through
    (its value is unchanged) and is recorded with its step."""
    if qtype == "F16":
        r = x.to(torch.float16).float()
    elif qtype == "BF16":
        r = x.to(torch.bfloat16).float()
    else:  # Q8_0
        from quickloris.export.quants import GGMLType, dequantize, quantize

        a = x.detach().float().contiguous().numpy()
        r = torch.from_numpy(dequantize(quantize(a, GGMLType.Q8_0, threads=1), GGMLType.Q8_0, a.shape, threads=1))
    if _FLIPS is None:
        return r
    r = r.detach()
    # the rounded value, with d y / d x = 1 (a leaf where x has no graph: the pixels)
    y = x + (r - x.detach()) if x.requires_grad else r.clone().requires_grad_()
    scale_step = None
    if qtype == "Q8_0":  # the block's scale, amax / 127 rounded to fp16: its flip moves all 32 values of the block
        d = (x.detach().reshape(*x.shape[:-1], -1, 32).abs().amax(-1) / 127).to(torch.float16).float()
        scale_step = torch.where(d > 0, _step(d, "F16") / d.clamp_min(2.0**-24), torch.zeros_like(d))
    _FLIPS.append((y, _step(r, qtype), scale_step))
    return y


def flip_bound(fn, far_from: np.ndarray, rows: int = 256) -> tuple[np.ndarray, float]:
    """(fn(), B): fn computes with the twin (`ggml_twin`, `llava_twin_features`); B bounds, to first order, how far
    an element of its output moves when one of the twin's roundings falls on the other side, the one way in which
    llama.cpp's result differs from the twin's beyond float32 noise: max over every rounded element e of (one step
    of its type at e) x max_k |d out_k / d e|, the Jacobian taken with each rounding passed straight through; for a
    Q8_0 rounding also its block's fp16 scale one step off, which moves the block's 32 values together (each by its
    share, value x the scale's relative step): max over blocks and k of |sum_e d out_k / d e x value_e| x that
    relative step. The max
    over k runs over the `rows` outputs farthest from `far_from` (llama.cpp's), where a flip shows: the Jacobian of
    every output of the Qwen towers costs ~20 s, and a bound over fewer outputs is smaller, so a check against it is
    stricter than against all."""
    global _FLIPS
    _FLIPS = []
    try:
        with torch.enable_grad():
            out = fn()
            sites = [(y, s, b) for y, s, b in _FLIPS if y.requires_grad]
            far = np.argsort(-np.abs(far_from - out.detach().numpy()).ravel(), kind="stable")[:rows]
            one_hot = torch.zeros(len(far), out.numel(), dtype=out.dtype)
            one_hot[torch.arange(len(far)), torch.from_numpy(far)] = 1
            grads = torch.autograd.grad(
                out, [y for y, _, _ in sites], one_hot.reshape(-1, *out.shape), allow_unused=True, is_grads_batched=True
            )
        bound = 0.0
        for g, (y, step, scale_step) in zip(grads, sites):
            if g is None:
                continue
            bound = max(bound, float((g.abs().amax(0) * step).max()))  # one element one step off
            if scale_step is not None:  # a Q8_0 block's scale one fp16 step off: each value moves by its own share
                moved = (g * y.detach()).reshape(len(far), *y.shape[:-1], -1, 32).sum(-1).abs().amax(0)
                bound = max(bound, float((moved * scale_step).max()))
        return out.detach().numpy(), bound
    finally:
        _FLIPS = None


def stored(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """A weight as a file of `qtype` holds it (quantized and dequantized by the C++ core)."""
    from quickloris.export.quants import GGMLType, dequantize, quantize

    if qtype == "F32":
        return w.detach().float()
    a = w.detach().float().contiguous().numpy()
    t = GGMLType[qtype.replace("F16W", "F16")]
    return torch.from_numpy(dequantize(quantize(a, t, threads=1), t, a.shape, threads=1))


class _TwinLinear(torch.nn.Module):
    """A Linear computing as ggml's mul_mat with a weight of `qtype`: the stored weight, the rounded input."""

    def __init__(self, linear: torch.nn.Linear, qtype: str):
        super().__init__()
        self.weight = torch.nn.Parameter(stored(linear.weight, qtype), requires_grad=False)
        self.bias = linear.bias
        self.qtype = qtype

    def forward(self, x):
        return torch.nn.functional.linear(round_to(x, self.qtype), self.weight, self.bias)


class _TwinConv(torch.nn.Module):
    """ggml_conv_2d (im2col + mul_mat): the pixels and the kernel rounded to fp16 (its im2col is F16 unless the
    kernel is BF16, which the exports never write)."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    @property
    def weight(self):  # HF modules read their convolution's dtype through it
        return self.conv.weight

    def forward(self, x):
        w = self.conv.weight.to(torch.float16).float()
        x = _rounded(x, "F16")
        conv = torch.nn.functional.conv3d if isinstance(self.conv, torch.nn.Conv3d) else torch.nn.functional.conv2d
        return conv(x, w, self.conv.bias, self.conv.stride)


@contextlib.contextmanager
def ggml_twin(model, linear_types: dict[str, str] | None = None, convs: tuple[str, ...] = ()):
    """Within the block, `model` computes as llama.cpp's CPU code: GELU / quick-GELU through ggml's fp16 tables, the
    Linear modules named in `linear_types` (module path -> ggml type of their weight in the file) with their stored
    weights and ggml's rounding of their inputs, the convolutions named in `convs` in fp16."""
    swapped = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            path = f"{parent_name}.{name}" if parent_name else name
            kind = type(child).__name__
            if kind in ("GELUActivation", "GELU"):
                new = _Act(ggml_gelu)
            elif kind == "QuickGELUActivation":
                new = _Act(ggml_gelu_quick)
            elif linear_types and path in linear_types:
                new = _TwinLinear(child, linear_types[path])
            elif path in convs:
                new = _TwinConv(child)
            else:
                continue
            setattr(parent, name, new)
            swapped.append((parent, name, child))
    try:
        yield model
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)


def pixel_values(image, mean, std) -> torch.Tensor:
    """[1, 3, H, W] float32: u8 / 255, then (x - mean) / std per channel, as libmtmd and the HF processors do."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255.0)).permute(2, 0, 1)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return ((x - m) / s)[None]


def file_types(model, quant: str) -> dict[str, str]:
    """{HF parameter name: ggml type} of the vision parameters in an mmproj of type `quant` (the export's plan)."""
    from quickloris.export.merge import AdapterPlan, base_parameters, weight_shape
    from quickloris.export.vlm import split, vision_arch_for

    arch = vision_arch_for(model.config)
    params = base_parameters(model)
    s = split(params, AdapterPlan(), arch)
    shapes = {c: weight_shape(params[n]) for c, n in s.vision_names.items()}
    tensors, _ = arch.plan(model.config, shapes, quant)
    return {s.vision_names[t.source]: t.qtype.name for t in tensors}


def linear_types(model, quant: str) -> dict[str, str]:
    """{Linear module path: ggml type of its weight} for `ggml_twin`, of an mmproj of type `quant`."""
    types = file_types(model, quant)
    out = {}
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and f"{path}.weight" in types:
            out[path] = types[f"{path}.weight"]
    return out


def llava_twin_features(model, pixels: torch.Tensor, quant: str, *, cls_last: bool = True) -> torch.Tensor:
    """HF Llava's image features [n_patches, hidden] computed as llama.cpp's CPU code computes them from an mmproj of
    type `quant` (`ggml_twin`). `cls_last`: llama.cpp's llava graph since its refactor (ggml-org/llama.cpp#25814,
    still so in llama-cpp-python 0.3.36) appends the CLS token after the patches while giving position rows and
    selecting outputs as if it came first: patch i gets position row i, CLS row n, and the outputs of patches 1..n-1
    and of CLS are projected. False: HF's order (CLS first)."""
    from quickloris.export.archs.llava import feature_layers

    types = file_types(model, quant)
    vt = model.model.vision_tower
    vt = getattr(vt, "vision_model", vt)
    emb = vt.embeddings
    pos = stored(emb.position_embedding.weight, types[next(n for n in types if "position_embedding" in n)])
    with torch.set_grad_enabled(_FLIPS is not None), ggml_twin(model, linear_types(model, quant), convs=()):
        w = emb.patch_embedding.weight.to(torch.float16).float()
        patches = torch.nn.functional.conv2d(_rounded(pixels, "F16"), w, stride=emb.patch_embedding.stride)
        patches = patches.flatten(2).transpose(1, 2)
        cls = emb.class_embedding[None, None].float()
        x = (torch.cat([patches, cls], 1) if cls_last else torch.cat([cls, patches], 1)) + pos[None]
        x = vt.pre_layrnorm(x)
        for layer in vt.encoder.layers[: max(feature_layers(model.config))]:
            o = layer(x, None)
            x = o[0] if isinstance(o, tuple) else o
        return model.model.multi_modal_projector(x[:, 1:])[0]
