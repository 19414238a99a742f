"""Calibration in bounded memory: one decoder block of the float model in RAM at a time.

The model is built as a skeleton on the meta device (accelerate's ``init_empty_weights``). A
``WeightSource`` reads single tensors from the checkpoint: memory-mapped safetensors shards
(``safe_open``) or a GGUF file dequantized tensor by tensor (the gguf package, with transformers'
GGUF name map and tensor processors, as the in-memory GGUF conversion uses). ``BlockOffload`` plugs
into the block-by-block engine (``calibrate_blocks(..., offload=...)``): it captures the inputs of
layer 0 with only the embeddings loaded, loads block ``i`` (``set_module_tensor_to_device``) just
before the registered algorithms run on it, and after them hands the block to a technique's writer,
saves what it returns as that block's shard, saves the block's outputs (the next block's inputs) and
moves the block back to the meta device. Finished blocks are skipped when the same run is started
again, so an interrupted run resumes from the last finished block. ``finish`` assembles the shards
into a sharded safetensors folder with a ``model.safetensors.index.json``.

The calibration inputs, their order and every operation on a block are those of the in-memory path,
so the output is bit-identical to it (tests/test_offload.py). The budget (``--max-memory``) is
checked before any work from the tensor shapes alone (``estimate``); the peak resident memory the
OS measured is reported at the end (``peak_rss_bytes``). Written for leanlm's issue 21; llm-compressor
and NVIDIA Model Optimizer calibrate layer by layer in the same way.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import re
import resource
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .arch import arch_of
from .errors import LeanLMError
from .io import atomic_file, check_output

INDEX = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str | int) -> int:
    """'2GB', '1.5GB', '512MiB', '2000000000' -> bytes (GB = 10**9, GiB = 2**30)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*", str(text).upper())
    if not m or float(m.group(1)) <= 0:
        raise LeanLMError(f"memory budget {text!r} is not a size like 2GB, 1.5GB or 512MB")
    return int(float(m.group(1)) * _UNITS[m.group(2) if m.group(2) in _UNITS else m.group(2) + "B"])


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def peak_rss_bytes() -> int:
    """This process's peak resident memory as the OS counts it: Linux's VmHWM (the high-water mark of this
    process's own address space), else getrusage's ru_maxrss. Not ru_maxrss on Linux: the kernel carries the
    parent's peak into a child's ru_maxrss at exec, so a process started by a large one reports the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def rss_bytes() -> int:
    """This process's resident memory now."""
    import psutil

    return psutil.Process().memory_info().rss


