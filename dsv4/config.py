"""Model configuration: one dataclass that reads the official `config.json`, plus named presets.

Field names are those of DeepSeek's reference `inference/config.json` (`ModelArgs`). The official root
`config.json` (HF names such as `hidden_size`) is also accepted and translated. Every architectural number lives here.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from dsv4 import validate
from dsv4.errors import DSV4Error

CSA_RATIO = 4       # the compress ratio of CSA layers: overlapping blocks and the lightning indexer; any other is HCA
CACHE_BLOCK = 256   # positions covered by one block of the paged KV cache (dsv4.cache); every ratio divides it


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 129280
    dim: int = 4096
    moe_inter_dim: int = 2048
    n_layers: int = 43
    n_hash_layers: int = 3
    n_mtp_layers: int = 1
    n_heads: int = 64
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 6
    score_func: str = "sqrtsoftplus"
    route_scale: float = 1.5
    swiglu_limit: float = 10.0
    q_lora_rank: int = 1024
    head_dim: int = 512
    rope_head_dim: int = 64
    o_groups: int = 8
    o_lora_rank: int = 1024
    window_size: int = 128
    original_seq_len: int = 65536
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_factor: float = 16.0
    beta_fast: int = 32
    beta_slow: int = 1
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    norm_eps: float = 1e-6
    dtype: str = "fp8"
    scale_fmt: str = "ue8m0"   # activation scales are powers of two (dsv4.formats); the only format implemented
    expert_dtype: str = "fp4"
    # One ratio per layer plus one per MTP layer: 0 = sliding window only, CSA_RATIO = CSA (overlapping + indexer),
    # any other (128 in the releases) = HCA.
    compress_ratios: tuple[int, ...] = field(default_factory=lambda: (0, 0) + (4, 128) * 20 + (4, 0))
    max_seq_len: int = 4096  # cache and RoPE-table length only
    max_batch_size: int = 4
    bos_token_id: int = 0
    eos_token_id: int = 1

    def __post_init__(self) -> None:
        self.validate()

    # -- derived quantities -------------------------------------------------------------------------------------
    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.rope_head_dim

    @property
    def hc_mix_dim(self) -> int:
        """Rows of an mHC mixing projection: pre (hc) + post (hc) + residual mixing (hc*hc)."""
        return (2 + self.hc_mult) * self.hc_mult

    def layer_ratio(self, layer_id: int) -> int:
        return self.compress_ratios[layer_id]

    def is_hash_layer(self, layer_id: int) -> bool:
        return layer_id < self.n_hash_layers

    # -- validation ---------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Each field's type and range, then the architecture's constraints; a DSV4Error names the field."""
        for f in dataclasses.fields(self):
            value, hint = getattr(self, f.name), _FIELD_TYPES[f.name]
            validate.typed(value, hint, f"invalid model config: {f.name}")
            zero_ok = f.name in _MAY_BE_ZERO
            if hint in (int, float) and (value < 0 or value == 0 and not zero_ok):
                raise DSV4Error(f"invalid model config: {f.name} must be {'>= 0' if zero_ok else 'positive'}, "
                                f"got {value}")

        def need(ok: bool, what: str) -> None:
            if not ok:
                raise DSV4Error(f"invalid model config: {what}")

        need(len(self.compress_ratios) == self.n_layers + self.n_mtp_layers,
             f"compress_ratios has {len(self.compress_ratios)} entries, expected n_layers + n_mtp_layers = "
             f"{self.n_layers + self.n_mtp_layers}")
        need(all(r == 0 or (r > 0 and CACHE_BLOCK % r == 0) for r in self.compress_ratios),
             f"compress ratios must be 0 or divide the cache block of {CACHE_BLOCK} positions, got "
             f"{list(self.compress_ratios)}")
        need(self.n_hash_layers <= self.n_layers, f"n_hash_layers {self.n_hash_layers} exceeds n_layers {self.n_layers}")
        need(self.hc_mult >= 2, f"hc_mult must be >= 2 (mHC mixes several residual streams), got {self.hc_mult}")
        need(self.n_shared_experts == 1, "n_shared_experts must be 1 (as in the reference)")
        need(self.score_func == "sqrtsoftplus", f"score_func {self.score_func!r} is not supported (sqrtsoftplus)")
        need(self.rope_head_dim % 2 == 0 and self.rope_head_dim < self.head_dim, "rope_head_dim must be even and < head_dim")
        need(self.nope_head_dim % 64 == 0, "head_dim - rope_head_dim must be a multiple of 64 (KV fake-quant blocks)")
        need(self.index_head_dim & (self.index_head_dim - 1) == 0, "index_head_dim must be a power of two (Hadamard)")
        need(self.index_head_dim > self.rope_head_dim, "index_head_dim must exceed rope_head_dim")
        need(self.n_heads % self.o_groups == 0, "n_heads must be divisible by o_groups")
        need(self.n_activated_experts <= self.n_routed_experts, "n_activated_experts exceeds n_routed_experts")
        for name in ("dim", "q_lora_rank", "moe_inter_dim", "o_lora_rank"):
            need(getattr(self, name) % 128 == 0, f"{name} must be a multiple of 128 (FP8/FP4 activation blocks)")
        need(self.n_heads * self.head_dim // self.o_groups % 128 == 0, "per-group output width must be a multiple of 128")
        need(self.max_seq_len % 128 == 0, "max_seq_len must be a multiple of 128")
        for name in ("bos_token_id", "eos_token_id"):
            need(getattr(self, name) < self.vocab_size, f"{name} {getattr(self, name)} is outside the vocabulary of "
                                                        f"{self.vocab_size}")
        need(self.bos_token_id != self.eos_token_id, "bos_token_id and eos_token_id must differ")
        need(self.dtype in ("fp8", "bf16"), f"dtype {self.dtype!r}: expected fp8 or bf16")
        need(self.scale_fmt == "ue8m0", f"scale_fmt {self.scale_fmt!r}: only ue8m0 (power-of-two scales) is supported")
        need(self.expert_dtype in ("fp4", "fp8"), f"expert_dtype {self.expert_dtype!r}: expected fp4 or fp8")

    # -- (de)serialisation --------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["compress_ratios"] = list(self.compress_ratios)
        return d

    @classmethod
    def from_json(cls, data: dict) -> "ModelConfig":
        """Build from the reference `inference/config.json` or the HF root `config.json` (HF names translated).

        Every key must be a field, an HF name of one, or one of the HF fields dsv4 knowingly ignores
        (HF_IGNORED); an unknown key is an error naming it, with the closest known key as a suggestion."""
        if not isinstance(data, dict):
            raise DSV4Error(f"invalid model config: expected a JSON object, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        values: dict = {}

        def put(name: str, value, key: str) -> None:
            if name not in fields:
                raise validate.unknown_key(key, sorted(fields | set(_HF_NAMES) | HF_IGNORED), "invalid model config")
            value = _from_json_number(value, _FIELD_TYPES[name])
            if name in values and values[name] != value:
                raise DSV4Error(f"invalid model config: {name} is given twice with different values, "
                                f"{values[name]!r} and {value!r} (as {key!r})")
            values[name] = value

        for key, value in data.items():
            if key == "rope_scaling":
                for sub, v in _rope_scaling(value).items():
                    put(_ROPE_SCALING_NAMES[sub], v, f"rope_scaling.{sub}")
            elif key not in HF_IGNORED:
                put(_HF_NAMES.get(key, key), value, key)
        if isinstance(values.get("compress_ratios"), list):
            values["compress_ratios"] = tuple(values["compress_ratios"])
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        text = validate.read_text(path, "config")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DSV4Error(f"{path} is not valid JSON: {e}") from None
        try:
            return cls.from_json(data)
        except DSV4Error as e:
            raise DSV4Error(f"{path}: {e}") from None


_FIELD_TYPES = typing.get_type_hints(ModelConfig)
# Numbers that may be 0; every other int must be >= 1 and every other float > 0.
_MAY_BE_ZERO = frozenset({"n_hash_layers", "n_mtp_layers", "original_seq_len", "bos_token_id", "eos_token_id"})


def _from_json_number(value, hint):
    """JSON does not tell 32 from 32.0: an integral float is accepted for an int field, an int for a float field."""
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _rope_scaling(value) -> dict:
    """The HF `rope_scaling` object: its known keys (see _ROPE_SCALING_NAMES), or an error naming an unknown one."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DSV4Error(f"invalid model config: rope_scaling must be an object, got {value!r}")
    for key in value:
        if key not in _ROPE_SCALING_NAMES and key not in ROPE_SCALING_IGNORED:
            raise validate.unknown_key(key, [*_ROPE_SCALING_NAMES, *ROPE_SCALING_IGNORED],
                                       "invalid model config: rope_scaling")
    return {key: v for key, v in value.items() if key in _ROPE_SCALING_NAMES}


_HF_NAMES = {
    "hidden_size": "dim",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "n_routed_experts": "n_routed_experts",
    "num_experts_per_tok": "n_activated_experts",
    "moe_intermediate_size": "moe_inter_dim",
    "routed_scaling_factor": "route_scale",
    "scoring_func": "score_func",
    "qk_rope_head_dim": "rope_head_dim",
    "sliding_window": "window_size",
    "num_hash_layers": "n_hash_layers",
    "num_nextn_predict_layers": "n_mtp_layers",
    "rms_norm_eps": "norm_eps",
}
_ROPE_SCALING_NAMES = {"factor": "rope_factor", "original_max_position_embeddings": "original_seq_len",
                       "beta_fast": "beta_fast", "beta_slow": "beta_slow"}

# The Hugging Face config.json fields dsv4 knowingly ignores (every other unknown key is an error): bookkeeping of
# the transformers library, settings implied by the architecture (one KV head, no attention bias, SiLU, untied
# embeddings), inherited DeepSeek-V2/V3 fields V4 does not use, and quantisation metadata the checkpoint's tensor
# dtypes already say (FP8 e4m3, 128x128 ue8m0 block scales).
HF_IGNORED = frozenset({
    "architectures", "auto_map", "model_type", "torch_dtype", "transformers_version", "use_cache",
    "initializer_range", "pad_token_id", "tie_word_embeddings", "attention_bias", "attention_dropout",
    "hidden_act", "num_key_value_heads", "max_position_embeddings", "intermediate_size",
    "kv_lora_rank", "qk_nope_head_dim", "v_head_dim", "first_k_dense_replace", "moe_layer_freq", "ep_size",
    "n_group", "topk_group", "topk_method", "norm_topk_prob", "quantization_config",
})
# Keys of `rope_scaling` ignored: the scaling type (dsv4 always applies YaRN to compressed layers) and the mscale
# factors (dsv4 applies no mscale, as the reference; see dsv4.model.rope_table).
ROPE_SCALING_IGNORED = frozenset({"type", "rope_type", "mscale", "mscale_all_dim"})


def _flash() -> ModelConfig:
    return ModelConfig()


def _pro() -> ModelConfig:
    return ModelConfig(
        dim=7168, moe_inter_dim=3072, n_layers=61, n_heads=128, n_routed_experts=384, route_scale=2.5,
        q_lora_rank=1536, o_groups=16, index_topk=1024,
        compress_ratios=(128, 128) + (4, 128) * 29 + (4, 0),
    )


def _tiny() -> ModelConfig:
    """Seconds on a CPU, yet every layer kind: a window-only layer, CSA (4) and HCA (128) interleaved, hash-routed
    MoE in the first layers, and the MTP block. A short window and top-k make window and indexer boundaries cheap
    to cross in tests."""
    return ModelConfig(
        vocab_size=260, dim=256, moe_inter_dim=128, n_layers=4, n_hash_layers=2, n_heads=4,
        n_routed_experts=8, n_activated_experts=2, route_scale=1.5, q_lora_rank=128, head_dim=128,
        rope_head_dim=64, o_groups=2, o_lora_rank=128, window_size=16, original_seq_len=256,
        index_n_heads=4, index_head_dim=128, index_topk=8, compress_ratios=(0, 4, 128, 4, 0),
        max_seq_len=512, max_batch_size=8, bos_token_id=256, eos_token_id=257,
    )


def _small() -> ModelConfig:
    return ModelConfig(
        vocab_size=260, dim=512, moe_inter_dim=256, n_layers=8, n_hash_layers=3, n_heads=8,
        n_routed_experts=16, n_activated_experts=4, route_scale=1.5, q_lora_rank=256, head_dim=256,
        rope_head_dim=64, o_groups=4, o_lora_rank=256, window_size=64, original_seq_len=1024,
        index_n_heads=8, index_head_dim=128, index_topk=32,
        compress_ratios=(0, 0) + (4, 128) * 3 + (0,),
        max_seq_len=2048, max_batch_size=8, bos_token_id=256, eos_token_id=257,
    )


def _default() -> ModelConfig:
    """The embedded default model (dsv4/assets/default, trained by tools/train_default.py on the Python standard
    library): every layer kind at a size that ships as package data (13 MB) and decodes on a laptop CPU. A window of
    64 bytes within 512-byte training contexts, so distant context must come through CSA (indexer top-32 of the
    4-token entries) and HCA (128-token entries)."""
    return ModelConfig(
        vocab_size=260, dim=256, moe_inter_dim=256, n_layers=6, n_hash_layers=2, n_heads=4,
        n_routed_experts=8, n_activated_experts=2, route_scale=1.5, q_lora_rank=128, head_dim=128,
        rope_head_dim=64, o_groups=2, o_lora_rank=128, window_size=64, original_seq_len=512,
        index_n_heads=4, index_head_dim=128, index_topk=32, compress_ratios=(0, 4, 128, 4, 128, 4, 0),
        max_seq_len=1024, max_batch_size=8, bos_token_id=256, eos_token_id=257,
    )


PRESETS = {"v4-flash": _flash, "v4-pro": _pro, "tiny": _tiny, "small": _small, "default": _default}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise DSV4Error(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
