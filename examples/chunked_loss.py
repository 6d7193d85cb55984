"""The chunked linear + loss in three uses (runs on CPU in a few seconds; on a GPU if there is one).

    python examples/chunked_loss.py

1. `chunked_linear_loss`: cross-entropy of `hidden @ W.T` without the [tokens, vocab] logits, checked against
   the naive computation.
2. The challenge specification's interface: `MemoryEfficientLinear.apply(X, linear, labels, forward_function)`.
3. A Hugging Face causal LM whose training loss goes through it: `enable_chunked_loss(model)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quickloris import MemoryEfficientLinear, chunked_linear_loss

device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)

# 1. Functional API: explicit weight (and bias) tensors, gradients to all of them.
tokens, hidden, vocab = 2048, 256, 32000
x = torch.randn(tokens, hidden, device=device, requires_grad=True)
w = (torch.randn(vocab, hidden, device=device) * hidden**-0.5).requires_grad_()
y = torch.randint(0, vocab, (tokens,), device=device)
y[:100] = -100  # ignored (e.g. prompt) tokens
loss = chunked_linear_loss(x, w, y, chunk_size=256, label_smoothing=0.1)  # mean over scored tokens
loss.backward()
dx, dw = x.grad.clone(), w.grad.clone()
x.grad = w.grad = None
naive = F.cross_entropy((x @ w.T).float(), y, label_smoothing=0.1)
naive.backward()
print(
    f"1. chunked {loss.item():.6f} vs naive {naive.item():.6f}; "
    f"max |dX diff| {(dx - x.grad).abs().max():.2e}, max |dW diff| {(dw - w.grad).abs().max():.2e}"
)

# Per-token log-probabilities at a temperature (reduction="none"), e.g. for RL losses.
logp = chunked_linear_loss(x.detach(), w.detach(), y, loss="token_logprobs", reduction="none", temperature=0.7)
print(f"   token log-probs: shape {tuple(logp.shape)}, mean over scored tokens {logp[y != -100].mean():.4f}")


# 2. The specification's class and forward function.
def transformation_function(batch, linear, labels):
    z = linear(batch).float()  # up-projection to the vocabulary, upcast to fp32
    return torch.nn.CrossEntropyLoss(reduction="sum")(z.view(-1, z.shape[-1]), labels.view(-1))


linear = torch.nn.Linear(hidden, vocab, bias=False, device=device)
X = torch.randn(4, 512, hidden, device=device, requires_grad=True)
labels = torch.randint(0, vocab, (4, 512), device=device)
out = MemoryEfficientLinear.apply(X, linear, labels, transformation_function, 512)  # 512 rows per chunk
out.backward()
print(f"2. spec class: loss {out.item():.2f}, dW norm {linear.weight.grad.norm():.4f}, dX norm {X.grad.norm():.4f}")

# 3. A Hugging Face model (random init, tiny) trained with the chunked loss: no logits in training.
try:
    import transformers
except ImportError:
    raise SystemExit("3. skipped: transformers is not installed") from None
from quickloris.models.chunked_loss import enable_chunked_loss  # noqa: E402 - needs transformers

cfg = transformers.LlamaConfig(
    vocab_size=vocab,
    hidden_size=hidden,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
model = transformers.LlamaForCausalLM(cfg).to(device).train()
ids = torch.randint(0, vocab, (2, 256), device=device)
reference = model(input_ids=ids, labels=ids).loss
enable_chunked_loss(model, chunk_size=128)
out = model(input_ids=ids, labels=ids)
out.loss.backward()
print(f"3. HF loss {reference.item():.6f}, chunked {out.loss.item():.6f}, logits returned: {out.logits}")
