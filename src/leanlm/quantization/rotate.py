"""Hadamard rotations folded into a model before quantizing it (QuaRot, Ashkboos et al. 2024).

A rotation by an orthogonal matrix Q changes no float output when it is folded into the weights on both
sides of a tensor, but it spreads a few huge channels (SmolLM2's attention-sink outliers) over all of
them, so 4-bit weights and activations lose less. `rotate(model, "hadamard")` does, in float64:

1. **Norms into Linears.** Each RMSNorm's scale (Gemma: 1 + w) is multiplied into the Linears that read
   it (q/k/v, gate/up, the head) and set to 1; RMSNorm without a scale commutes with any rotation.
   A tied head is untied first (the embedding is rotated on its output side, the head on its input side).
2. **Residual stream.** The embedding rows are multiplied by Q, every Linear that reads the residual
   (q/k/v, gate/up, head) by Q on its input side and every Linear that writes it (o_proj, down_proj) by
   Q^T on its output side.
3. **Inside attention.** Each value head is rotated by a Hadamard matrix of the head size and o_proj's
   matching input columns by the same matrix (per head, so grouped-query heads stay consistent).
4. **Online, before down_proj** (``hadamard``, not ``hadamard-fold``). The MLP's intermediate activation
   passes a nonlinearity, so its rotation cannot be folded on both sides: down_proj's weight is rotated
   on its input side and an `OnlineHadamard` module (``Linear.input_transform``, run by a forward pre-hook
   before the input quantizer) rotates its input at run time. `attach_online` restores it on load; the
   leanlm runtime and the ONNX exporter carry it, GGUF and compressed-tensors refuse it (docs/quantization.md).

Construction of Q for a size n: a Kronecker product of Hadamard factors, each Sylvester (2^k) or Paley I
(q + 1 for a prime q = 3 mod 4: 12, 20, 24, 44, 48, ...), normalised to be orthogonal, e.g. 576 =
12 x 12 x 4 for SmolLM2's hidden size, 1536 = 12 x 128 for its MLP; the residual's Q also gets random
signs (QuaRot's randomised Hadamard, seeded). A size with no such factorisation takes a seeded random
orthogonal matrix for its odd part (folded rotations only: the online one must be rebuilt exactly on load,
so there a size without a Hadamard is an error).

**Massive channels stay out** (``keep``; `quantize` detects them on its calibration text with `massive_channels`). A
few residual channels carry massive activations on a few tokens (SmolLM2-135M: channel 507 reaches ~25,000 on the
attention-sink token, channel 247 ~1,900, against a median channel maximum of ~50), and the norms that read them
scale them almost to zero (post-attention norm weight -0.0006 on channel 507). Unrotated, a 4-bit grid keeps such
a near-zero column near zero. Rotated, the sink token's input is that one huge channel spread over every input
column and the weights' rounding error is no longer suppressed on it, so the sink token's q/k/v and MLP outputs
are corrupted and every later token's attention with them (measured on 2 x 512 held-out tokens: RTN int4 g64
weights alone went from +59% to +171% perplexity with a full rotation). The residual rotation is therefore block-diagonal: identity on the
kept channels, whose norm scales stay in the norm (a diagonal scale commutes with it there), and a randomised
orthogonal rotation of the other n - k channels (a Hadamard when n - k has one, else a seeded random orthogonal
odd part: it is folded, never rebuilt).

Families: Llama, Mistral, Qwen2, Qwen3 and Phi-3. Gemma-3 is refused: its post-attention and
post-feedforward norms scale each block's output after normalising it, right before the residual add, and
that per-channel scale cannot move through a rotation of the residual stream.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import nn

from ..core.arch import arch_of
from ..core.errors import LeanLMError

METHODS = ("hadamard", "hadamard-fold")


# ----------------------------------------------------------------------------------- matrices


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _paley(n: int) -> torch.Tensor:
    """Paley's first construction: a Hadamard matrix of order n = q + 1, q prime and q = 3 (mod 4)."""
    q = n - 1
    squares = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if i in squares else -1 for i in range(1, q)]
    jac = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jac
    return s + torch.eye(n, dtype=torch.float64)


