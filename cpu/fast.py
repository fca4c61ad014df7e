"""The `cpu` backend's `fast` kernels: each contract in a few plain torch calls.

Why: the canonical composite spells out every fp32 operation of the contract (lane-order sums, polynomial exp,
fp64 block GEMMs), thousands of small torch calls per decode step; on a CPU a torch call costs microseconds whatever
its size, so a small model's step is all call overhead. These kernels compute the same contracts with BLAS GEMMs on
weights dequantised once (fp32, kept while the weight lives), torch's fused reductions and transcendentals, and a
dense softmax over each query's index list. Their sums are in BLAS's order, not the contract's: each declares `fast`
and is checked against the CPU reference within its contract's tolerance (tests/test_cpu_fast.py,
`dsv4 verify --backend cpu --level fast`). The ops whose contract has no tolerance keep the contract's arithmetic:
`fake_quant` and `encode_rows` here are bit for bit the canonical ones, `indexer_topk` scores its keys with a GEMM
whose dot products of FP4-grid values are exact in fp32 in any order whenever their block scales span less than the
fp32 mantissa, and `sample` is the canonical sampler with a greedy shortcut.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakTensorKeyDictionary

from dsv4 import formats
from dsv4.backends.canonical import ops as canonical
from dsv4.backends.canonical.primitives import lane_sum, topk_lower_index
from dsv4.backends.contracts import FP4_BLOCK, FP4_MAX, FP8_BLOCK, FP8_MAX
from dsv4.backends.levels import Level
from dsv4.backends.registry import Backend

if TYPE_CHECKING:
    from dsv4.cache import PagedRows

# fp32 copies of weights are kept (per weight tensor, while it lives and is unchanged) up to this many bytes in all;
# beyond it a weight is dequantised on every call (same values, slower).
WEIGHT_CACHE_BUDGET = 8 << 30
# mhc_pre's mappings (sigmoids, softmax, Sinkhorn) for at most this many tokens run on Python floats: a torch call
# costs more than a whole 4x4 normalisation in Python, and a decode step has one token per sequence.
SCALAR_MHC_ROWS = 4

# fp32 bit masks as int32 tensors (an operand tensor costs less per call than a Python number)
_F32_MANTISSA = torch.tensor(0x7FFFFF, dtype=torch.int32)
_F32_EXPONENT = torch.tensor(0x7F800000, dtype=torch.int32)
_weights: WeakTensorKeyDictionary = WeakTensorKeyDictionary()   # weight -> (its version, fp32 values)


def _version(t: torch.Tensor) -> int:
    """The tensor's version counter (inference tensors have none and cannot change outside inference mode)."""
    return 0 if t.is_inference() else t._version


def _held() -> int:
    return sum(values.nbytes for _, values in _weights.values())


