"""GGUF for llama.cpp, written with the `gguf` package.

The families llama.cpp runs, read through the architecture adapter (`core.arch`): Llama and Mistral
(llama.cpp's "llama" graph), Qwen2, Qwen3, Gemma-3 ("gemma3") and Phi-3 ("phi3"). Tensor names come
from `gguf.get_tensor_name_map` for the adapter's GGUF architecture. For the "llama" graph, q_proj /
k_proj rows are permuted from Hugging Face's rotate-half RoPE layout to llama.cpp's interleaved one;
the other graphs rotate halves as Hugging Face does. Gemma's norm weights are written as 1 + w, as
llama.cpp's own converter does.

Quant types (``quant=``): F32, F16, BF16, Q8_0, Q5_0, Q4_0, Q4_1, Q4_K_M. Which tensor gets which
type follows llama.cpp's `llama-quant` rules (the embedding / output head and, for Q4_K_M, the
attn_v / ffn_down layers that get more bits; k-quants fall back to Q5_0 / Q8_0 on rows whose
length is not a multiple of 256), so a file is comparable tensor for tensor with llama.cpp's own
quantization of the same model.

From a leanlm-quantized model, every weight that lies on a symmetric int grid whose groups are a
multiple of 32 (or per channel) is written with leanlm's own codes and scales when the target
type has at least as many bits (int4 -> Q4_0 / Q5_0 / Q8_0; int8 -> Q8_0; asymmetric int4 ->
Q4_1): calibration (AWQ scales folded into norms, clipped ranges, GPTQ rounding) carries over
exactly, except that GGUF stores the scale as fp16. Other weights are quantized by the target
type's quantizer from leanlm's calibrated weights (`gguf.quants`, or `ggml_blocks` for Q4_K /
Q6_K). `export_gguf` returns the path; `last_report` says which tensors were reused exactly, which were
re-quantized and which kept in float, and why (`report_lines` puts it in sentences).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.arch import Arch, arch_of
from ..core.errors import LeanLMError
from ..core.io import atomic_file
from ..quantization.formats import QFormat
from . import ggml_blocks as B
from .common import QuantLinear, check_config_matches, is_leanlm_quantized, plain_state_dict, quantized_linears

QUANTS = ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q4_0", "Q4_1", "Q4_K_M")
SUPPORTED = ("GGUF export takes float models and leanlm weight-only int quantization (int2..int8, symmetric or asymmetric, "
             "per channel or groups of a multiple of 32: presets w8a16, w4a16-*, w3a16-gptq), written as " + ", ".join(QUANTS))

last_report: dict = {}


def _ftype(quant: str):
    import gguf

    F = gguf.LlamaFileType
    return {"F32": F.ALL_F32, "F16": F.MOSTLY_F16, "BF16": F.MOSTLY_BF16, "Q8_0": F.MOSTLY_Q8_0, "Q5_0": F.MOSTLY_Q5_0,
            "Q4_0": F.MOSTLY_Q4_0, "Q4_1": F.MOSTLY_Q4_1, "Q4_K_M": F.MOSTLY_Q4_K_M}[quant]


# ------------------------------------------------------------------------------------ type rules


def _more_bits(i_layer: int, n_layer: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers and every third in between."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


_KFALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def tensor_type(name: str, shape: tuple[int, ...], quant: str, n_layer: int, has_output: bool) -> str:
    """GGML type of one tensor for a file type, following llama.cpp's quantization rules."""
    if len(shape) < 2 or quant == "F32":
        return "F32"
    if quant in ("F16", "BF16"):
        return quant
    cols = shape[-1]
    is_head = name == "output.weight" or (not has_output and name == "token_embd.weight")
    if is_head:
        t = "Q8_0" if quant == "Q8_0" else "Q6_K"
    elif quant == "Q4_K_M":
        t = "Q4_K"
        layer = int(name.split(".")[1]) if name.startswith("blk.") else 0
        if ".attn_v." in name or ".ffn_down." in name:
            t = "Q6_K" if _more_bits(layer, n_layer) else "Q4_K"
    else:
        t = quant
    if t in _KFALLBACK and cols % B.QK_K:
        t = _KFALLBACK[t]
    if t not in ("F32", "F16", "BF16") and cols % B.QK:
        t = "F16"  # no 32-value block fits: llama.cpp keeps such rows in float as well
    return t


