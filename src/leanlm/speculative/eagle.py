"""EAGLE draft heads: a one-layer decoder over the target's own features (Li et al. 2024, "EAGLE:
Speculative Sampling Requires Rethinking Feature Uncertainty", EAGLE-1).

The head reads the target's last hidden state f_t (after the final norm, the vector the target's
lm_head reads; EAGLE-1's own code uses the same) and the embedding of the next token x_{t+1}:

    g_t = fc([f_t ; embed(x_{t+1})])  ->  one Llama decoder layer (causal, own small KV cache)  ->  f^_{t+1}

and the draft token is argmax over a reduced vocabulary of lm_head(f^_{t+1}). Then f^_{t+1} and that
token feed the next step: a chain of k drafts costs k one-token head steps, never a target call.

Decisions (docs/speculative.md):
- Reduced draft vocabulary: the `draft_vocab` most frequent target tokens of the self-generated
  training text (ties by id); `vocab_map[i]` is the target id of draft token i, so a draft maps back
  exactly. Its head rows are the target's lm_head rows, frozen and not stored: they are rebuilt from
  the target on load (the head file holds fc, the layer and the map only).
- The embedding is the target's own (frozen, shared, not stored).
- A head records the target's hidden size, vocabulary size and a hash of its checkpoint; a head for
  another model is refused. The int8/int4 packed runtime of the same checkpoint is the same model.
- Training data by self-distillation: the target greedily continues excerpts of the protocol's
  calibration articles (plain text, and as a chat turn where the tokenizer has a template); the head
  is trained through the shared trainer (`leanlm.distill.train`) on the target's features of that
  text, loss smooth-L1(f^, f) + 0.1 x cross-entropy to the target's next-token distribution (the
  paper's weights), restricted to the draft vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.arch import arch_of
from ..core.errors import LeanLMError
from ..runtime.sampling import Sampling, sample
from .step import as_step_model

HEAD_FILE, CONFIG_FILE, DATA_FILE = "eagle.safetensors", "eagle.json", "eagle-data.safetensors"


def target_hash(model: nn.Module) -> str:
    """A fingerprint of a Hugging Face model's weights: names, shapes and a strided sample of every tensor
    (a different checkpoint of the same architecture gets a different hash; quick on a 135M model)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(flat[::step].float().numpy().tobytes())
    return h.hexdigest()[:32]


@dataclass
class EagleConfig:
    hidden: int
    vocab: int
    draft_vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    rope_theta: float
    target_hash: str
    target_type: str = ""


class EagleHead(nn.Module):
    """fc([feature ; embedding]) -> one Llama decoder layer -> predicted feature -> reduced-vocabulary logits.

    `embed` (the target's input embedding) and the head rows (the target's lm_head rows at `vocab_map`)
    are the target's, held but never trained or saved."""

    METHOD, FORMAT = "eagle", "leanlm-eagle-1"

    @staticmethod
    def config_for(arch, draft_vocab: int, target: str, heads: int = 1) -> EagleConfig:
        """The config of a head for a target of architecture `arch` (`heads` is Medusa's; EAGLE has one layer)."""
        return EagleConfig(hidden=arch.hidden, vocab=arch.vocab, draft_vocab=draft_vocab, heads=arch.heads,
                           kv_heads=arch.kv_heads, head_dim=arch.head_dim, intermediate=arch.intermediate, eps=arch.eps,
                           rope_theta=float(arch.rope_theta), target_hash=target, target_type=arch.model_type)

    def __init__(self, cfg: EagleConfig, embed: nn.Module, head_rows: torch.Tensor, vocab_map: torch.Tensor):
        super().__init__()
        from transformers import LlamaConfig, LlamaModel

        self.cfg = cfg
        self.fc = nn.Linear(2 * cfg.hidden, cfg.hidden)
        lc = LlamaConfig(vocab_size=1, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate, num_hidden_layers=1,
                         num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                         rms_norm_eps=cfg.eps, max_position_embeddings=1 << 16,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None,
                         rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
        self.body = LlamaModel(lc)
        self.body.norm = nn.Identity()   # the layer's output is the predicted (already normalised) feature
        self.register_buffer("vocab_map", vocab_map.long().clone())
        object.__setattr__(self, "embed", embed)                              # the target's: not a submodule
        object.__setattr__(self, "head_rows", head_rows.detach().float())   # [draft_vocab, hidden], frozen
        self._new_api = "cache" in __import__("inspect").signature(self.body.forward).parameters

    def trained_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("body.embed_tokens")}

    def forward(self, feats: torch.Tensor, next_ids: torch.Tensor, position_ids: torch.Tensor | None = None, cache=None,
                attention_mask: torch.Tensor | None = None):
        """feats [B, T, H] (f_t), next_ids [B, T] (x_{t+1}) -> (predicted f_{t+1} [B, T, H], logits [B, T, draft_vocab]).
        `attention_mask`: an additive [B, 1, T, cached + T] mask (tree drafts); default causal."""
        e = self.embed(next_ids).to(feats.dtype)
        x = self.fc(torch.cat([feats, e], -1))
        kw = {"cache" if self._new_api else "past_key_values": cache} if cache is not None else {}
        if attention_mask is not None:
            kw["attention_mask"] = attention_mask
        h = self.body(inputs_embeds=x, position_ids=position_ids, use_cache=cache is not None, **kw).last_hidden_state
        return h, h @ self.head_rows.to(h.dtype).T