def _fp32_weight(weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 values [..., N, K] of a bf16, FP8 (e4m3 + 128x128 scales) or packed FP4 (+ 1x32 scales) weight,
    cached while the weight is alive and unchanged."""
    base = weight._base
    if scale is None and base is not None and weight.is_contiguous() and base.is_contiguous() \
            and weight.data_ptr() == base.data_ptr() and weight.numel() == base.numel():
        return _fp32_weight(base).view(weight.shape)      # a reshaped weight (the grouped wo_a): cached as its base
    cached = _weights.get(weight)
    if cached is not None and cached[0] == _version(weight):
        return cached[1]
    if scale is None:
        if weight.dtype == torch.float32:
            return weight
        values = weight.float()
    elif weight.dtype == torch.float8_e4m3fn:
        *lead, n, k = weight.shape
        s = scale.float().repeat_interleave(FP8_BLOCK, -2)[..., :n, :].repeat_interleave(FP8_BLOCK, -1)[..., :k]
        values = weight.float() * s
    else:
        values = formats.unpack_fp4(weight) * scale.float().repeat_interleave(FP4_BLOCK, -1)
    if _held() - (cached[1].nbytes if cached is not None else 0) + values.nbytes <= WEIGHT_CACHE_BUDGET:
        _weights[weight] = (_version(weight), values)
    return values


def _pow2_ceil_(r: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2(r)) for positive normal fp32 r, in place: a nonzero mantissa carries into the exponent
    (formats.pow2_ceil)."""
    return r.view(torch.int32).add_(_F32_MANTISSA).bitwise_and_(_F32_EXPONENT).view(torch.float32)


def _block_scale(xb: torch.Tensor, floor: float, qmax: float) -> torch.Tensor:
    """The ue8m0 scale [..., nb, 1] of blocks xb [..., nb, block] (formats.block_scales)."""
    return _pow2_ceil_(xb.abs().amax(-1, keepdim=True).clamp_min_(floor).div_(qmax))


def _round_fp4(a: torch.Tensor) -> torch.Tensor:
    """Round fp32 values within +-6 to the e2m1 grid, nearest-even: the grid step is 0.5 below 2, 1 below 4, 2 up to
    6, and round-half-even of a/step picks the even code (formats.fp4_codes)."""
    step = a.abs().view(torch.int32).bitwise_and_(_F32_EXPONENT).view(torch.float32).clamp_(1.0, 4.0).mul_(0.5)
    return torch.round(a / step).mul_(step)


def _fake_quant_fp32(x: torch.Tensor, fmt: str, block: int, floor: float) -> torch.Tensor:
    """fp32 blocks [..., n/block, block] of x quantised to e4m3 / e2m1 with their scales and dequantised.

    No clamp to +-448 before the e4m3 cast (formats.to_e4m3 has one): s >= fl(amax/448), so |x/s| is at most one
    fp32 ulp above 448, which the cast rounds to 448 as the clamp would."""
    xb = x.float().unflatten(-1, (-1, block))
    if fmt == "fp8":
        s = _block_scale(xb, floor, FP8_MAX)
        return (xb / s).to(torch.float8_e4m3fn).float().mul_(s)
    if fmt == "fp4":
        s = _block_scale(xb, floor, FP4_MAX)
        return _round_fp4(xb / s).mul_(s)
    raise ValueError(f"quantisation format {fmt!r}: expected 'fp8' or 'fp4'")


# -- norms, rotations, formats --------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return F.rms_norm(x.float(), x.shape[-1:], weight, eps).to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """The last 2r dims as r complex numbers times e^(+-i angle)."""
    d, r = x.shape[-1], cos.shape[-1]
    out = x.to(torch.float32, copy=True)
    torch.view_as_complex(out[..., d - 2 * r:].unflatten(-1, (r, 2))).mul_(
        torch.complex(cos.float(), -sin.float() if inverse else sin.float()))
    return out.to(x.dtype)


_hadamards: dict[tuple[int, torch.device], torch.Tensor] = {}


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """x times the scaled Sylvester matrix (kept per size)."""
    n = x.shape[-1]
    h = _hadamards.get((n, x.device))
    if h is None:
        h = torch.ones(1, 1)
        while h.shape[0] < n:
            h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
        h = _hadamards[(n, x.device)] = (h * n ** -0.5).to(x.device)
    return (x.float() @ h).to(x.dtype)


def fake_quant(x: torch.Tensor, fmt: str, block: int) -> torch.Tensor:
    """Bit for bit formats.fake_quant, in fewer calls: the scales from the IEEE bits, e4m3 by torch's cast, e2m1 by
    rounding to the grid step."""
    floor = formats.FP8_AMAX_FLOOR if fmt == "fp8" else formats.FP4_AMAX_FLOOR
    return _fake_quant_fp32(x, fmt, block, floor).flatten(-2).to(x.dtype)


def encode_rows(x: torch.Tensor, fmt: str, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bit for bit the canonical encoding; FP8 in fewer calls (as fake_quant), FP4 the canonical codes."""
    if fmt != "fp8":
        return canonical.encode_rows(x, fmt, block)
    xb = x.float().unflatten(-1, (-1, block))
    s = _block_scale(xb, formats.FP8_AMAX_FLOOR, FP8_MAX)
    return (xb / s).to(torch.float8_e4m3fn).flatten(-2), s.squeeze(-1)


# -- GEMMs --------------------------------------------------------------------------------------------------------
def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    w = _fp32_weight(weight)
    if weight.dim() == 2:
        return F.linear(x.float(), w).to(x.dtype)
    return (x.float().unsqueeze(-2) @ w.transpose(-1, -2)).squeeze(-2).to(x.dtype)   # [..., G, 1, K] @ [G, K, N]


def _quantised_activations(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] rounded per token per 128 to e4m3 with its ue8m0 scales, as fp32 values."""
    return _fake_quant_fp32(x, "fp8", FP8_BLOCK, formats.FP8_AMAX_FLOOR).flatten(-2)


def quant_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return F.linear(_quantised_activations(x), _fp32_weight(weight, scale)).to(torch.bfloat16)


def grouped_quant_linear(x: torch.Tensor, counts: torch.Tensor, weight: torch.Tensor,
                         scale: torch.Tensor) -> torch.Tensor:
    """One GEMM per expert that has rows."""
    w, xq = _fp32_weight(weight, scale), _quantised_activations(x)
    parts, start = [], 0
    for e, count in enumerate(counts.tolist()):
        if count:
            parts.append(F.linear(xq[start:start + count], w[e]))
            start += count
    if not parts:       # none of these experts was hit (a rank of expert parallelism may hold only such experts)
        return x.new_zeros(0, w.shape[1], dtype=torch.bfloat16)
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).to(torch.bfloat16)


# -- attention ----------------------------------------------------------------------------------------------------
def compress_pool(kv: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    return (torch.softmax(score, dim=1) * kv).sum(1)


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, keys: PagedRows, block_table: torch.Tensor,
                 n_visible: torch.Tensor, k: int) -> torch.Tensor:
    """The canonical scores with the dot products as one batched GEMM, then the canonical selection."""
    b, s, heads, d = q.shape
    t = torch.arange(max(1, int(n_visible.max())) if n_visible.numel() else 1).expand(b, -1)
    values = keys.read(keys.entry_rows(block_table, t)).float()                       # [b, T, d]
    dots = (q.float().view(b, s * heads, d) @ values.transpose(1, 2)).view(b, s, heads, -1)
    scores = lane_sum(torch.relu(dots) * weights.float()[..., None], dim=-2)           # [b, s, T]
    return canonical.select_topk(scores, n_visible, k)


def sparse_attention(q: torch.Tensor, kv: PagedRows, fresh: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Every query's slots gathered at once, one softmax over them and the sink (whose column is dropped)."""
    b, s, heads, d = q.shape
    n = kv.rows
    stored = kv.read(idx.clamp(0, n - 1))                                              # [b, s, K, D]
    new = fresh[torch.arange(b)[:, None, None], (idx - n).clamp(0, fresh.shape[1] - 1)]
    rows = torch.where((idx >= n)[..., None], new, stored).float()
    logits = (q.float() @ rows.transpose(-1, -2)).mul_(scale)                         # [b, s, H, K]
    logits = logits.masked_fill_((idx < 0)[:, :, None, :], -math.inf)
    logits = torch.cat((logits, sink.float().view(1, 1, heads, 1).expand(b, s, heads, 1)), -1)
    p = torch.softmax(logits, -1)[..., :-1].to(torch.bfloat16).float()               # bf16, as the contract's
    return (p @ rows).to(torch.bfloat16)


def hca_attention(q: torch.Tensor, kv: PagedRows, fresh: torch.Tensor, window_idx: torch.Tensor,
                  block_table: torch.Tensor, n_comp: torch.Tensor, sink: torch.Tensor, scale: float) -> torch.Tensor:
    return sparse_attention(q, kv, fresh, canonical.hca_indices(kv, window_idx, block_table, n_comp), sink, scale)


# -- mHC ----------------------------------------------------------------------------------------------------------
def _hc_mixes(xf: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """(flat(x) @ fn.T) / rms(flat(x)) for xf [..., hc*d] fp32."""
    return F.linear(xf, fn) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm_eps)


def _hc_collapse(x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    return (pre.unsqueeze(-2) @ x.float()).squeeze(-2).to(torch.bfloat16)            # sum_j pre_j x_j


def _mappings(mixes: torch.Tensor, hc: int, hc_eps: float, iters: int) -> tuple[torch.Tensor, ...]:
    """mhc_pre's (pre, post, comb) from its scaled and shifted mixes [..., (2+hc)*hc], as torch ops."""
    pre = torch.sigmoid(mixes[..., :hc]) + hc_eps
    post = torch.sigmoid(mixes[..., hc:2 * hc]) * 2.0
    comb = torch.softmax(mixes[..., 2 * hc:].unflatten(-1, (hc, hc)), -1) + hc_eps
    comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + hc_eps)
        comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    return pre, post, comb


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v)) if v >= 0 else 1.0 - 1.0 / (1.0 + math.exp(v))


