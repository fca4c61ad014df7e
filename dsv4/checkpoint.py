"""Checkpoints in DeepSeek's official safetensors layout: what the layout is, seeded random ones, and loading.

Two tables, name -> (shape, dtype), describe everything:
- `official_layout`: the tensors DeepSeek ships (tests/test_checkpoint.py pins V4-Flash's published counts). FP8 linears carry an e8m0 scale per 128x128
  block; routed experts are FP4 packed two per int8 with an e8m0 scale per 1x32 block, one tensor per expert.
- `runtime_layout`: the model's state_dict. Scales are fp32; norms, gate, head and compressor projections are upcast
  to fp32; `wo_a` is dequantised to bf16 (as the reference convert.py does); routed experts are stacked per layer.

`load_checkpoint` validates a directory against the first from metadata alone, then converts it to the second.
`write_checkpoint` writes a model in the first (given weights, e.g. a trained one, or a seeded random model),
quantising FP8/FP4 linears as DeepSeek does, so it loads by the same path as the real one.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dsv4 import manifest, validate
from dsv4.backends.canonical.primitives import counter_uniform
from dsv4.backends.contracts import FP4_BLOCK, FP8_BLOCK
from dsv4.config import CSA_RATIO, ModelConfig
from dsv4.errors import DSV4Error
from dsv4.formats import (dequantize_fp8_weight, e8m0_to_float, float_to_e8m0, quantize_weight_fp4,
                          quantize_weight_fp8)
from dsv4.parallel import expert_range
from dsv4.tokenizer import Tokenizer, byte_level_tokenizer_json

BF16, F32, E4M3, E8M0 = torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.float8_e8m0fnu
CONFIG_FILE, TOKENIZER_FILE, INDEX_FILE = "config.json", "tokenizer.json", "model.safetensors.index.json"
_SAFETENSORS_DTYPE = {BF16: "BF16", F32: "F32", E4M3: "F8_E4M3", E8M0: "F8_E8M0", torch.int8: "I8",
                      torch.int64: "I64"}
_EXPERT = re.compile(r"^(.*\.ffn\.experts)\.(\d+)\.(w[123]\.(?:weight|scale))$")          # official, per expert
_STACKED_EXPERT = re.compile(r"^(.*\.ffn\.experts)\.(w[123]\.(?:weight|scale))$")          # runtime, stacked
# convert.py's renames of legacy/HF names, applied after stripping a leading "model.".
_RENAMES = (("self_attn", "attn"), ("mlp", "ffn"), ("weight_scale_inv", "scale"), ("e_score_correction_bias", "bias"))


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


# -- layouts ------------------------------------------------------------------------------------------------------
def official_layout(config: ModelConfig) -> dict[str, TensorSpec]:
    """Every tensor of the official checkpoint of `config`, in a fixed order (as DeepSeek's release names them)."""
    specs: dict[str, TensorSpec] = {}
    d, hc, heads, head_dim = config.dim, config.hc_mult, config.n_heads, config.head_dim

    def add(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        specs[name] = TensorSpec(tuple(shape), dtype)

    def linear(name: str, out_features: int, in_features: int, fmt: str = config.dtype) -> None:
        """A linear's weight and, when quantised, its e8m0 block scales. fmt: fp8, fp4 or bf16."""
        if fmt == "fp8":
            add(f"{name}.weight", (out_features, in_features), E4M3)
            add(f"{name}.scale", (-(-out_features // FP8_BLOCK), -(-in_features // FP8_BLOCK)), E8M0)
        elif fmt == "fp4":
            add(f"{name}.weight", (out_features, in_features // 2), torch.int8)
            add(f"{name}.scale", (out_features, in_features // FP4_BLOCK), E8M0)
        else:
            add(f"{name}.weight", (out_features, in_features), BF16)

    def norm(name: str, n: int) -> None:
        add(f"{name}.weight", (n,), BF16)

    def compressor(prefix: str, ratio: int, width: int) -> None:
        series = 2 if ratio == CSA_RATIO else 1  # CSA compressors overlap blocks: two channel series
        add(f"{prefix}.ape", (ratio, series * width), F32)
        add(f"{prefix}.wkv.weight", (series * width, d), BF16)
        add(f"{prefix}.wgate.weight", (series * width, d), BF16)
        norm(f"{prefix}.norm", width)

    def hc_head(p: str) -> None:
        add(f"{p}hc_head_fn", (hc, hc * d), F32)
        add(f"{p}hc_head_base", (hc,), F32)
        add(f"{p}hc_head_scale", (1,), F32)

    def block(p: str, layer_id: int, hash_routed: bool) -> None:
        ratio = config.layer_ratio(layer_id)
        for sub in ("attn", "ffn"):
            add(f"{p}hc_{sub}_fn", (config.hc_mix_dim, hc * d), F32)
            add(f"{p}hc_{sub}_base", (config.hc_mix_dim,), F32)
            add(f"{p}hc_{sub}_scale", (3,), F32)  # one scale each for pre, post and the residual mixing
        norm(f"{p}attn_norm", d)
        norm(f"{p}ffn_norm", d)
        add(f"{p}attn.attn_sink", (heads,), F32)
        linear(f"{p}attn.wq_a", config.q_lora_rank, d)
        norm(f"{p}attn.q_norm", config.q_lora_rank)
        linear(f"{p}attn.wq_b", heads * head_dim, config.q_lora_rank)
        linear(f"{p}attn.wkv", head_dim, d)
        norm(f"{p}attn.kv_norm", head_dim)
        linear(f"{p}attn.wo_a", config.o_groups * config.o_lora_rank, heads * head_dim // config.o_groups)
        linear(f"{p}attn.wo_b", d, config.o_groups * config.o_lora_rank)
        if ratio > 0:
            compressor(f"{p}attn.compressor", ratio, head_dim)
        if ratio == CSA_RATIO:
            compressor(f"{p}attn.indexer.compressor", ratio, config.index_head_dim)
            linear(f"{p}attn.indexer.wq_b", config.index_n_heads * config.index_head_dim, config.q_lora_rank)
            add(f"{p}attn.indexer.weights_proj.weight", (config.index_n_heads, d), BF16)
        add(f"{p}ffn.gate.weight", (config.n_routed_experts, d), BF16)
        if hash_routed:
            add(f"{p}ffn.gate.tid2eid", (config.vocab_size, config.n_activated_experts), torch.int64)
        else:
            add(f"{p}ffn.gate.bias", (config.n_routed_experts,), F32)
        inter = config.moe_inter_dim
        for e in range(config.n_routed_experts):
            linear(f"{p}ffn.experts.{e}.w1", inter, d, config.expert_dtype)
            linear(f"{p}ffn.experts.{e}.w2", d, inter, config.expert_dtype)
            linear(f"{p}ffn.experts.{e}.w3", inter, d, config.expert_dtype)
        linear(f"{p}ffn.shared_experts.w1", inter, d)
        linear(f"{p}ffn.shared_experts.w2", d, inter)
        linear(f"{p}ffn.shared_experts.w3", inter, d)

    add("embed.weight", (config.vocab_size, d), BF16)
    for layer_id in range(config.n_layers):
        block(f"layers.{layer_id}.", layer_id, config.is_hash_layer(layer_id))
    norm("norm", d)
    add("head.weight", (config.vocab_size, d), BF16)
    hc_head("")
    for i in range(config.n_mtp_layers):
        p = f"mtp.{i}."
        linear(f"{p}e_proj", d, d)
        linear(f"{p}h_proj", d, d)
        norm(f"{p}enorm", d)
        norm(f"{p}hnorm", d)
        block(p, config.n_layers + i, hash_routed=False)  # MTP shares embed and head with the main model
        norm(f"{p}norm", d)
        hc_head(p)
    return specs


def runtime_layout(config: ModelConfig, experts: range | None = None) -> dict[str, TensorSpec]:
    """The model's state_dict: the official names and dtypes except that scales and norms are fp32, `wo_a` is bf16
    without a scale, and routed experts are stacked per layer
    (`….ffn.experts.w1.weight` [E, ...], `….ffn.experts.w1.scale` [E, ...]). With `experts` (one expert-parallel
    rank's share) the stacks hold only those: [len(experts), ...]."""
    n_experts = config.n_routed_experts if experts is None else len(experts)
    runtime: dict[str, TensorSpec] = {}
    for name, spec in official_layout(config).items():
        if name.endswith("attn.wo_a.scale"):
            continue
        dtype = _runtime_dtype(name, spec.dtype)
        expert = _EXPERT.match(name)
        if expert is None:
            runtime[name] = TensorSpec(spec.shape, dtype)
        elif expert[2] == "0":
            runtime[f"{expert[1]}.{expert[3]}"] = TensorSpec((n_experts, *spec.shape), dtype)
    return runtime


def _runtime_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    if name.endswith("attn.wo_a.weight"):
        return BF16
    # bf16 weights stay bf16 (the head, gate and compressor projections compute fp32 products of those values)
    return F32 if name.endswith((".scale", "norm.weight")) else dtype


# -- random checkpoints ---------------------------------------------------------------------------------------------
COMB_DIAGONAL = 6.0  # residual-mixing logit on the diagonal: softmax + Sinkhorn start within ~1% of the identity
HC_FN_STD = 1e-2
APE_STD = 1e-2


# Bump when random_weights changes what it generates: cached random checkpoints and golden digests depend on it.
RANDOM_WEIGHTS_VERSION = 2


def random_weights(config: ModelConfig, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """The seeded random model `write_checkpoint` stores, before quantisation: (name, value) for every official
    tensor except the `.scale`s, in `official_layout` order. FP8/FP4 linears come as fp32 [out, in]; every other
    tensor already has its checkpoint dtype.

    Linear weights of standard deviation 1/sqrt(in), embedding of deviation 1 (uniform, portable), norms 1, attention sinks and gate biases 0. The mHC mixing
    starts as a plain residual: pre ~ 1/hc_mult per stream, post ~ 1 and the residual mixing ~ identity.
    Hash layers route token t to experts (t*k + j) % E, j < k: k distinct experts per token, all experts used
    equally (to within one token).
    """
    hc = config.hc_mult
    pre_logit = math.log(1.0 / (hc - 1))                               # sigmoid(pre_logit) = 1/hc
    counter = iter(range(1 << 30))
    mix_base = torch.cat([torch.full((hc,), pre_logit), torch.zeros(hc), COMB_DIAGONAL * torch.eye(hc).flatten()])

    def normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
        """Zero-mean values of standard deviation `std` (uniform, from the counter-based generator): the same bits
        on every machine and torch version, so golden digests of a preset's model stay valid everywhere."""
        u = counter_uniform(seed, torch.tensor([next(counter)]), torch.tensor([0]), math.prod(shape), "cpu")
        return ((u * 2 - 1) * (std * math.sqrt(3))).view(shape)

    for name, spec in official_layout(config).items():
        if name.endswith(".scale"):
            continue
        if spec.dtype in (E4M3, torch.int8):  # an FP8 or FP4 linear; FP4 packs two values per byte
            in_features = spec.shape[1] * (2 if spec.dtype == torch.int8 else 1)
            yield name, normal((spec.shape[0], in_features), in_features ** -0.5)
            continue
        if name == "embed.weight":
            value = normal(spec.shape, 1.0)
        elif name.endswith("norm.weight") or name.endswith("_scale"):
            value = torch.ones(spec.shape)
        elif name.endswith("_fn"):
            value = normal(spec.shape, HC_FN_STD)
        elif name.endswith("hc_head_base"):
            value = torch.full(spec.shape, pre_logit)
        elif name.endswith("_base"):
            value = mix_base.clone()
        elif name.endswith(("attn_sink", "gate.bias")):
            value = torch.zeros(spec.shape)
        elif name.endswith(".ape"):
            value = normal(spec.shape, APE_STD)
        elif name.endswith("gate.tid2eid"):
            k = config.n_activated_experts
            value = (torch.arange(config.vocab_size)[:, None] * k + torch.arange(k)) % config.n_routed_experts
        else:  # the remaining 2-D weights: head, gate, compressor and indexer projections, bf16 linears
            value = normal(spec.shape, spec.shape[1] ** -0.5)
        yield name, value.to(spec.dtype)


def write_checkpoint(config: ModelConfig, out_dir: str | Path, seed: int = 0, shards: int = 1,
                     weights: Iterable[tuple[str, torch.Tensor]] | None = None) -> Path:
    """Write a model in the official layout: config.json, `shards` safetensors files model-0000k-of-0000n.safetensors
    with their index, and a byte-level tokenizer.json. Returns `out_dir`.

    `weights` are (name, value) pairs as `random_weights` yields them: every official tensor except the `.scale`s,
    in `official_layout` order, FP8/FP4 linears as float [out, in] (quantised here, with e8m0 block scales), every
    other tensor in its checkpoint dtype. Default: `random_weights(config, seed)`."""
    tokenizer_json = byte_level_tokenizer_json(config.vocab_size, config.bos_token_id, config.eos_token_id)
    layout = official_layout(config)
    if not 1 <= shards <= len(layout):
        raise DSV4Error(f"shards must be between 1 and {len(layout)} (one tensor per shard), got {shards}")
    plan = _plan_shards(layout, shards)
    files = [f"model-{k + 1:05d}-of-{shards:05d}.safetensors" for k in range(shards)]
    expected = iter(name for name in layout if not name.endswith(".scale"))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=2) + "\n")
    (out / TOKENIZER_FILE).write_text(tokenizer_json)
    shard, pending = 0, {}
    for name, value in random_weights(config, seed) if weights is None else weights:
        _check_weight(name, value, next(expected, None), layout)
        for key, tensor in _encode(name, value, layout[name].dtype).items():
            if plan[key] != shard:  # shards hold consecutive tensors, so this one starts the next file
                save_file(pending, out / files[shard], metadata={"format": "pt"})
                shard, pending = plan[key], {}
            pending[key] = tensor
    if (missing := next(expected, None)) is not None:
        raise DSV4Error(f"weights end before {missing}")
    save_file(pending, out / files[shard], metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(spec.nbytes for spec in layout.values())},
             "weight_map": {name: files[plan[name]] for name in layout}}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    manifest.write_manifest(out, checkpoint_files(out))
    return out


def _check_weight(name: str, value: torch.Tensor, expected: str | None, layout: dict[str, TensorSpec]) -> None:
    """A given weight must be the next official tensor, with its shape ([out, in] for FP8/FP4 linears) and dtype
    (any float dtype for FP8/FP4 linears)."""
    if name != expected:
        raise DSV4Error(f"weights out of order: got {name}, expected {expected or 'no more tensors'}")
    spec = layout[name]
    quantised = spec.dtype in (E4M3, torch.int8)
    shape = (spec.shape[0], spec.shape[1] * (2 if spec.dtype == torch.int8 else 1)) if quantised else spec.shape
    if tuple(value.shape) != shape:
        raise DSV4Error(f"weight {name} has shape {list(value.shape)}, expected {list(shape)}")
    if quantised and not value.is_floating_point() or not quantised and value.dtype != spec.dtype:
        raise DSV4Error(f"weight {name} has dtype {value.dtype}, expected "
                        f"{'a float dtype' if quantised else spec.dtype}")


def _encode(name: str, value: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One intended tensor in its checkpoint format: FP8/FP4 linears become weight + e8m0 `.scale`."""
    if dtype not in (E4M3, torch.int8):
        return {name: value}
    quantized, scale = quantize_weight_fp8(value) if dtype == E4M3 else quantize_weight_fp4(value)
    return {name: quantized, f"{name.removesuffix('.weight')}.scale": float_to_e8m0(scale)}


def _plan_shards(layout: dict[str, TensorSpec], shards: int) -> dict[str, int]:
    """Split the tensors, in order, into `shards` runs of about equal bytes, none empty."""
    total = sum(spec.nbytes for spec in layout.values())
    plan: dict[str, int] = {}
    shard, placed, in_shard = 0, 0, 0
    for i, (name, spec) in enumerate(layout.items()):
        tensors_left, shards_after = len(layout) - i, shards - 1 - shard
        if in_shard and shards_after and (placed >= (shard + 1) * total / shards or tensors_left == shards_after):
            shard, in_shard = shard + 1, 0
        plan[name] = shard
        placed += spec.nbytes
        in_shard += 1
    return plan


# -- loading --------------------------------------------------------------------------------------------------------
def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    progress: Callable[[int, int], None] | None = None, expert_shard: tuple[int, int] | None = None,
                    verify: bool | None = None, notice: Callable[[str], None] = warnings.warn
                    ) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """Read an official (or HF-named) checkpoint directory into `runtime_layout` tensors on `device`.

    First the files are checked against the directory's checksum manifest (dsv4.manifest.check_on_load; `verify`
    True: always hash, False: skip, None: hash up to HASH_ON_LOAD_LIMIT bytes; `notice` is told what was not
    checked). Then every file, name, shape and dtype is checked against `official_layout` from the safetensors
    headers before any data is read, and every float tensor is checked for NaN/Inf as it is read; a problem raises
    DSV4Error naming the tensor and file. Files are memory-mapped. `progress` is called with (checkpoint tensors
    read, total) as the conversion goes. `expert_shard` = (rank, size) reads only that expert-parallel rank's
    routed experts (dsv4.parallel.expert_range); other experts' data is never read.
    """
    root = validate.directory(path, "checkpoint directory")
    checked = manifest.check_on_load(root, verify, notice)
    config = ModelConfig.from_file(root / CONFIG_FILE)
    tokenizer = Tokenizer.from_file(root / TOKENIZER_FILE)
    if (tokenizer.bos_id, tokenizer.eos_id) != (config.bos_token_id, config.eos_token_id):
        raise DSV4Error(f"tokenizer.json has bos/eos ids {tokenizer.bos_id}/{tokenizer.eos_id} but config.json "
                        f"says {config.bos_token_id}/{config.eos_token_id}")
    experts = range(config.n_routed_experts) if expert_shard is None else expert_range(config.n_routed_experts,
                                                                                         *expert_shard)
    layout = official_layout(config)
    files, index = _checkpoint_files(root)
    if checked is not None:
        _check_listed(root, checked, _files_read(files, index))
    with ExitStack() as stack:
        handles = {file: _open(root / file, stack) for file in files}
        found = _find_tensors(handles)
        _validate(layout, found, handles, index, files)
        tensors = _convert(config, experts, layout, found, handles, device, progress)
    return config, tensors, tokenizer


def _official_name(key: str) -> str | None:
    """convert.py's renaming; None for the MTP copies of the embedding and head, which it drops."""
    name = key.removeprefix("model.")
    for old, new in _RENAMES:
        name = name.replace(old, new)
    if name.startswith("mtp.") and ("emb" in name or name.endswith("head.weight")):
        return None
    return name


def checkpoint_files(root: Path) -> list[str]:
    """Every file a load reads: config, tokenizer, the index when there is one, and the shards."""
    return _files_read(*_checkpoint_files(root))


def _files_read(shards: list[str], index: dict[str, str] | None) -> list[str]:
    return [CONFIG_FILE, TOKENIZER_FILE, *([INDEX_FILE] if index is not None else []), *shards]


def verify_checkpoint(path: str | Path, progress: Callable[[int, int], None] | None = None) -> manifest.Manifest:
    """Hash every file of the checkpoint at `path` against its manifest, whatever its size; the manifest must list
    every file a load reads. `progress` gets (files hashed, total)."""
    root = validate.directory(path, "checkpoint directory")
    found = manifest.require(root)
    manifest.verify_files(root, found, progress)
    _check_listed(root, found, checkpoint_files(root))
    return found


def _check_listed(root: Path, checked: manifest.Manifest, files: list[str]) -> None:
    if unlisted := set(files) - set(checked.files):
        raise DSV4Error(f"{min(unlisted)} in {root} is not listed in its {manifest.MANIFEST_FILE}, so it is not "
                        f"checksummed; `dsv4 checkpoint manifest --force {root}` rewrites the manifest")


def _checkpoint_files(root: Path) -> tuple[list[str], dict[str, str] | None]:
    """The safetensors files to read and, when there is an index, where it says each (official) name lives."""
    index_path = root / INDEX_FILE
    if not index_path.exists():
        files = sorted(p.name for p in root.glob("*.safetensors"))
        if len(files) != 1:
            raise DSV4Error(f"{root} has {len(files)} .safetensors files and no {INDEX_FILE}; expected exactly one")
        return files, None
    try:
        weight_map = json.loads(validate.read_text(index_path, "safetensors index"))["weight_map"]
        files = sorted({str(file) for file in weight_map.values()})
        index = {name: str(file) for key, file in weight_map.items() if (name := _official_name(key)) is not None}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise DSV4Error(f"{index_path} is not a valid safetensors index: {type(e).__name__}: {e}") from None
    for file in files:
        if not (root / file).is_file():
            raise DSV4Error(f"shard {file} listed in {INDEX_FILE} is missing from {root}")
    return files, index


def _open(path: Path, stack: ExitStack):
    try:
        return stack.enter_context(safe_open(str(path), framework="pt"))
    except (SafetensorError, OSError) as e:
        raise DSV4Error(f"{path.name} is not a readable safetensors file (truncated or corrupt): {e}") from None


def _find_tensors(handles: dict) -> dict[str, tuple[str, str]]:
    """official name -> (file, key as stored) over all files."""
    found: dict[str, tuple[str, str]] = {}
    for file, handle in handles.items():
        for key in handle.keys():
            name = _official_name(key)
            if name is None:
                continue
            if name in found:
                raise DSV4Error(f"tensor {name} is stored twice: in {found[name][0]} and in {file}")
            found[name] = (file, key)
    return found


def _validate(layout: dict[str, TensorSpec], found: dict[str, tuple[str, str]], handles: dict,
              index: dict[str, str] | None, files: list[str]) -> None:
    for name in layout:
        if name in found:
            continue
        if index is None:
            raise DSV4Error(f"missing tensor {name}: not in {files[0]}")
        if name in index:
            raise DSV4Error(f"missing tensor {name}: {INDEX_FILE} puts it in {index[name]}, which lacks it")
        raise DSV4Error(f"missing tensor {name}: not listed in {INDEX_FILE} and in none of its files")
    for name, (file, key) in found.items():
        if name not in layout:
            raise DSV4Error(f"unexpected tensor {key} in {file}: not part of this config's checkpoint")
    for name, spec in layout.items():
        file, key = found[name]
        stored = handles[file].get_slice(key)
        shape, dtype = tuple(stored.get_shape()), stored.get_dtype()
        if shape != spec.shape:
            raise DSV4Error(f"tensor {key} in {file} has shape {list(shape)}, expected {list(spec.shape)}")
        if dtype != _SAFETENSORS_DTYPE[spec.dtype]:
            raise DSV4Error(f"tensor {key} in {file} has dtype {dtype}, expected {_SAFETENSORS_DTYPE[spec.dtype]}")


def _convert(config: ModelConfig, experts: range, layout: dict[str, TensorSpec],
             found: dict[str, tuple[str, str]], handles: dict, device: str | torch.device,
             progress: Callable[[int, int], None] | None) -> dict[str, torch.Tensor]:
    skipped = sum(1 for name in layout if (m := _EXPERT.match(name)) and int(m[2]) not in experts)
    done = 0

    def read(name: str) -> torch.Tensor:
        """One checkpoint tensor; e8m0 scales come back as fp32."""
        nonlocal done
        file, key = found[name]
        tensor = handles[file].get_tensor(key)
        _check_values(tensor, name, key, file, config)
        if layout[name].dtype == E8M0:
            tensor = e8m0_to_float(tensor)
        done += 1
        if progress is not None:
            progress(done, len(layout) - skipped)
        return tensor

    tensors: dict[str, torch.Tensor] = {}
    for name, spec in runtime_layout(config, experts).items():
        scale = name.replace(".weight", ".scale")
        if stacked := _STACKED_EXPERT.match(name):
            value = torch.stack([read(f"{stacked[1]}.{e}.{stacked[2]}") for e in experts])
        elif name.endswith("attn.wo_a.weight") and scale in layout:  # FP8 in the files, bf16 in the model
            value = dequantize_fp8_weight(read(name), read(scale))
        else:
            value = read(name)
        tensors[name] = value.to(device=device, dtype=spec.dtype)
    return tensors


def _check_values(tensor: torch.Tensor, name: str, key: str, file: str, config: ModelConfig) -> None:
    """Scales, norms and every other bf16/fp32 tensor finite, hash-routing tables within the experts. FP8/FP4 weight
    payloads (most of the bytes) are not scanned: a NaN code there makes the logits non-finite, which names the
    layer (dsv4.diagnose)."""
    if tensor.dtype == E8M0 and (tensor.view(torch.uint8) == 255).any():
        raise DSV4Error(f"scale {key} in {file} holds e8m0 code 255 (NaN)")
    # The largest magnitude is finite iff every value is (amax propagates NaN): one reduction, much cheaper than
    # an elementwise isfinite on bf16.
    if tensor.dtype in (BF16, F32) and tensor.numel() and not torch.isfinite(tensor.abs().amax()):
        raise DSV4Error(f"tensor {key} in {file} holds {int((~torch.isfinite(tensor)).sum())} NaN or Inf value(s)")
    if name.endswith("gate.tid2eid") and ((tensor < 0) | (tensor >= config.n_routed_experts)).any():
        raise DSV4Error(f"hash-routing table {key} in {file} names experts outside 0..{config.n_routed_experts - 1}")