def _frequent_tokens(ids: torch.Tensor, vocab: int, n: int) -> torch.Tensor:
    """The n most frequent ids of `ids` (ties and unseen tokens by id), sorted by id."""
    counts = torch.bincount(ids.reshape(-1), minlength=vocab).double()
    score = counts - torch.arange(vocab, dtype=torch.double) / (2 * vocab)   # stable: ties go to the smaller id
    return score.topk(min(n, vocab)).indices.sort().values


@dataclass(frozen=True)
class HeadKind:
    """Everything about one kind of draft head, in one row of `head_kinds()`: its config, module, drafter and
    training loss. The method name and the folder format are the head class's `METHOD` and `FORMAT`."""

    config: type
    head: type
    drafter: type
    loss: type


def head_kinds() -> dict[str, HeadKind]:
    """method name -> its `HeadKind`: every draft head `leanlm draft --method` trains and a head folder can hold."""
    from .medusa import MedusaConfig, MedusaDrafter, MedusaHead, MedusaLoss

    return {"eagle": HeadKind(EagleConfig, EagleHead, EagleDrafter, EagleLoss),
            "medusa": HeadKind(MedusaConfig, MedusaHead, MedusaDrafter, MedusaLoss)}


def head_kind(method: str) -> HeadKind:
    kinds = head_kinds()
    if method not in kinds:
        raise LeanLMError(f"unknown draft head method {method!r}; choose {' or '.join(kinds)}")
    return kinds[method]


def make_head(model: nn.Module, vocab_map: torch.Tensor, *, seed: int = 0, method: str = "eagle", heads: int = 4) -> nn.Module:
    """A fresh (random) draft head for the Hugging Face `model`, drafting over the target ids `vocab_map`: an `EagleHead`
    (method "eagle") or a `medusa.MedusaHead` with `heads` heads (method "medusa")."""
    kind = head_kind(method)
    cfg = kind.head.config_for(arch_of(model), int(vocab_map.numel()), target_hash(model), heads=heads)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return kind.head(cfg, model.get_input_embeddings(), model.get_output_embeddings().weight[vocab_map], vocab_map).eval()


def drafter_for(head: nn.Module):
    """The drafter that runs `head` (any kind of draft head) in `speculative_generate`."""
    return head_kind(head.METHOD).drafter(head)


def save_head(head: nn.Module, out, log: dict | None = None, overwrite: bool = True) -> None:
    """Write a head folder atomically: eagle.safetensors (the trained weights and the vocabulary map) + eagle.json
    (format, config, training log). EAGLE and Medusa heads share the folder layout; the format names the kind."""
    from safetensors.torch import save_file

    from ..core.io import atomic_dir

    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in head.trained_state().items()}, str(tmp / HEAD_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps({"format": head.FORMAT, "config": asdict(head.cfg), "training": log or {}},
                                                  indent=1))