# ------------------------------------------------------------------------------------ encoding


def _quantize_float(w: np.ndarray, t: str) -> np.ndarray:
    import gguf
    from gguf import quants

    if t == "F32":
        return w.astype(np.float32)
    if t == "F16":
        return w.astype(np.float16)
    qt = getattr(gguf.GGMLQuantizationType, t)
    if t == "BF16":
        return quants.quantize(w.astype(np.float32), qt)
    if t in B.KQUANTIZERS:
        rows = w.shape[0]
        return B.KQUANTIZERS[t](w.reshape(-1, B.QK_K)).reshape(rows, -1)
    return quants.quantize(w.astype(np.float32), qt)


def _reuse(ql: QuantLinear, perm: np.ndarray | None, t: str) -> np.ndarray | None:
    """Pack leanlm's own codes and scales into type `t` if the block layout allows; else None."""
    fmt: QFormat = ql.fmt
    if fmt.kind != "int" or fmt.granularity not in ("channel", "group"):
        return None
    if fmt.granularity == "group" and fmt.group_size % B.QK:
        return None
    rows, cols = ql.weight.shape
    if cols % B.QK:
        return None
    from ..quantization.formats import quantize as qcodes

    codes = qcodes(ql.weight, fmt, ql.qparams).to(torch.int32).numpy()   # [rows, cols]
    scale = ql.qparams.scale.numpy().reshape(rows, -1)                   # [rows, groups] (1 group for channel)
    per_block = np.repeat(scale, cols // B.QK // scale.shape[1], axis=1)   # [rows, cols/32]
    if fmt.symmetric and t in B.SYM_PACKERS:
        bits, pack = B.SYM_PACKERS[t]
        if fmt.bits > bits:
            return None
        k = 2 ** (bits - fmt.bits)
        c, d = codes * k, per_block / k
        if perm is not None:
            c, d = c[perm], d[perm]
        return pack(c.reshape(-1, B.QK), d.reshape(-1)).reshape(rows, -1)
    if not fmt.symmetric and fmt.bits == 4 and t == "Q4_1":
        zero = np.repeat(ql.qparams.zero.numpy().reshape(rows, -1), cols // B.QK // scale.shape[1], axis=1)
        c, d, m = codes, per_block, -zero * per_block
        if perm is not None:
            c, d, m = c[perm], d[perm], m[perm]
        return B.pack_q4_1(c.reshape(-1, B.QK), d.reshape(-1), m.reshape(-1)).reshape(rows, -1)
    return None


def _qk_perm(rows: int, n_head: int) -> np.ndarray:
    """Row order that turns HF's rotate-half q/k layout into llama.cpp's interleaved one."""
    hd = rows // n_head
    return np.arange(rows).reshape(n_head, 2, hd // 2).transpose(0, 2, 1).reshape(-1)


# ------------------------------------------------------------------------------------ tokenizer

# HF pre-tokenizer structure -> llama.cpp's tokenizer.ggml.pre name
def _pretokenizer(tok_json: dict) -> str | None:
    pre = tok_json.get("pre_tokenizer") or {}

    def bytelevel_regex(p):
        return p.get("type") == "ByteLevel" and p.get("use_regex", True)

    if bytelevel_regex(pre):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        ps = pre.get("pretokenizers", [])
        if len(ps) == 2 and ps[0].get("type") == "Digits" and ps[0].get("individual_digits") and bytelevel_regex(ps[1]):
            return "smollm"
        if len(ps) == 2 and ps[0].get("type") == "Split" and ps[1].get("type") == "ByteLevel":
            rx = ps[0].get("pattern", {}).get("Regex", "")
            if rx.startswith("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"):
                return "llama-bpe"
    return None


def _add_tokenizer(w, tokenizer, n_vocab: int, pretokenizer: str | None) -> None:
    import gguf

    if tokenizer is None:
        raise LeanLMError("GGUF export needs the tokenizer (llama.cpp reads it from the file); pass tokenizer= or export from a folder that has one")
    if not getattr(tokenizer, "is_fast", False):
        raise LeanLMError("GGUF export reads a fast (tokenizers) BPE tokenizer; this tokenizer is not one")
    tj = json.loads(tokenizer.backend_tokenizer.to_str())
    if tj.get("model", {}).get("type") != "BPE":
        raise LeanLMError(f"GGUF export supports byte-level BPE tokenizers (llama.cpp 'gpt2' model), not {tj.get('model', {}).get('type')}")
    pre = pretokenizer or _pretokenizer(tj)
    if pre is None:
        raise LeanLMError("the tokenizer's pre-tokenizer is not one leanlm maps to a llama.cpp name (gpt-2, smollm, llama-bpe); "
                          "pass pretokenizer='NAME' (export(..., pretokenizer=...)) with llama.cpp's name for it")
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    T = gguf.TokenType
    for i in range(n_vocab):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        else:
            tokens.append(t)
            types.append(T.CONTROL if t in added and added[t].special else T.USER_DEFINED if t in added else T.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        sv = gguf.SpecialVocab(d, load_merges=True, n_vocab=n_vocab)
        if not sv.chat_template and getattr(tokenizer, "chat_template", None):
            sv.chat_template = tokenizer.chat_template
        sv.add_to_gguf(w, quiet=True)
    w.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))


# ------------------------------------------------------------------------------------ report


def _why(ql: QuantLinear, typ: str, quant: str) -> str:
    """Why a leanlm-quantized linear layer is not stored with its own codes, in the words of the summary."""
    fmt, cols = ql.fmt.name, ql.weight.shape[1]
    if typ in ("F32", "F16", "BF16") and quant in ("F32", "F16", "BF16"):
        return f"kept {typ}: --quant {quant} is a float type, so their leanlm format ({fmt}) is dequantized"
    if typ in ("F32", "F16", "BF16"):
        return (f"kept {typ}: their rows of {cols} values are not a multiple of GGUF's {B.QK}-value blocks, so no {quant} "
                f"block holds them (llama.cpp keeps such rows in float too); prune to multiples of 64 (leanlm prune "
                f"--multiple-of) to quantize them")
    return (f"re-quantized to {typ} from the calibrated weights: their leanlm format ({fmt}) has no exact {typ} layout "
            f"(exact: symmetric int in groups of a multiple of {B.QK} or per channel -> Q4_0/Q5_0/Q8_0, asymmetric int4 -> Q4_1)")


def report_lines(report: dict) -> list[str]:
    """The export summary: what was stored in which type and why, one sentence per kind of layer."""
    from collections import Counter

    lines = []
    if report["reused_exact"]:
        lines.append(f"{len(report['reused_exact'])} linear layers stored exactly with leanlm's own codes and scales "
                     f"({report['quant']} blocks)")
    for why, n in Counter(report["why"].values()).items():
        lines.append(f"{n} linear layers {why}")
    return lines


# ------------------------------------------------------------------------------------ export


def _check(model: nn.Module, arch: Arch) -> dict[str, QuantLinear]:
    mt = arch.model_type
    if arch.rope_type != "default":
        raise LeanLMError(f"GGUF export supports plain RoPE, not rope_type {arch.rope_type!r}")
    if any(arch.windows) and arch.family not in ("gemma3", "phi3"):
        raise LeanLMError(f"{mt}: llama.cpp's {arch.gguf_arch} graph has no sliding-window attention; this model uses a window "
                          f"of {next(w for w in arch.windows if w)} tokens, so GGUF export refuses it")
    if arch.family == "gemma3":
        pattern = tuple(bool(w) for w in arch.windows)
        if pattern != tuple((i + 1) % 6 != 0 for i in range(arch.n_layers)) or arch.rope_local_theta not in (None, 10000.0):
            raise LeanLMError("llama.cpp's gemma3 graph runs five sliding-window layers then one global layer, local RoPE base "
                              "10000; this model's layer layout differs, so GGUF export refuses it")
        if abs(arch.attn_scale - arch.head_dim ** -0.5) > 1e-9 or arch.final_softcap:
            raise LeanLMError("llama.cpp's gemma3 graph scales attention by 1/sqrt(head_dim) without a final soft-cap; "
                              "this model's query_pre_attn_scalar or final_logit_softcapping differs")
    check_config_matches(model)
    if not is_leanlm_quantized(model):
        return {}
    qls = quantized_linears(model)
    for ql in qls.values():
        if ql.act_fmt is not None:
            raise LeanLMError(f"GGUF cannot represent activation quantization ({ql.name}: {ql.act_fmt.name}; llama.cpp quantizes "
                              f"activations its own way); {SUPPORTED}")
        if ql.fmt.kind != "int":
            raise LeanLMError(f"GGUF export cannot represent {ql.fmt.name} weights ({ql.name}); {SUPPORTED}")
    return qls


def default_quant(qls: dict[str, QuantLinear]) -> str:
    """The GGUF type that holds leanlm's codes exactly (int8 -> Q8_0, int4 -> Q4_0, int4 asym -> Q4_1), else F16."""
    fmts = {(q.fmt.bits, q.fmt.symmetric) for q in qls.values()}
    if not fmts:
        return "F16"
    if fmts == {(4, False)}:
        return "Q4_1"
    if all(s for _, s in fmts):
        bits = max(b for b, _ in fmts)
        return "Q4_0" if bits <= 4 else "Q5_0" if bits <= 5 else "Q8_0"
    return "Q8_0"


@torch.no_grad()
def export_gguf(model: nn.Module, out: str | Path, *, tokenizer=None, overwrite: bool = False, quant: str | None = None,
                pretokenizer: str | None = None, name: str | None = None) -> Path:
    """Write `model` as one GGUF file at `out` (see the module docstring for the rules)."""
    import gguf

    global last_report
    arch = arch_of(model)
    qls = _check(model, arch)
    quant = (quant or default_quant(qls)).upper()
    if quant not in QUANTS:
        raise LeanLMError(f"unknown GGUF quant {quant!r}; choose one of: {', '.join(QUANTS)}")
    cfg = model.config
    n_layer, n_head, n_kv, head_dim = arch.n_layers, arch.heads, arch.kv_heads, arch.head_dim
    sd = plain_state_dict(model)
    if arch.tied and arch.family != "phi3":   # llama.cpp's phi3 graph needs its own output tensor
        sd.pop("lm_head.weight", None)
    has_output = "lm_head.weight" in sd
    tmap = arch.gguf_tensor_map()
    permute = arch.gguf_arch == "llama"   # the llama graph rotates interleaved pairs
    report = {"quant": quant, "reused_exact": [], "requantized": [], "kept_float": [], "why": {}, "types": {}}

    with atomic_file(out, overwrite=overwrite) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch.gguf_arch)
        w.add_name(name or getattr(cfg, "_name_or_path", "") or "leanlm-export")
        w.add_context_length(arch.max_positions)
        w.add_embedding_length(arch.hidden)
        w.add_block_count(n_layer)
        w.add_feed_forward_length(arch.intermediate)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_rope_dimension_count(arch.rotary_dim)
        w.add_rope_freq_base(arch.rope_theta)
        w.add_layer_norm_rms_eps(arch.eps)
        if head_dim != arch.hidden // n_head or arch.family == "gemma3":
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        if any(arch.windows):
            w.add_sliding_window(next(x for x in arch.windows if x))
        w.add_vocab_size(arch.vocab)
        w.add_file_type(_ftype(quant))
        if quant not in ("F32", "F16", "BF16"):
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(w, tokenizer, arch.vocab, pretokenizer)

        for hf_name, t in sd.items():
            gname = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise LeanLMError(f"no llama.cpp tensor name for {hf_name}; this model has parts llama.cpp's "
                                  f"{arch.gguf_arch} graph does not run")
            arr = t.detach().float().cpu().numpy()
            if arch.norm_offset and hf_name.endswith("norm.weight"):
                arr = arr + arch.norm_offset
            perm = None
            if permute and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                perm = _qk_perm(arr.shape[0], n_head)
            elif permute and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                perm = _qk_perm(arr.shape[0], n_kv)
            typ = tensor_type(gname, arr.shape, quant, n_layer, has_output)
            report["types"][gname] = typ
            ql = qls.get(hf_name[: -len(".weight")])
            data = _reuse(ql, perm, typ) if ql is not None and typ not in ("F32", "F16", "BF16") else None
            if data is not None:
                report["reused_exact"].append(gname)
            else:
                if ql is not None:
                    report["kept_float" if typ in ("F32", "F16", "BF16") else "requantized"].append(gname)
                    report["why"][gname] = _why(ql, typ, quant)
                src = arr[perm] if perm is not None else arr
                data = _quantize_float(src, typ)
            raw = None if typ in ("F32", "F16") else getattr(gguf.GGMLQuantizationType, typ)
            w.add_tensor(gname, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()
    last_report = report
    return Path(out)