def _scalar_mappings(mixes: torch.Tensor, hc: int, hc_eps: float, iters: int) -> tuple[torch.Tensor, ...]:
    """_mappings on Python floats (float64), one token at a time."""
    rows = [range(i * hc, (i + 1) * hc) for i in range(hc)]
    cols = [range(j, hc * hc, hc) for j in range(hc)]

    def normalise(c: list[float], groups: list[range]) -> None:
        for group in groups:
            total = hc_eps
            for i in group:
                total += c[i]
            for i in group:
                c[i] /= total

    out = []
    for m in mixes.reshape(-1, (2 + hc) * hc).tolist():
        c = m[2 * hc:]
        for group in rows:                                                  # row softmax, + hc_eps
            top = max(c[i] for i in group)
            for i in group:
                c[i] = math.exp(c[i] - top)
            total = sum(c[i] for i in group)
            for i in group:
                c[i] = c[i] / total + hc_eps
        normalise(c, cols)
        for _ in range(iters - 1):
            normalise(c, rows)
            normalise(c, cols)
        out.append([_sigmoid(v) + hc_eps for v in m[:hc]] + [2.0 * _sigmoid(v) for v in m[hc:2 * hc]] + c)
    values = torch.tensor(out, dtype=torch.float32).view(mixes.shape)
    return values[..., :hc], values[..., hc:2 * hc], values[..., 2 * hc:].unflatten(-1, (hc, hc))