def is_head_folder(path) -> bool:
    p = Path(str(path)).expanduser()
    return (p / CONFIG_FILE).is_file() and (p / HEAD_FILE).is_file()


def load_head(path, model: nn.Module) -> nn.Module:
    """Load a head folder (EAGLE or Medusa) for the Hugging Face `model` (the target, or the float model its packed
    runtime was built from); refuses a head trained for another model."""
    from safetensors.torch import load_file

    p = Path(str(path)).expanduser()
    if not is_head_folder(p):
        raise LeanLMError(f"{path} is not a draft head folder (no {CONFIG_FILE} + {HEAD_FILE}); build one with "
                          "`leanlm draft MODEL --method eagle|medusa --out DIR`")
    kinds = {k.head.FORMAT: k for k in head_kinds().values()}
    try:
        meta = json.loads((p / CONFIG_FILE).read_text())
        fmt = meta.get("format", EagleHead.FORMAT)
        if fmt not in kinds:
            raise ValueError(f"unknown format {fmt!r}")
        head_cls = kinds[fmt].head
        cfg = kinds[fmt].config(**meta["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise LeanLMError(f"{p / CONFIG_FILE} is not a valid head config ({e}); rebuild the head with leanlm draft") from None
    method = head_cls.METHOD
    arch = arch_of(model)
    for what, mine, theirs in (("hidden size", cfg.hidden, arch.hidden), ("vocabulary", cfg.vocab, arch.vocab)):
        if mine != theirs:
            raise LeanLMError(f"the head {path} was trained for a model with {what} {mine}, this model has {theirs}: a head "
                              f"drafts only for the model it was trained on; train one with leanlm draft MODEL --method {method}")
    h = target_hash(model)
    if h != cfg.target_hash:
        raise LeanLMError(f"the head {path} was trained for another checkpoint (hash {cfg.target_hash}, this model {h}); "
                          f"a head drafts only for the model it was trained on; train one with leanlm draft MODEL --method {method}")
    sd = load_file(str(p / HEAD_FILE))
    vmap = sd["vocab_map"]
    head = head_cls(cfg, model.get_input_embeddings(), model.get_output_embeddings().weight[vmap], vmap)
    missing, unexpected = head.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if not k.startswith("body.embed_tokens")]:
        raise LeanLMError(f"{p / HEAD_FILE} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]}); rebuild it")
    head.leanlm_draft = meta.get("training", {})
    return head.eval()


# ------------------------------------------------------------------------------------------- drafting


class FeatureDrafter:
    """What a drafter reading the target's features shares (EAGLE here, Medusa in medusa.py): `attach(target)` (called
    by the decode loop) asks the target StepModel to keep its last hidden states, `_collect` keeps one feature per
    committed token the target has run (the last committed token has none yet: the target chose it there)."""

    def __init__(self, head):
        self.head = head
        self.target = None

    def attach(self, target) -> None:
        if not hasattr(target, "keep_hidden"):
            raise LeanLMError(f"{type(target).__name__} cannot expose its hidden states; a draft head needs the leanlm runtime "
                              "Engine or a Hugging Face model as the target")
        self.target = target
        target.keep_hidden = True

    def detach(self) -> None:
        """Stop the target keeping hidden states (plain decoding on it pays nothing again)."""
        if self.target is not None:
            self.target.keep_hidden = False

    def _require_target(self) -> None:
        if self.target is None:
            raise LeanLMError(f"{type(self).__name__} needs the target: call attach(target) first (speculative_generate does)")

    def _collect(self) -> None:
        """Append the target's features of positions not yet held (the last forward covered hidden_start.. on)."""
        t = self.target
        n = t.length
        have = self.feats.shape[1]
        if n > have:
            start = t.hidden_start
            if start > have:
                raise LeanLMError(f"the target's hidden states skipped positions; {type(self).__name__} must see every target forward")
            self.feats = torch.cat([self.feats[:, :start], t.hidden[:, : n - start].float()], 1)
        else:
            self.feats = self.feats[:, :n]


class EagleDrafter(FeatureDrafter):
    """A drafter (`start` / `propose` / `propose_tree`) running an `EagleHead` on the target's features. The head's cache
    holds one position per committed token whose feature the target has produced; draft positions are dropped at the
    next round (the target's real features replace the head's predicted ones)."""

    def start(self, prompt: torch.Tensor) -> None:
        from transformers import DynamicCache

        self._require_target()
        self.cache = DynamicCache(config=self.head.body.config)
        self.real = 0                                   # head cache positions fed with real (target) features
        self.feats = torch.zeros(prompt.shape[0], 0, self.head.cfg.hidden)

    def _catch_up(self, ctx: torch.Tensor):
        """Feed the head the committed tokens it has not seen with their real target features; returns (n, the
        predicted feature [B, 1, H] and draft logits [B, draft_vocab] after ctx)."""
        self._collect()
        n = self.feats.shape[1]                         # = ctx length - 1: the features of every committed token but the last
        keep = min(self.real, n - 1)
        held = self.cache.get_seq_length()
        if keep < held:   # transformers 5 takes minus the number of positions to drop, 4.x the length to keep
            self.cache.crop(keep - held if self._drops() else keep)
        pos = torch.arange(keep, n)[None]
        h, logits = self.head(self.feats[:, keep:n], ctx[:, keep + 1: n + 1], pos, self.cache)
        self.real = n
        return n, h[:, -1:], logits[:, -1]

    @torch.inference_mode()
    def propose_tree(self, ctx: torch.Tensor, tree, sampling: Sampling, generator=None):
        """Fill a static `DraftTree` (batch 1): each node's children are the head's top-ranked draft tokens there
        (deterministic, so q is None: exact under sampling too, see tree.verify_tree). The head expands one depth
        per pass: the non-leaf nodes of that depth go in together at position n + depth - 1 under a tree mask
        (the committed positions plus their own ancestors), so a tree costs one head pass per level."""
        if ctx.shape[0] != 1:
            raise LeanLMError(f"tree drafts take one prompt row, got {ctx.shape[0]}; use a chain (k) for a batch")
        n, f_root, lg_root = self._catch_up(ctx)
        vmap = self.head.vocab_map
        tokens = torch.zeros(tree.size + 1, dtype=torch.long)
        feats, logits, slot = {0: f_root[0, 0]}, {0: lg_root[0]}, {}    # per expanded node
        base = self.cache.get_seq_length()
        for d in range(tree.max_depth):
            level = tree.inner(d)
            for u in level:   # children = the head's top ranks at u
                tree.fill_children(u, logits[u], tokens, vmap)
            grow = [c for u in level for c in tree.children[u] if tree.children[c]]
            if not grow:
                continue
            held = self.cache.get_seq_length()
            allowed = tree.feed_mask(grow, slot, held + len(grow))
            allowed[:, :base] = True
            bias = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)[None, None]
            x_f = torch.stack([feats[int(tree.parent[c])] for c in grow])[None]
            pos = torch.full((1, len(grow)), n + d)
            h, lg = self.head(x_f, tokens[grow][None], pos, self.cache, attention_mask=bias)
            for i, c in enumerate(grow):
                feats[c], logits[c], slot[c] = h[0, i], lg[0, i], held + i
        return tokens[1:][None], None

    @torch.inference_mode()
    def propose(self, ctx: torch.Tensor, k: int, sampling: Sampling, generator=None):
        n, f, lg = self._catch_up(ctx)
        vmap = self.head.vocab_map
        toks, qs = [], []
        for i in range(k):
            if sampling.greedy:
                t = vmap[lg.argmax(-1)]
            else:
                full = torch.full((lg.shape[0], self.head.cfg.vocab), float("-inf"))
                full[:, vmap] = lg.float()
                q = sampling.probs(full)
                t = sample(q, generator)
                qs.append(q)
            toks.append(t)
            if i + 1 < k:
                f, lg2 = self.head(f, t[:, None], torch.tensor([[n + i]]), self.cache)
                lg = lg2[:, -1]
        return torch.stack(toks, 1), (torch.stack(qs, 1) if qs else None)

    def _drops(self) -> bool:
        import inspect

        from transformers import DynamicCache

        return "tokens_to_remove" in inspect.signature(DynamicCache.crop).parameters