def _malloc_returns_memory() -> None:
    """glibc keeps freed large blocks on its heap once its mmap threshold has grown; a fixed 1 MiB threshold
    makes every freed tensor go back to the OS, so one block's memory is reused instead of piling up."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)   # M_MMAP_THRESHOLD


def trim_heap(collect: bool = True) -> None:
    """Collect garbage (``collect``: 65 ms with torch loaded, so not between the steps inside a block) and hand the
    heap's free pages back to the OS (glibc malloc_trim, which also releases free pages inside the heap, in
    microseconds): without it the freed temporaries of each block's solve, under the mmap threshold, fragment the
    heap and resident memory grows by ~0.1 GB per block of a 1.5B model (measured)."""
    if collect:
        gc.collect()
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def release_memory() -> None:
    """Give what the preparation freed back to the OS before the budget is measured: the protocol's calibration
    text (cached by core.data), collected objects, and free heap pages (glibc malloc_trim)."""
    from . import data

    data._builtin_articles.cache_clear()
    _malloc_returns_memory()
    trim_heap()


# ----------------------------------------------------------------------------------------- weight sources


def resolve(spec: str | os.PathLike) -> Path:
    """The file or folder a model spec names (a built-in: its cached float conversion if made, else its GGUF)."""
    from .models import BUILTINS, _gguf_cache_folder, builtin_gguf

    spec = str(spec)
    p = Path(spec).expanduser()
    if spec in BUILTINS:
        g = builtin_gguf(spec)
        folder = _gguf_cache_folder(g)
        p = folder if (folder / "leanlm-source.json").is_file() else g
    if not p.exists():
        raise LeanLMError(f"unknown model {spec!r}: no such folder or file; offloaded calibration reads a Hugging Face folder "
                          "of safetensors, a .gguf file or a built-in name")
    return p


def source_tokenizer(spec: str | os.PathLike, trust_remote_code: bool = False):
    """The tokenizer saved with the checkpoint `spec` (from the GGUF's metadata for a .gguf), None if it has none."""
    from .models import load_tokenizer

    p = resolve(spec)
    if p.is_dir():
        return load_tokenizer(p, trust_remote_code, required=False)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception:
        return None


class WeightSource:
    """Named float tensors of a checkpoint, read one at a time (nothing else is kept in memory).

    ``path``: a Hugging Face folder of safetensors shards, a ``.gguf`` file, or a built-in model name
    (its cached float conversion when there is one, else its GGUF). ``shapes`` maps every tensor name
    (transformers' names) to its shape, known from the file headers alone.
    """

    def __init__(self, path: str | os.PathLike, trust_remote_code: bool = False):
        from transformers import AutoConfig

        p = resolve(path)
        self.path, self.gguf = p, p.is_file()
        self._gguf_map: dict[str, str] = {}
        if self.gguf:
            from .models import check_gguf

            check_gguf(p)
            self.config = AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True,
                                                     trust_remote_code=trust_remote_code)
            if hasattr(self.config, "quantization_config"):
                del self.config.quantization_config
            self.shapes: dict[str, tuple] = {}   # filled by bind() once the skeleton exists (the name map needs it)
        else:
            if not (p / "config.json").is_file():
                raise LeanLMError(f"{p} has no config.json; pass a Hugging Face model folder or a .gguf file")
            self.config = AutoConfig.from_pretrained(p, local_files_only=True, trust_remote_code=trust_remote_code)
            self.files = self._shards(p)
            self.shapes, self.where = {}, {}
            from safetensors import safe_open

            for f in self.files:
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():
                        self.shapes[k] = tuple(h.get_slice(k).get_shape())
                        self.where[k] = f

    @staticmethod
    def _shards(folder: Path) -> list[Path]:
        from .models import check_safetensors

        index = folder / INDEX
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError):
                raise LeanLMError(f"{index} is not a valid shard index (no weight_map); re-save the checkpoint") from None
            paths = [folder / f for f in files]
        else:
            paths = sorted(folder.glob("*.safetensors"))
        if not paths:
            raise LeanLMError(f"{folder} has no weight files (*.safetensors); the checkpoint is incomplete")
        for f in paths:
            if not f.is_file():
                raise LeanLMError(f"shard {f} listed in {index.name} is missing; the checkpoint is incomplete, copy or re-download it")
            check_safetensors(f)
        return paths

    def bind(self, model: nn.Module) -> None:
        """GGUF: map the file's tensor names to the skeleton's parameter names (transformers' map)."""
        if not self.gguf:
            return
        import gguf
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

        reader = gguf.GGUFReader(str(self.path))
        arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
        self._processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=self.config.to_dict())
        mapping = get_gguf_hf_weights_map(model, self._processor)
        for t in reader.tensors:   # dense families: the processors keep the names (they permute or offset values)
            if t.name in mapping:
                self._gguf_map[mapping[t.name]] = t.name
                self.shapes[mapping[t.name]] = tuple(int(d) for d in reversed(list(t.shape)))
        del reader

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors as float32 CPU tensors; each file is mapped only while they are read."""
        out: dict[str, torch.Tensor] = {}
        missing = [n for n in names if n not in self.shapes]
        if missing:
            raise LeanLMError(f"{self.path} has no tensor {missing[0]}; the checkpoint does not match its config")
        if self.gguf:
            import gguf
            import numpy as np

            reader = gguf.GGUFReader(str(self.path))
            by_name = {t.name: t for t in reader.tensors}
            for n in names:
                t = by_name[self._gguf_map[n]]
                w = self._processor.process(weights=gguf.dequantize(t.data, t.tensor_type), name=t.name).weights
                out[n] = torch.from_numpy(np.copy(w)).to(torch.float32)
            del reader, by_name
        else:
            for n in names:
                out[n] = self._read_rows(self.where[n], n)
        for n, t in out.items():   # in 4M-element pieces: isfinite of a whole embedding peaks at 1.7x its size
            if not all(bool(torch.isfinite(c).all()) for c in t.reshape(-1).split(1 << 22)):
                raise LeanLMError(f"parameter {n} holds NaN/inf; the checkpoint is corrupt, so calibrating it would be meaningless")
        return out

    CHUNK = 16 << 20

    def _read_rows(self, f: Path, name: str) -> torch.Tensor:
        """One tensor as float32, copied in row chunks of ~16 MB with the file mapped only for each chunk: a
        whole-tensor read holds the mapped pages and two copies at once (2.7x a 400 MB embedding, measured)."""
        from safetensors import safe_open

        shape = self.shapes[name]
        numel = 1
        for d in shape:
            numel *= d
        if not shape or numel * 4 <= self.CHUNK:
            with safe_open(str(f), framework="pt") as h:
                return h.get_tensor(name).to(torch.float32)
        out = torch.empty(shape, dtype=torch.float32)
        rows = max(1, self.CHUNK // (4 * (numel // shape[0])))
        for i in range(0, shape[0], rows):
            with safe_open(str(f), framework="pt") as h:
                out[i : i + rows] = h.get_slice(name)[i : i + rows]
        return out

    def nbytes(self, names) -> int:
        """float32 bytes of the named tensors."""
        total = 0
        for n in names:
            k = 1
            for d in self.shapes.get(n, ()):
                k *= d
            total += 4 * k
        return total


def skeleton(source: WeightSource, trust_remote_code: bool = False) -> nn.Module:
    """The model with every parameter on the meta device (buffers such as rotary frequencies are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(source.config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    source.bind(model)
    return model.eval()


def _source_name(model: nn.Module, name: str, source: WeightSource) -> str:
    """The checkpoint's name of parameter `name` (a tied head reads the embedding's tensor)."""
    if name in source.shapes:
        return name
    emb = model.get_input_embeddings()
    out = model.get_output_embeddings()
    head = next((n for n, m in model.named_modules() if m is out), None)
    if out is not None and name == f"{head}.weight":
        return next(n for n, m in model.named_modules() if m is emb) + ".weight"
    return name


def load_params(model: nn.Module, names: list[str], source: WeightSource) -> None:
    """Materialize the named parameters of `model` from `source` (accelerate's set_module_tensor_to_device)."""
    from accelerate.utils import set_module_tensor_to_device

    src = {n: _source_name(model, n, source) for n in names}
    tensors = source.read(list(dict.fromkeys(src.values())))
    for n in names:
        set_module_tensor_to_device(model, n, "cpu", value=tensors[src[n]])
    del tensors


def free(module: nn.Module) -> None:
    """Move a module's parameters and buffers back to the meta device (their memory is released)."""
    module.to("meta")
    gc.collect()


# ----------------------------------------------------------------------------------------- budget


@dataclass
class Estimate:
    """Peak memory of an offloaded run, from tensor shapes alone (bytes)."""
    process: int        # the interpreter and libraries, measured now
    block: int          # the largest decoder block's float32 weights
    working: int        # the algorithms' working copies of a block (float copies, Hessians)
    activations: int    # calibration hidden states in and out of a block, and one forward's intermediates
    outside: int        # embeddings / head / final norm (loaded for the first and the last phase)
    prepared: int = 0   # the peak so far (loading the tokenizer and the calibration text)

    SLACK = 100 * 10**6  # libraries loaded during the run (tokenizer, safetensors), allocator slack

    @property
    def work(self) -> int:
        """The larger phase: a block being calibrated (+10%), or the tensors outside the layers, which are read
        (file pages + copy) and written (serialized copy), so twice their size."""
        return max(int(1.1 * (self.block + self.working + self.activations)), self.outside * 2 + self.activations)

    @property
    def total(self) -> int:
        return max(self.prepared, self.process + self.work + self.SLACK)

    def describe(self) -> str:
        return (f"one block {gb(self.block)} + its working copies {gb(self.working)} + calibration activations "
                f"{gb(self.activations)} (+10%; or twice the embeddings/head {gb(self.outside)}) + the process itself "
                f"{gb(self.process)} + {gb(self.SLACK)} of slack"
                + (f" (the preparation already peaked at {gb(self.prepared)})" if self.prepared > self.process + self.work + self.SLACK else ""))


def estimate(model: nn.Module, source: WeightSource, rows: int, seq: int, one_pass_max_gib: float | None) -> Estimate:
    """The run's peak memory; ``one_pass_max_gib``: the limit under which GPTQ / SparseGPT / Wanda run a
    block in one pass over all rows (their config's), None when no algorithm does."""
    arch = arch_of(model)
    layers = arch.layers(model)
    prefix = arch.layers_prefix()
    params = [n for n, _ in model.named_parameters()]
    blocks = [[n for n in params if n.startswith(f"{prefix}{i}.")] for i in range(len(layers))]
    block = max(source.nbytes(b) for b in blocks)
    biggest = layers[max(range(len(layers)), key=lambda i: source.nbytes(blocks[i]))]
    lins = [m for m in biggest.modules() if isinstance(m, nn.Linear)]
    mods = dict(biggest.named_modules())
    groups = [[mods[n] for n in g if n in mods] for g in arch.groups]
    # a GPTQ / SparseGPT solve of a group of Linears sharing an input holds up to six float32 copies of their weights
    # (input, working copy, quantized copy, its reordering and the rounding's temporaries: 24 bytes a weight) and,
    # per input feature squared, the float32 Hessian, the one float64 matrix factorised and inverted in place and
    # the float32 factor: 16 bytes (measured on the 1.52B benchmark model, one thread: gate/up 0.31 GB and
    # down_proj 0.23 GB above the loaded block, against 0.37 and 0.30 GB here); AWQ's searches stay below that
    working = max((24 * sum(m.out_features * m.in_features for m in g) + 16 * g[0].in_features ** 2 for g in groups if g),
                  default=0)
    tokens = rows * seq
    acts = 4 * tokens * arch.hidden * 3
    per_token = sum(m.out_features for m in lins) + 4 * arch.hidden
    one_pass = 4 * (tokens * per_token + rows * arch.heads * seq * seq)
    if one_pass_max_gib is not None and one_pass / 2**30 <= one_pass_max_gib:
        acts += one_pass
    else:
        acts += 4 * (tokens * max(arch.intermediate, arch.hidden) * 2 + rows * arch.heads * seq * seq)
    outside = source.nbytes(list(dict.fromkeys(_source_name(model, n, source) for n in params if not n.startswith(prefix))))
    return Estimate(rss_bytes(), block, working, acts, outside, peak_rss_bytes())


def check_budget(est: Estimate, budget: int, option: str = "--max-memory") -> None:
    if est.total > budget:
        raise LeanLMError(f"{option} {gb(budget)} is too small: {est.describe()} need about {gb(est.total)}; "
                          f"raise {option} to at least {gb(est.total)}, or use fewer calibration tokens (--samples, --seq-len)")


# ----------------------------------------------------------------------------------------- the driver


Writer = Callable[[int, nn.Module, str], tuple[dict[str, dict[str, torch.Tensor]], dict]]


class BlockOffload:
    """The engine's hook for offloaded calibration (see the module docstring).

    ``writer(i, layer, prefix)`` returns ``({kind: {name: tensor}}, meta)`` for a calibrated block:
    the tensors of each kind ("model" for the checkpoint's shards; others, such as sparsity masks,
    go to files of their own) and a JSON-able dict kept with the block (read back by ``blocks_meta``).
    ``work`` is the folder of the run's finished blocks; ``key`` identifies the run (its options and
    calibration data): a folder left by a run with another key is refused.
    """

    def __init__(self, model: nn.Module, source: WeightSource, work: Path, writer: Writer, key: str, metadata: dict | None = None):
        self.model, self.source, self.work, self.writer, self.metadata = model, source, Path(work), writer, metadata
        self.arch = arch_of(model)
        self.prefix = self.arch.layers_prefix()
        self.n = self.arch.n_layers
        self.params = [n for n, _ in model.named_parameters()]
        self.work.mkdir(parents=True, exist_ok=True)
        prog = self.work / "progress.json"
        self.done = 0
        if prog.is_file():
            p = json.loads(prog.read_text())
            if p.get("key") != key:
                raise LeanLMError(f"{self.work} holds an interrupted run with other options or data; rerun it the same way "
                                  f"to resume, or remove {self.work} to start over")
            self.done = int(p["done"])
        else:
            prog.write_text(json.dumps({"key": key, "done": 0}))
        self.key = key
        self.resumed = self.done
        _malloc_returns_memory()

    def _names(self, i: int) -> list[str]:
        return [n for n in self.params if n.startswith(f"{self.prefix}{i}.")]

    def outside_names(self) -> list[str]:
        return [n for n in self.params if not n.startswith(self.prefix)]

    def capture(self, layers: nn.ModuleList, ids: torch.Tensor, batch: int):
        """(inputs of the first unfinished block, every layer's keyword arguments, its index), with only the
        parameters outside the decoder layers loaded, and every layer's forward replaced by the identity."""
        from .calibrate import capture_layer_inputs

        body = self.arch.body(self.model)
        names = [n for n in self.outside_names() if n.startswith(self.arch.body_path + ".")]
        load_params(self.model, names, self.source)
        for layer in layers:
            layer.forward = lambda *a, **k: a[0] if a else k["hidden_states"]
        try:
            hidden, kws = capture_layer_inputs(body, layers, ids, batch)
        finally:
            for layer in layers:
                del layer.forward
            for n in names:
                free(self.model.get_submodule(n.rsplit(".", 1)[0]))
        if self.done:
            hidden = torch.load(self.work / "hidden.pt", weights_only=True)
        return hidden, kws, self.done

    def load(self, i: int, layer: nn.Module) -> None:
        load_params(self.model, self._names(i), self.source)

    def finish_block(self, i: int, layer: nn.Module, hidden: list[torch.Tensor]) -> None:
        """Write block i's shard(s), its outputs (the next block's inputs) and the progress; free the block."""
        from safetensors.torch import save_file

        tensors, meta = self.writer(i, layer, f"{self.prefix}{i}.")
        for kind, ts in tensors.items():
            with atomic_file(self.work / f"{kind}-{i:05d}.safetensors") as tmp:
                save_file({k: v.contiguous() for k, v in ts.items()}, str(tmp), metadata=self.metadata if kind == "model" else None)
        with atomic_file(self.work / f"block-{i:05d}.json") as tmp:
            tmp.write_text(json.dumps(meta))
        with atomic_file(self.work / "hidden.pt") as tmp:
            torch.save(hidden, tmp)
        with atomic_file(self.work / "progress.json") as tmp:
            tmp.write_text(json.dumps({"key": self.key, "done": i + 1}))
        self.done = i + 1
        del tensors
        free(layer)
        trim_heap()   # a block's freed temporaries must not pile up in the heap from one block to the next

    def load_rest(self) -> None:
        """Load the parameters outside the decoder layers (embeddings, final norm, head) for the last phase."""
        load_params(self.model, self.outside_names(), self.source)
        head = self.model.get_output_embeddings()
        if head is not None and getattr(self.model.config.get_text_config(), "tie_word_embeddings", False):
            head.weight = self.model.get_input_embeddings().weight   # tied, as the in-memory model is

    def blocks_meta(self) -> list[dict]:
        return [json.loads((self.work / f"block-{i:05d}.json").read_text()) for i in range(self.n)]

    def kind_files(self, kind: str) -> list[Path]:
        return [self.work / f"{kind}-{i:05d}.safetensors" for i in range(self.n)]


@contextlib.contextmanager
def without_layers(model: nn.Module):
    """The model with its decoder stack emptied for the duration (to walk only what lies outside it)."""
    arch = arch_of(model)
    body = arch.body(model)
    layers = body.layers
    body.layers = nn.ModuleList()
    try:
        yield model
    finally:
        body.layers = layers


def write_folder(off: BlockOffload, rest: dict[str, torch.Tensor], folder: Path) -> None:
    """Move the finished blocks' model shards into `folder` as ``model-0000i-of-0000N.safetensors``, with the
    tensors outside the layers (`rest`) as the last shard, and write the shard index."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    n = off.n + 1
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    save_file({k: v.contiguous() for k, v in rest.items()}, str(folder / names[-1]), metadata=off.metadata)
    for f, name in zip(off.kind_files("model"), names):
        os.replace(f, folder / name)
    weight_map, total = {}, 0
    for name in names:
        with safe_open(str(folder / name), framework="pt") as h:
            weight_map.update({k: name for k in h.keys()})
        total += (folder / name).stat().st_size
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def run_key(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            h.update(p.cpu().numpy().tobytes())
            h.update(str(tuple(p.shape)).encode())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()


def work_dir(out: Path) -> Path:
    """Where an offloaded run keeps its finished blocks (beside OUT, removed when it completes)."""
    return out.parent / f".{out.name}.offload"


def publish(folder: Path, out: Path, overwrite: bool) -> None:
    """Rename the completed `folder` to `out` (replacing it when `overwrite`)."""
    from .io import _readable

    check_output(out, overwrite)
    _readable(folder)
    if out.exists():
        shutil.rmtree(out)
    os.replace(folder, out)