_per_mix_scales: WeakTensorKeyDictionary = WeakTensorKeyDictionary()   # scale -> (its version, [(2+hc)*hc])


def _per_mix(scale: torch.Tensor, hc: int) -> torch.Tensor:
    """mhc_pre's three scales [3] spread over the (2+hc)*hc mixes: pre, post, then the hc*hc of comb (kept per
    scale tensor while it is unchanged)."""
    cached = _per_mix_scales.get(scale)
    if cached is None or cached[0] != _version(scale):
        cached = _per_mix_scales[scale] = (_version(scale), torch.cat((scale[:2].repeat_interleave(hc),
                                                                      scale[2:].expand(hc * hc))))
    return cached[1]


def mhc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, norm_eps: float,
            hc_eps: float, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hc = x.shape[-2]
    mixes = _hc_mixes(x.flatten(-2).float(), fn, norm_eps) * _per_mix(scale, hc) + base
    few = mixes[..., 0].numel() <= SCALAR_MHC_ROWS
    pre, post, comb = (_scalar_mappings if few else _mappings)(mixes, hc, hc_eps, iters)
    return _hc_collapse(x, pre), post, comb


def mhc_post(f: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    out = torch.baddbmm(post.flatten(0, -2).unsqueeze(-1) * f.float().flatten(0, -2).unsqueeze(-2),
                        comb.flatten(0, -3).transpose(-1, -2), x.float().flatten(0, -3))
    return out.view(x.shape).to(torch.bfloat16)


def mhc_head(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, norm_eps: float,
             hc_eps: float) -> torch.Tensor:
    pre = torch.sigmoid(_hc_mixes(x.flatten(-2).float(), fn, norm_eps) * scale + base) + hc_eps
    return _hc_collapse(x, pre)


# -- MoE ----------------------------------------------------------------------------------------------------------
def moe_gate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, hash_experts: torch.Tensor | None,
             k: int, route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.sqrt(F.softplus(F.linear(x.float(), _fp32_weight(weight))))
    if hash_experts is not None:
        experts = hash_experts.long()
    else:
        experts = topk_lower_index(a if bias is None else a + bias, k)[1]
    chosen = a.gather(-1, experts)
    return chosen / chosen.sum(-1, keepdim=True) * route_scale, experts


def swiglu(g: torch.Tensor, u: torch.Tensor, limit: float, route_weight: torch.Tensor | None) -> torch.Tensor:
    gf, uf = g.float(), u.float()
    if limit > 0:
        gf, uf = gf.clamp_max(limit), uf.clamp(-limit, limit)
    h = F.silu(gf).mul_(uf)
    if route_weight is not None:
        h = h.mul_(route_weight.float()[:, None])
    return h.to(torch.bfloat16)


def moe_combine(expert_out: torch.Tensor, order: torch.Tensor, k: int, shared: torch.Tensor) -> torch.Tensor:
    y = shared.to(torch.float32, copy=True).index_add_(0, order // k, expert_out.float())
    return y.to(torch.bfloat16)


# -- sampling -----------------------------------------------------------------------------------------------------
def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, seed: int,
           request: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Greedy rows only: torch's argmax (the first maximum, as the contract's lowest id); else the canonical sampler."""
    if not bool((temperature > 0).any()):
        return logits.argmax(-1)
    return canonical.sample(logits, temperature, top_p, seed, request, position)


KERNELS: dict[str, Callable] = {
    "rms_norm": rms_norm, "rope": rope, "hadamard": hadamard, "fake_quant": fake_quant, "encode_rows": encode_rows,
    "linear": linear, "quant_linear": quant_linear, "grouped_quant_linear": grouped_quant_linear,
    "compress_pool": compress_pool,
    "indexer_topk": indexer_topk, "sparse_attention": sparse_attention, "hca_attention": hca_attention,
    "mhc_pre": mhc_pre, "mhc_post": mhc_post, "mhc_head": mhc_head, "moe_gate": moe_gate, "swiglu": swiglu,
    "moe_combine": moe_combine, "sample": sample,
}


def add_fast_kernels(backend: Backend) -> None:
    """Register every kernel here at `fast`; call before add_canonical_kernels, which serves the stricter levels."""
    for op, fn in KERNELS.items():
        backend.add(op, fn, Level.FAST, "torch_fast")