# ------------------------------------------------------------------------------------------- training


def _prompts(tok, n: int, prompt_tokens: int, chat_share: float) -> torch.Tensor:
    """n equal-length prompts from the protocol's calibration articles: `prompt_tokens`-token excerpts at several
    offsets, every other one wrapped as a chat user turn ("Continue this text: ...") when the tokenizer has a template."""
    from ..core.data import calibration_texts

    arts = [tok(t, add_special_tokens=False)["input_ids"] for t in calibration_texts("wiki")]
    excerpts = []
    off = 0
    while len(excerpts) < n and off < 50 * prompt_tokens:
        for ids in arts:
            if len(ids) >= off + prompt_tokens and len(excerpts) < n:
                excerpts.append(ids[off: off + prompt_tokens])
        off += prompt_tokens
    if not excerpts:
        raise LeanLMError(f"the calibration text has no excerpt of {prompt_tokens} tokens; lower prompt_tokens")
    plain, chat = [], []
    template = getattr(tok, "chat_template", None)
    pre = post = None
    if template and chat_share > 0:
        marker = "\u2063MARK\u2063"
        text = tok.apply_chat_template([{"role": "user", "content": f"Continue this text: {marker}"}], tokenize=False,
                                       add_generation_prompt=True)
        a, _, b = text.partition(marker)
        pre, post = tok(a, add_special_tokens=False)["input_ids"], tok(b, add_special_tokens=False)["input_ids"]
    every = max(1, round(1 / chat_share)) if pre is not None else 0
    for i, ex in enumerate(excerpts):
        if every and i % every == every - 1:
            chat.append(pre + ex + post)
        else:
            plain.append(ex)
    return [torch.tensor(g) for g in (plain, chat) if g]


