"""One architecture adapter per model family: everything leanlm needs to know about a decoder's layout.

`arch_of(model)` reads a transformers model (or its config) once into a frozen `Arch`: where the
decoder layers are, which projections read the same input (q/k/v, gate/up; Phi-3's fused qkv_proj and
gate_up_proj), the norms and their offset (Gemma scales by 1 + w), embedding scale, RoPE and sliding
windows per layer, q/k norms, attention scale, soft-cap, tied head, and the GGUF architecture string.
The runtime, calibration, pruning, drafts, profiling and the exporters read these facts from here
instead of re-deriving them. A family not listed in `FAMILIES` is refused, never guessed.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import LeanLMError

# model_type -> family
FAMILIES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
            "gemma3_text": "gemma3", "gemma3": "gemma3", "phi3": "phi3"}
SUPPORTED = "Llama (SmolLM2, Llama 3), Mistral, Qwen2/Qwen2.5, Qwen3, Gemma-3, Phi-3"
# family -> llama.cpp architecture (gguf.MODEL_ARCH); Mistral runs on llama.cpp's llama graph
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3", "phi3": "phi3"}


@dataclass(frozen=True)
class Arch:
    family: str                    # llama | mistral | qwen2 | qwen3 | gemma3 | phi3
    model_type: str
    body_path: str                 # module holding embed_tokens, layers, norm, rotary_emb ("model")
    n_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    eps: float
    # projection names relative to a decoder layer; each of qkv / gate_up reads one input tensor
    qkv: tuple[str, ...]           # ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj") or Phi-3's fused one
    o: str
    gate_up: tuple[str, ...]       # ("mlp.gate_proj", "mlp.up_proj") or Phi-3's fused one (gate rows first)
    down: str
    # norms relative to a decoder layer: before attention, after attention (Gemma: applied to the attention
    # output), and Gemma's pre/post feed-forward norms ("sandwich" norms)
    attn_norm: str
    post_attn_norm: str
    ffn_norms: tuple[str, ...]     # ("mlp.pre_feedforward_layernorm", ...) for Gemma-3, else ()
    qk_norms: tuple[str, ...]      # ("self_attn.q_norm", "self_attn.k_norm") per head (Qwen3, Gemma-3), else ()
    norm_offset: float             # RMSNorm scale is (offset + w): 1.0 for Gemma, 0.0 otherwise
    embed_scale: float             # Gemma multiplies embeddings by sqrt(hidden)
    act: str                       # "silu" or "gelu_tanh"
    attn_scale: float              # softmax scale
    rope_theta: float
    rope_local_theta: float | None  # Gemma-3's sliding layers
    rotary_dim: int                # Phi-3 may rotate only part of each head
    rope_by_layer_type: bool       # Gemma-3: the rotary embedding takes layer_type (local / global)
    rope_type: str
    windows: tuple                 # per layer: sliding-window size or None
    final_softcap: float | None
    tied: bool
    max_positions: int

    @property
    def gguf_arch(self) -> str:
        return GGUF_ARCH[self.family]

    @property
    def groups(self) -> tuple[tuple[str, ...], ...]:
        """Per-layer projections grouped by the input they read: qkv, o, gate/up, down."""
        return (self.qkv, (self.o,), self.gate_up, (self.down,))

    @property
    def fused(self) -> bool:
        """Phi-3 stores q/k/v and gate/up as one Linear each."""
        return len(self.qkv) == 1

    @property
    def layer_norms(self) -> tuple[str, ...]:
        return (self.attn_norm, self.post_attn_norm, *self.ffn_norms)

    def body(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.body_path)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.body(model).layers

    def layers_prefix(self) -> str:
        """State-dict prefix of the decoder layers ("model.layers.")."""
        return f"{self.body_path}.layers."

    def gguf_tensor_map(self):
        """gguf's Hugging Face -> llama.cpp tensor-name map for this family."""
        import gguf

        return gguf.get_tensor_name_map(gguf.MODEL_ARCH[self.gguf_arch.upper()], self.n_layers)