def _paley_ok(m: int) -> bool:
    return m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3


def hadamard_factors(n: int) -> list[int] | None:
    """Sizes of Hadamard factors whose Kronecker product has order n (powers of two last), or None."""
    if n & (n - 1) == 0:
        return [n]
    for m in range(12, n + 1, 4):
        if n % m == 0 and m & (m - 1) and _paley_ok(m):
            rest = hadamard_factors(n // m)
            if rest is not None:
                return [m, *rest]
    return None


@lru_cache(maxsize=None)
def _factor(m: int) -> torch.Tensor:
    h = _sylvester(m) if m & (m - 1) == 0 else _paley(m)
    if not torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.float64)):   # the construction's own check
        raise AssertionError(f"Hadamard construction of order {m} failed")
    return h / math.sqrt(m)


def _random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    return (q * torch.sign(torch.diagonal(r))).contiguous()


def orthogonal_factors(n: int, gen: torch.Generator | None = None) -> tuple[list[torch.Tensor], str]:
    """Orthogonal factors (float64) whose Kronecker product is n x n, and a description of the construction.
    Without `gen`, a size with no Hadamard construction is an error."""
    sizes = hadamard_factors(n)
    if sizes is not None:
        return [_factor(m) for m in sizes], "hadamard " + " x ".join(map(str, sizes))
    if gen is None:
        raise LeanLMError(f"size {n} has no Hadamard construction leanlm knows (2^k times Paley orders q+1, q prime = 3 mod 4); "
                          "use rotate='hadamard-fold', which needs no online rotation")
    two = n & -n
    return [_random_orthogonal(n // two, gen), _factor(two)], f"random orthogonal {n // two} x hadamard {two}"


def kron(factors: list[torch.Tensor]) -> torch.Tensor:
    out = factors[0]
    for f in factors[1:]:
        out = torch.kron(out.contiguous(), f.contiguous())
    return out


def kron_apply(x: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """x @ kron(factors) without forming it: one small matmul per factor along its own axis."""
    sizes = [f.shape[0] for f in factors]
    lead = x.shape[:-1]
    y = x.reshape(-1, *sizes)
    last = len(sizes)   # positive axes only: ONNX export traces them
    for i, h in enumerate(factors):
        h = h.to(y.dtype)
        y = y @ h if i + 1 == last else (y.transpose(i + 1, last) @ h).transpose(i + 1, last)
    return y.reshape(*lead, x.shape[-1])


class OnlineHadamard(nn.Module):
    """x -> x H for a Kronecker product of Hadamard factors, applied factor by factor (n * sum of the factor
    sizes multiply-adds per row instead of n^2). The factors are rebuilt from the size, never saved."""

    def __init__(self, n: int):
        super().__init__()
        factors, self.construction = orthogonal_factors(n)
        self.n, self.sizes = n, [f.shape[0] for f in factors]
        for i, f in enumerate(factors):
            self.register_buffer(f"h{i}", f.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kron_apply(x, [getattr(self, f"h{i}") for i in range(len(self.sizes))])

    def extra_repr(self) -> str:
        return self.construction


def _run_input_transform(mod: nn.Module, args: tuple):
    """Forward pre-hook: the Linear's input passes its `input_transform` first (so the input quantizer and the
    calibration hooks registered later see the rotated input). A plain function: deep copies keep working."""
    return (mod.input_transform(args[0]), *args[1:])


def set_input_transform(linear: nn.Linear, n: int) -> None:
    linear.input_transform = OnlineHadamard(n)
    linear.register_forward_pre_hook(_run_input_transform)


# ----------------------------------------------------------------------------------- folding


def check_rotatable(model: nn.Module, method: str):
    """The model's adapter, or a LeanLMError saying why this model cannot be rotated."""
    if method not in METHODS:
        raise LeanLMError(f"unknown rotation {method!r}; choose one of: {', '.join(METHODS)}")
    arch = arch_of(model)
    if arch.family == "gemma3":
        raise LeanLMError("rotate: Gemma-3 cannot absorb a rotation of the residual stream: its post-attention and post-feedforward "
                          "norms scale each block's output after normalising it, just before the residual add, and that scale does "
                          "not commute with a rotation; quantize Gemma-3 without a rotation")
    if getattr(model, "leanlm_rotation", None):
        raise LeanLMError("this model is already rotated; rotate the float model once")
    for n, m in model.named_modules():
        if getattr(m, "weight_quantizer", None) is not None:
            raise LeanLMError("this model is already quantized; a rotation must be folded into the float model before quantizing it")
        if getattr(m, "weight_mask", None) is not None:
            raise LeanLMError(f"{n} carries a sparsity mask, which a rotation would destroy; rotate (quantize with the rotation) "
                              "before sparsifying")
    return arch


@torch.no_grad()
def massive_channels(model: nn.Module, ids: torch.Tensor, ratio: float = 32.0, limit: int = 8, rows: int = 2) -> list[int]:
    """Residual channels holding massive activations (Sun et al. 2024, "Massive Activations in LLMs"): a channel
    whose largest |value| entering some decoder layer is at least `ratio` times that layer's median channel
    maximum, on the first `rows` calibration rows; at most `limit`, largest first. SmolLM2-135M: channel 507
    (about 25,000 on the attention-sink token against a median of 50)."""
    arch = arch_of(model)
    score = torch.zeros(arch.hidden, dtype=torch.float64)

    def hook(mod, args, kwargs):
        x = (args[0] if args else kwargs["hidden_states"]).detach().abs().reshape(-1, arch.hidden).amax(0).double()
        score.copy_(torch.maximum(score, x / x.median().clamp_min(1e-12)))

    hs = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in arch.layers(model)]
    try:
        model(ids[:rows], use_cache=False)
    finally:
        for h in hs:
            h.remove()
    top = score.topk(min(limit, arch.hidden - 1))
    return [int(c) for v, c in zip(top.values.tolist(), top.indices.tolist()) if v >= ratio]


def _fuse_norm(norm: nn.Module, linears: list[nn.Linear], offset: float, keep: list[int] = ()) -> None:
    """Move the norm's scale into the Linears that read it, except on the `keep` channels (which the residual
    rotation leaves alone, so their scale still commutes with it and stays in the norm)."""
    g = norm.weight.data.double() + offset
    g[list(keep)] = 1.0
    for m in linears:
        m.weight.data.copy_((m.weight.data.double() * g).to(m.weight.dtype))
    rest = torch.ones_like(norm.weight.data, dtype=torch.bool)
    rest[list(keep)] = False
    norm.weight.data[rest] = 1.0 - offset


def _mul_in(m: nn.Linear, q: torch.Tensor) -> None:
    """Rotate a Linear's input side: W <- W Q (it then reads x Q)."""
    m.weight.data.copy_((m.weight.data.double() @ q).to(m.weight.dtype))


def _mul_out(m: nn.Linear, q: torch.Tensor, rows: slice = slice(None)) -> None:
    """Rotate (some of) a Linear's output rows: y <- y Q."""
    w = m.weight.data
    w[rows] = (q.T @ w[rows].double()).to(w.dtype)
    if m.bias is not None:
        m.bias.data[rows] = (m.bias.data[rows].double() @ q).to(m.bias.dtype)


@torch.no_grad()
def rotate(model: nn.Module, method: str = "hadamard", seed: int = 0, keep: list[int] | None = None) -> dict:
    """Fold a Hadamard rotation into a float model in place (see the module docstring); returns the record
    kept as ``model.leanlm_rotation`` and saved in the manifest. The float model's outputs are unchanged.
    `keep`: residual channels left out of the residual rotation (massive activations, `massive_channels`)."""
    arch = check_rotatable(model, method)
    keep = sorted({int(c) for c in keep or ()})
    if any(not 0 <= c < arch.hidden for c in keep) or len(keep) >= arch.hidden:
        raise LeanLMError(f"rotate: keep channels {keep} must be fewer than, and lie in, the hidden size {arch.hidden}")
    gen = torch.Generator().manual_seed(seed)
    body, layers = arch.body(model), arch.layers(model)
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.bias is not None:
        raise LeanLMError(f"{arch.model_type}: rotation needs a bias-free output head")
    if head.weight is emb.weight:   # untie: the two sides are rotated differently
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
        model.config.tie_word_embeddings = False
        arch_cfg = getattr(model.config, "get_text_config", lambda: model.config)()
        arch_cfg.tie_word_embeddings = False

    off = arch.norm_offset
    for layer in layers:
        sub = layer.get_submodule
        _fuse_norm(sub(arch.attn_norm), [sub(n) for n in arch.qkv], off, keep)
        _fuse_norm(sub(arch.post_attn_norm), [sub(n) for n in arch.gate_up], off, keep)
    _fuse_norm(body.norm, [head], off, keep)

    rest = [c for c in range(arch.hidden) if c not in set(keep)]
    factors, construction = orthogonal_factors(len(rest), gen)
    qr = kron(factors)
    qr = qr * torch.where(torch.rand(len(rest), generator=gen, dtype=torch.float64) < 0.5, -1.0, 1.0)[:, None]
    q = torch.eye(arch.hidden, dtype=torch.float64)
    idx = torch.tensor(rest)
    q[idx[:, None], idx[None, :]] = qr
    emb.weight.data.copy_((emb.weight.data.double() @ q).to(emb.weight.dtype))
    _mul_in(head, q)
    hv = kron(orthogonal_factors(arch.head_dim)[0])
    kv_rows = arch.kv_heads * arch.head_dim
    online = {}
    for i, layer in enumerate(layers):
        sub = layer.get_submodule
        for n in (*arch.qkv, *arch.gate_up):
            _mul_in(sub(n), q)
        o, down = sub(arch.o), sub(arch.down)
        _mul_out(o, q)
        _mul_out(down, q)
        # values per head (the last kv_heads * head_dim rows of a fused qkv), o_proj's input columns per head
        v = sub(arch.qkv[-1])
        start = v.out_features - kv_rows
        for h in range(arch.kv_heads):
            _mul_out(v, hv, slice(start + h * arch.head_dim, start + (h + 1) * arch.head_dim))
        w = o.weight.data
        o.weight.data.copy_((w.double().reshape(w.shape[0], -1, arch.head_dim) @ hv).reshape(w.shape).to(w.dtype))
        if method == "hadamard":
            n_mid = down.in_features
            w = down.weight.data
            w.copy_(kron_apply(w.double(), orthogonal_factors(n_mid)[0]).to(w.dtype))
            set_input_transform(down, n_mid)
            online[f"{arch.layers_prefix()}{i}.{arch.down}"] = n_mid
    record = {"method": method, "seed": seed, "residual": construction + " with random signs", "keep": keep,
              "attention": f"hadamard {arch.head_dim} per value head", "online": online}
    model.leanlm_rotation = record
    return record


def attach_online(model: nn.Module, record: dict) -> None:
    """Restore the online rotations of a saved rotated model (its weights already hold the folded ones)."""
    mods = dict(model.named_modules())
    for name, n in (record.get("online") or {}).items():
        m = mods.get(name)
        if not isinstance(m, nn.Linear) or m.in_features != n:
            raise LeanLMError(f"the saved rotation names {name} (input size {n}), which this model lacks; the checkpoint is corrupt")
        set_input_transform(m, n)
    model.leanlm_rotation = record


def online_transforms(model: nn.Module) -> dict[str, nn.Module]:
    """Linears whose input is rotated at run time (name -> transform)."""
    return {n: m.input_transform for n, m in model.named_modules() if getattr(m, "input_transform", None) is not None}