def _hidden_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The target's final-norm output for every position of ids [B, T] (one forward, no cache)."""
    norm = arch_of(model).body(model).norm
    got = {}
    hook = norm.register_forward_hook(lambda m, i, o: got.__setitem__("h", o))
    try:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    return got["h"].float()


@torch.inference_mode()
def self_distill_data(model: nn.Module, tok, *, samples: int = 128, prompt_tokens: int = 64, new_tokens: int = 128,
                      batch: int = 16, chat_share: float = 0.5, progress: bool = True, max_seconds: float | None = None,
                      prompts: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Training text the target writes itself: greedy continuations of calibration excerpts (never the evaluation
    split; `prompts`: groups of equal-length prompts [N, L] instead), with the target's features. Generation runs
    batched on the leanlm runtime (float32, the target's own greedy output) and stops after the batch that passes
    `max_seconds`. Returns flat {"tokens" [P], "feats" [P, H], "seq" [P]} (sequences concatenated)."""
    from tqdm.auto import tqdm

    from ..runtime import Engine
    from .decode import generate

    t0 = time.perf_counter()
    groups = prompts if prompts is not None else _prompts(tok, samples, prompt_tokens, chat_share)
    toks, feats, seqs = [], [], []
    bar = tqdm(total=sum(len(g) for g in groups), desc="self-distillation text", unit="seq", disable=not progress)
    sid = 0
    step = Engine(model, "fp32", max_seq_len=max(g.shape[1] for g in groups) + new_tokens, max_batch=batch)
    # interleave the groups (plain text, chat turns) so that a time limit keeps some of each
    order = sorted(((i, j) for j, g in enumerate(groups) for i in range(0, len(g), batch)))
    for i, j in order:
        if max_seconds is not None and toks and time.perf_counter() - t0 > max_seconds:
            break
        p = groups[j][i: i + batch]
        out = generate(step, p, new_tokens)
        h = _hidden_of(model, out)
        for r in range(out.shape[0]):
            toks.append(out[r])
            feats.append(h[r].to(torch.bfloat16))   # half the memory; features are regression targets
            seqs.append(torch.full((out.shape[1],), sid))
            sid += 1
        bar.update(len(p))
    bar.close()
    return {"tokens": torch.cat(toks), "feats": torch.cat(feats), "seq": torch.cat(seqs)}


@torch.inference_mode()
def corpus_features(model: nn.Module, tok, *, max_tokens: int = 262144, seq_len: int = 512, batch: int = 4,
                    progress: bool = True, max_seconds: float | None = None) -> dict[str, torch.Tensor]:
    """The target's features over the protocol's calibration text (never the evaluation split), in the layout of
    `self_distill_data`: windows of `seq_len` corpus tokens, one forward each, until `max_tokens` or `max_seconds`.
    The head's targets stay the target's own features and next-token distribution; the corpus only adds inputs, at
    prefill speed (several times the tokens per second of generation)."""
    from tqdm.auto import tqdm

    from ..core.data import calibration_texts, join_and_tokenize

    t0 = time.perf_counter()
    ids = join_and_tokenize(tok, calibration_texts("wiki"))
    n = min(max_tokens, ids.numel()) // seq_len
    wins = ids[: n * seq_len].view(n, seq_len)
    toks, feats = [], []
    for i in tqdm(range(0, n, batch), desc="corpus features", unit="batch", disable=not progress):
        if max_seconds is not None and toks and time.perf_counter() - t0 > max_seconds:
            break
        w = wins[i: i + batch]
        toks.append(w)
        feats.append(_hidden_of(model, w).to(torch.bfloat16))
    if not toks:
        return {"tokens": torch.zeros(0, dtype=torch.long), "feats": torch.zeros(0, arch_of(model).hidden, dtype=torch.bfloat16),
                "seq": torch.zeros(0, dtype=torch.long)}
    t, f = torch.cat(toks), torch.cat(feats)
    return {"tokens": t.reshape(-1), "feats": f.reshape(-1, f.shape[-1]),
            "seq": torch.arange(t.shape[0]).repeat_interleave(seq_len)}


def _join(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate two position tables, renumbering b's sequences after a's."""
    off = int(a["seq"].max()) + 1 if a["seq"].numel() else 0
    return {"tokens": torch.cat([a["tokens"], b["tokens"]]), "feats": torch.cat([a["feats"], b["feats"]]),
            "seq": torch.cat([a["seq"], b["seq"] + off])}


class EagleLoss:
    """The shared trainer's loss over windows of flat positions: head input (f_t, x_{t+1}), targets f_{t+1} and the
    target's next-token distribution softmax(lm_head(f_{t+1})) over the draft vocabulary; pairs that cross a
    sequence boundary are masked. smooth-L1 + `w_cls` x cross-entropy (EAGLE's 1.0 / 0.1)."""

    def __init__(self, data: dict[str, torch.Tensor], w_cls: float = 0.1, noise: float = 0.0):
        self.d, self.w_cls, self.noise = data, w_cls, noise

    def __call__(self, head: EagleHead, idx: torch.Tensor):
        d = self.d
        a, b = idx[:, :-1], idx[:, 1:]
        f_in = d["feats"][a].float()
        if self.noise:
            f_in = f_in + (torch.rand_like(f_in) - 0.5) * self.noise
        f_out = d["feats"][b].float()
        valid = (d["seq"][a] == d["seq"][b]).float()
        pos = torch.arange(a.shape[1])[None].expand(a.shape[0], -1)
        h, logits = head(f_in, d["tokens"][b], pos)
        reg = (F.smooth_l1_loss(h.float(), f_out, reduction="none").mean(-1) * valid).sum() / valid.sum().clamp_min(1)
        with torch.no_grad():
            p = (f_out @ head.head_rows.T).softmax(-1)
        logq = logits.float().log_softmax(-1)
        ce = (-(p * logq).sum(-1) * valid).sum() / valid.sum().clamp_min(1)
        with torch.no_grad():
            acc = (((logits.argmax(-1) == p.argmax(-1)).float() * valid).sum() / valid.sum().clamp_min(1)).item()
        return reg + self.w_cls * ce, {"reg": reg.item(), "ce": ce.item(), "top1": acc}


def train_head(model: nn.Module, tokenizer, budget: str | float = "30m", *, method: str = "eagle", heads: int = 4,
               draft_vocab: int = 8192, samples: int = 128,
                prompt_tokens: int = 64, new_tokens: int = 128, seq_len: int = 128, batch: int = 8, lr: float = 1e-3,
                max_tokens: int | None = None, checkpoint_dir=None, progress: bool = True, seed: int = 0,
                data: dict | None = None, gen_share: float = 0.4, corpus_share: float = 0.5, corpus_tokens: int = 262144,
                tree_nodes: int = 12) -> nn.Module:
    """Train a draft head for the Hugging Face `model` by self-distillation: an EAGLE-1 head (Li et al. 2024; method
    "eagle") or `heads` Medusa heads (Cai et al. 2024, `medusa.py`; method "medusa"), on the same text and trainer.
    Ctrl-C raises `TrainingInterrupted` after saving a checkpoint (with `checkpoint_dir`); the same call resumes.

    `budget` (the one budget syntax: "30m" wall time, or "2M" tokens) covers the training text (at most `gen_share`
    of a time budget) and the training. Of the text's time, `corpus_share` goes to the target's features over the
    calibration corpus (`corpus_features`, at most `corpus_tokens`; 0: none) and the rest to text the target writes
    (`samples` sequences of `prompt_tokens` + `new_tokens`).
    The generated text and the head's training state are kept in `checkpoint_dir` (if given): a run interrupted
    (Ctrl-C) and started again resumes; with a token budget the resumed head equals an uninterrupted one.
    After training, `measure_tree` chooses a draft tree of `tree_nodes` drafts from the head's measured acceptance on
    calibration prompts (0: skip), stored in the log as "tree" (`generate --tree` uses it).
    Returns the head with `head.leanlm_draft` holding the training log."""
    from ..distill import TrainConfig, parse_budget, train

    limits = parse_budget(budget)
    if max_tokens is not None:
        limits["max_tokens"] = min(max_tokens, limits["max_tokens"] or max_tokens)
    arch = arch_of(model)
    if not 1 <= draft_vocab:
        raise LeanLMError(f"--draft-vocab must be >= 1, got {draft_vocab}")
    kind = head_kind(method)
    if heads < 1:
        raise LeanLMError(f"a draft head needs --heads >= 1, got {heads}")
    t0, c0 = time.perf_counter(), time.process_time()
    ck = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if data is None:
        from safetensors.torch import load_file, save_file

        if ck is not None and (ck / DATA_FILE).is_file():
            data = load_file(str(ck / DATA_FILE))
        else:
            if not 0 <= corpus_share < 1:
                raise LeanLMError(f"corpus_share must lie in [0, 1), got {corpus_share}")
            share = limits["max_minutes"] * 60 * gen_share if limits["max_minutes"] is not None else None
            data = self_distill_data(model, tokenizer, samples=samples, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                                     progress=progress, max_seconds=share * (1 - corpus_share) if share is not None else None)
            if corpus_share > 0 and corpus_tokens > 0:
                left = share - (time.perf_counter() - t0) if share is not None else None
                data = _join(data, corpus_features(model, tokenizer, max_tokens=corpus_tokens, progress=progress,
                                                   max_seconds=max(left, 1.0) if left is not None else None))
            if ck is not None:
                from ..core.io import atomic_file

                ck.mkdir(parents=True, exist_ok=True)
                with atomic_file(ck / DATA_FILE) as tmp:
                    save_file(data, str(tmp))
    gen_s = time.perf_counter() - t0
    vmap = _frequent_tokens(data["tokens"], arch.vocab, draft_vocab)
    head = make_head(model, vmap, seed=seed, method=method, heads=heads)
    if limits["max_minutes"] is not None:
        limits["max_minutes"] = max(limits["max_minutes"] - gen_s / 60, 0.05)
    cfg = TrainConfig(**limits, lr=lr, warmup_steps=0, schedule="constant", batch_size=batch, seq_len=seq_len, seed=seed,
                      progress=progress, checkpoint_dir=str(ck / "train") if ck is not None else None, checkpoint_every=25,
                      autocast_bf16=False)
    params = [p for n, p in head.named_parameters() if not n.startswith("body.embed_tokens")]
    positions = torch.arange(data["tokens"].numel())
    grads = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    log = {"method": method, **({"heads": heads} if method == "medusa" else {}), "draft_vocab": int(vmap.numel()), "text_tokens": int(data["tokens"].numel()),
           "corpus_share": corpus_share,
           "sequences": int(data["seq"].max()) + 1, "generation_seconds": gen_s, "steps": 0, "tokens": 0, "seconds": 0.0,
           "loss_first": None, "loss_last": None, "top1_last": None,
           "vocab_coverage": float(torch.isin(data["tokens"], vmap).float().mean())}
    try:
        res = train(head, kind.loss(data), positions, cfg, params=params)
        log.update(steps=res.steps, tokens=res.tokens, seconds=res.seconds)
        if res.history:
            log.update(loss_first=res.history[0]["loss"], loss_last=res.history[-1]["loss"], top1_last=res.history[-1]["top1"])
    finally:
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
    for p in head.parameters():
        p.requires_grad_(False)
    head.eval()
    if tree_nodes and log["steps"]:
        ts = time.perf_counter()
        paths, acc = measure_tree(model, head, [ids[i:i + 1] for ids in _prompts(tokenizer, 4, prompt_tokens, 0.5) for i in range(len(ids))],
                                  tree_nodes)
        log.update(tree=paths, tree_acceptance=acc, tree_seconds=time.perf_counter() - ts)
    log["total_seconds"] = time.perf_counter() - t0
    log["cpu_seconds"] = time.process_time() - c0   # this process's CPU time (all threads): the work, on a shared machine
    head.leanlm_draft = log
    return head


MEASURE_WIDTHS = (8, 4, 4, 3, 3)   # the comb tree measure_tree drafts: children of the root and of each rank-0 node, by depth


@torch.inference_mode()
def measure_tree(model: nn.Module, head: nn.Module, prompts: list[torch.Tensor], nodes: int = 12, new_tokens: int = 64,
                 widths=MEASURE_WIDTHS) -> tuple[list[list[int]], list[list[float]]]:
    """Choose a draft tree for `head` from measured acceptance: greedy tree decoding of `prompts` (each [1, L]) on the
    float32 runtime with a comb tree (a spine of rank-0 drafts, each with `widths[d]` children) counts, per depth and
    rank, how often the target took the head's draft when its parent was accepted (one phantom rejection per cell, so a
    rarely tried rank is not taken for certain); `tree.tree_from_acceptance` builds the `nodes`-draft tree from that.
    Returns (the tree's paths, the acceptance table)."""
    from ..runtime import Engine
    from .decode import speculative_generate
    from .tree import DraftTree, RankCounts, tree_from_acceptance

    if getattr(head, "max_tree_depth", None):   # a Medusa head drafts as deep as it has heads
        widths = widths[: head.max_tree_depth]
    comb = DraftTree.from_paths([(0,) * d + (r,) for d, w in enumerate(widths) for r in range(w)])
    total = RankCounts()
    eng = Engine(model, "fp32", max_seq_len=max(p.shape[1] for p in prompts) + new_tokens + comb.size + 1)
    for ids in prompts:
        _, st = speculative_generate(eng, drafter_for(head), ids, new_tokens, tree=comb)
        total.merge(st.ranks)
    acc = total.acceptance(prior=1)
    return tree_from_acceptance(acc, nodes).to_list(), acc