def text_config(model_or_config):
    cfg = getattr(model_or_config, "config", model_or_config)
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _rope(cfg) -> tuple[float, float | None, str, float]:
    """(theta of global layers, theta of sliding layers if they differ, rope type, partial rotary factor)."""
    rp = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    local = None
    if "full_attention" in rp:   # Gemma-3: one set per layer type
        local = float(rp.get("sliding_attention", {}).get("rope_theta", 10000.0))
        rp = rp["full_attention"]
    theta = rp.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    return float(theta), local, str(rp.get("rope_type", rp.get("type", "default")) or "default"), \
        float(rp.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) or 1.0)


def arch_or_none(model: nn.Module) -> Arch | None:
    """The adapter, or None for a model type outside `FAMILIES` (for generic code such as block-by-block
    calibration and `leanlm info`, which also handle other transformer stacks)."""
    return arch_of(model) if FAMILIES.get(getattr(text_config(model), "model_type", None)) else None


def arch_of(model: nn.Module) -> Arch:
    """The adapter of a transformers causal LM (or of its config: then `body_path` assumes "model").
    Raises LeanLMError for a model type outside `FAMILIES`."""
    cfg = text_config(model)
    mt = getattr(cfg, "model_type", None)
    family = FAMILIES.get(mt)
    if family is None:
        name = type(model).__name__
        raise LeanLMError(f"leanlm does not know the architecture of {name} (model_type {mt!r}); supported families: {SUPPORTED}")
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    n = cfg.num_hidden_layers
    theta, local_theta, rope_type, partial = _rope(cfg)
    types = getattr(cfg, "layer_types", None)
    window = getattr(cfg, "sliding_window", None)
    if types:
        windows = tuple(window if t == "sliding_attention" else None for t in types)
    else:   # Mistral / Phi-3: a configured window applies to every layer
        windows = (window,) * n if window and family in ("mistral", "phi3") else (None,) * n
    body_path = "model"
    if isinstance(model, nn.Module) and hasattr(model, "model") and hasattr(model.model, "language_model"):
        body_path = "model.language_model"   # Gemma-3's multimodal wrapper
    gemma = family == "gemma3"
    act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu")
    act = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}.get(act)
    if act is None:
        raise LeanLMError(f"{mt}: activation {getattr(cfg, 'hidden_act', None)!r} is not one leanlm runs (silu, gelu_pytorch_tanh)")
    if getattr(cfg, "attn_logit_softcapping", None):
        raise LeanLMError(f"{mt}: attention logit soft-capping is not supported by leanlm")
    phi = family == "phi3"
    return Arch(
        family=family, model_type=mt, body_path=body_path, n_layers=n, hidden=cfg.hidden_size, heads=cfg.num_attention_heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads, head_dim=hd,
        intermediate=cfg.intermediate_size, vocab=cfg.vocab_size, eps=float(cfg.rms_norm_eps),
        qkv=("self_attn.qkv_proj",) if phi else ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        o="self_attn.o_proj",
        gate_up=("mlp.gate_up_proj",) if phi else ("mlp.gate_proj", "mlp.up_proj"),
        down="mlp.down_proj",
        attn_norm="input_layernorm", post_attn_norm="post_attention_layernorm",
        ffn_norms=("pre_feedforward_layernorm", "post_feedforward_layernorm") if gemma else (),
        qk_norms=("self_attn.q_norm", "self_attn.k_norm") if family in ("qwen3", "gemma3") else (),
        norm_offset=1.0 if gemma else 0.0,
        embed_scale=cfg.hidden_size ** 0.5 if gemma else 1.0,
        act=act,
        attn_scale=cfg.query_pre_attn_scalar ** -0.5 if gemma else hd ** -0.5,
        rope_theta=theta, rope_local_theta=local_theta, rotary_dim=int(hd * partial), rope_by_layer_type=gemma, rope_type=rope_type,
        windows=windows,
        final_softcap=getattr(cfg, "final_logit_softcapping", None),
        tied=bool(getattr(cfg, "tie_word_embeddings", False)),
        max_positions=int(getattr(cfg, "max_position_embeddings", 2048) or 2048),
    )
