"""Op contracts: the one place that says what every registry op computes.

The model core calls only these ops for arithmetic that involves a reduction, a transcendental function or a
quantised format; everything else it does (indexing, concatenation, casts, single elementwise IEEE operations) is the
same on every device. A backend implements an op by matching its contract; the `exact` level additionally fixes the
order of every floating-point operation, written in `canonical order` below and implemented once, device-agnostically,
in `dsv4.backends.canonical`.

Shared constants of the exact contract (numbers that are part of the contract, not of a device):
- REDUCTION_LANES: every float sum over n values uses L lanes; lane i starts at +0.0 and adds x[i], x[i+L], x[i+2L],
  ... in increasing index order (missing elements count as +0.0); then a pairwise tree halves the lanes
  (lane i += lane i + L/2, for L/2, L/4, ... 1). Products are formed (rounded to fp32) before they are summed.
- ATTENTION_CHUNK: online softmax visits keys in chunks of this many index-list slots, in index-list order.
- Transcendentals (exp, log, sigmoid, softplus, silu) are the polynomial forms in `canonical.primitives`; sqrt and
  division are IEEE correctly rounded. Multiplications and additions are never fused (no FMA).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    from torch import Tensor

    from dsv4.cache import PagedRows
    from dsv4.parallel import ExpertGroup

REDUCTION_LANES = 16
ATTENTION_CHUNK = 64
FP8_BLOCK = 128          # activation and weight quantisation block for FP8 GEMMs (weights: 128x128)
FP4_BLOCK = 32           # FP4 weight scale block along K (1x32), also the FP4 fake-quant block
KV_FP8_BLOCK = 64        # fake-FP8 block for the non-RoPE part of cached KV
FP8_MAX = 448.0
FP4_MAX = 6.0


@dataclass(frozen=True)
class OpContract:
    name: str
    signature: str
    computes: str
    atol: float   # fast-level tolerance against the CPU reference: |a - b| <= atol + rtol * |b|
    rtol: float
    exact_only_output: bool = False  # outputs are integers/indices: any level must match the reference exactly


BF16_TOLERANCE = dict(atol=2e-2, rtol=2e-2)   # ops whose output is bf16
FP32_TOLERANCE = dict(atol=1e-5, rtol=1e-4)   # ops whose output is fp32

CONTRACTS: dict[str, OpContract] = {c.name: c for c in [
    OpContract(
        "rms_norm", "rms_norm(x[..., n] bf16|fp32, weight[n] fp32 | None, eps) -> [..., n] x.dtype",
        "y = weight * (x * 1/sqrt(mean(x^2) + eps)), fp32 math, one cast at the end. Canonical order: "
        "s = lanesum(xf*xf); inv = 1/sqrt(s/n + eps); y = xf*inv; y = weight*y.", **BF16_TOLERANCE),
    OpContract(
        "rope", "rope(x[..., D], cos[..., r], sin[..., r], inverse: bool) -> [..., D] x.dtype",
        "Rotate interleaved pairs (x[2i], x[2i+1]) of the last 2r dims by the host-computed angle table (GPT-J "
        "style); the first D-2r dims pass through. cos/sin broadcast against x[..., :1]. inverse rotates by -angle. "
        "Canonical: a' = a*c - b*s, b' = a*s + b*c (inverse: a*c + b*s, b*c - a*s), fp32, one cast.", **BF16_TOLERANCE),
    OpContract(
        "hadamard", "hadamard(x[..., n] bf16) -> [..., n] bf16",
        "Walsh-Hadamard transform (Sylvester order) scaled by n^-1/2. Canonical: fp32 butterflies (a+b, a-b) for "
        "strides 1, 2, 4, ... n/2, then one multiply by fp32(n^-1/2), one cast.", **BF16_TOLERANCE),
    OpContract(
        "fake_quant", "fake_quant(x[..., n] bf16, fmt: 'fp8'|'fp4', block) -> [..., n] bf16",
        "Quantise each block of `block` values to e4m3 (fp8, scale 2^ceil(log2(max(amax,1e-4)/448))) or e2m1 (fp4, "
        "scale 2^ceil(log2(max(amax,6*2^-126)/6))) with round-to-nearest-even, then dequantise. Exact everywhere "
        "(power-of-two scales).", atol=0.0, rtol=0.0),
    OpContract(
        "encode_rows", "encode_rows(x[n, q] bf16, fmt: 'fp8'|'fp4', block) -> (codes [n, q] float8_e4m3fn | "
        "[n, q/2] uint8, scale [n, q/block] fp32)",
        "The cache's storage form of values that fake_quant already rounded: each block's scale computed from its "
        "amax exactly as fake_quant computes it, and its e4m3 codes (fp8) or e2m1 codes packed two per byte, "
        "element 2i in the low nibble (fp4). codes * scale gives x back exactly. Exact everywhere.",
        atol=0.0, rtol=0.0, exact_only_output=True),
    OpContract(
        "linear", "linear(x[..., K] bf16|fp32, weight[N, K] or [G, N, K] bf16|fp32) -> [..., N] x.dtype",
        "y = x @ weight.T (grouped: y[..., g, :] = x[..., g, :] @ weight[g].T); products in fp32, lanesum over K, "
        "one cast to x.dtype.", **BF16_TOLERANCE),
    OpContract(
        "quant_linear",
        "quant_linear(x[..., K] bf16, weight fp8-e4m3[N, K] | int8 packed-fp4[N, K/2], scale fp32 [N/128, K/128] "
        "| [N, K/32]) -> [..., N] bf16",
        "Activations are quantised per token per 128-block to e4m3 with ue8m0 scales; then for each K block of the "
        "finest scale granularity (128 for fp8 weights, 32 for fp4 weights) the exact dot product is formed, "
        "rounded once to fp32, multiplied by (activation scale * weight scale) and accumulated over K blocks in "
        "increasing order in fp32; one cast to bf16.", **BF16_TOLERANCE),
    OpContract(
        "grouped_quant_linear",
        "grouped_quant_linear(x[T, K] bf16 rows sorted by expert, counts[E] int64, weight[E, ...], scale[E, ...]) "
        "-> [T, N] bf16",
        "Row block e (counts[e] rows) goes through quant_linear with expert e's weight. Each row's result is "
        "quant_linear of that row alone.", **BF16_TOLERANCE),
    OpContract(
        "compress_pool", "compress_pool(kv[n, R, c] fp32, score[n, R, c] fp32) -> [n, c] fp32",
        "Per channel softmax of score over the R rows (max-subtracted; -inf rows weigh 0), then the weighted sum of "
        "kv. Canonical: m = max; e = exp(score - m); den = lanesum_R(e); num = lanesum_R(e * kv); num / den.", **FP32_TOLERANCE),
    OpContract(
        "indexer_topk",
        "indexer_topk(q[b, s, H, d] bf16, weights[b, s, H] fp32, keys: PagedRows (fp4), block_table[b, nb] int32, "
        "n_visible[b, s] int64, k) -> [b, s, k] int64",
        "Key t of sequence i is the bf16 vector stored at keys.entry_rows(block_table, t) (dsv4.cache). Score "
        "S[t] = sum_h relu(<q_h, key_t>) * weights_h for t < n_visible; select the min(k, n_visible) best (ties: "
        "lower t first); return them in ascending t, padded with -1. Canonical: dots lanesum over d, relu, times "
        "weight, lanesum over H.", atol=0.0, rtol=0.0, exact_only_output=True),
    OpContract(
        "sparse_attention",
        "sparse_attention(q[b, s, H, D] bf16, kv: PagedRows (fp8 + bf16 rope), fresh[b, f, D] bf16, idx[b, s, K] "
        "int64, sink[H] fp32, scale) -> [b, s, H, D] bf16",
        "Single shared K=V head. Slot value r < R = kv.rows is the stored row r decoded to bf16; R + j is "
        "fresh[i, j] (this step's rows of sequence i); -1 is empty. For each query and head over the valid slots, "
        "in idx order: s_j = scale*<q, kv_j>; o = sum_j exp(s_j - M) kv_j / (sum_j exp(s_j - M) + exp(sink - M)), "
        "M = max_j s_j. Canonical: dots lanesum over D; online softmax over chunks of ATTENTION_CHUNK slots "
        "(running max, rescale by exp(m-m'), chunk sums by lanesum); probabilities are rounded to bf16 for the value "
        "sum (as the reference kernel) but not for the denominator; one division and cast at the end.", **BF16_TOLERANCE),
    OpContract(
        "hca_attention",
        "hca_attention(q[b, s, H, D] bf16, kv: PagedRows, fresh[b, f, D] bf16, window_idx[b, s, W] int64, "
        "block_table[b, nb] int32, n_comp[b, s] int64, sink[H] fp32, scale) -> [b, s, H, D] bf16",
        "sparse_attention over the index list window_idx followed by kv.entry_rows(block_table, j) for j = 0 .. "
        "n_comp-1 (every visible compressed entry, in order). Same canonical order as sparse_attention over that "
        "list.", **BF16_TOLERANCE),
    OpContract(
        "mhc_pre",
        "mhc_pre(x[b, s, hc, d] bf16, fn[(2+hc)*hc, hc*d] fp32, scale[3] fp32, base[(2+hc)*hc] fp32, norm_eps, "
        "hc_eps, iters) -> (y[b, s, d] bf16, post[b, s, hc] fp32, comb[b, s, hc, hc] fp32)",
        "mHC pre-mapping: m = (flat(x) @ fn.T) / rms(flat(x)); pre = sigmoid(m[:hc]*scale0 + base) + hc_eps; "
        "post = 2*sigmoid(m[hc:2hc]*scale1 + base); comb = softmax_rows(m[2hc:]*scale2 + base) + hc_eps, then one "
        "column normalisation, then (iters-1) rounds of (row, column), each dividing by (sum + hc_eps); "
        "y = sum_j pre_j x_j. Tolerance: bf16's, since y is bf16.", **BF16_TOLERANCE),
    OpContract(
        "mhc_post",
        "mhc_post(f[b, s, d] bf16, x[b, s, hc, d] bf16, post[b, s, hc] fp32, comb[b, s, hc, hc] fp32) "
        "-> [b, s, hc, d] bf16",
        "out_k = post_k * f + sum_j comb[j, k] * x_j (the transposed comb), fp32; canonical: start from post_k*f and "
        "add the j terms in increasing j; one cast.", **BF16_TOLERANCE),
    OpContract(
        "mhc_head",
        "mhc_head(x[b, s, hc, d] bf16, fn[hc, hc*d] fp32, scale[1] fp32, base[hc] fp32, norm_eps, hc_eps) "
        "-> [b, s, d] bf16",
        "Collapse the streams before the final norm: pre = sigmoid(m*scale + base) + hc_eps (no Sinkhorn); "
        "y = sum_j pre_j x_j.", **BF16_TOLERANCE),
    OpContract(
        "moe_gate",
        "moe_gate(x[T, d] bf16, weight[E, d] fp32, bias[E] fp32 | None, hash_experts[T, k] int64 | None, k, "
        "route_scale) -> (weights[T, k] fp32, experts[T, k] int64)",
        "a = sqrt(softplus(x @ weight.T)); experts = hash_experts if given, else the k best of a + bias (ties: "
        "lower expert id), in descending order; weights = a[experts] / sum(a[experts]) * route_scale.", **FP32_TOLERANCE),
    OpContract(
        "moe_dispatch",
        "moe_dispatch(experts[T, k] int64, n_experts) -> (order[T*k] int64, counts[E] int64)",
        "Stable sort of the flat (token, slot) pairs by expert id: order lists flat indices t*k + slot grouped by "
        "expert, counts[e] rows each.", atol=0.0, rtol=0.0, exact_only_output=True),
    OpContract(
        "swiglu",
        "swiglu(g[n, f] bf16, u[n, f] bf16, limit, route_weight[n] fp32 | None) -> [n, f] bf16",
        "Clamped SwiGLU: u = clamp(u, -limit, limit), g = min(g, limit) (when limit > 0); h = silu(g) * u * "
        "route_weight in fp32; one cast.", **BF16_TOLERANCE),
    OpContract(
        "moe_combine",
        "moe_combine(expert_out[T*k, d] bf16 in dispatch order, order[T*k] int64, k, shared[T, d] bf16) -> [T, d] bf16",
        "y_t = sum over slots 0..k-1 (in slot order, fp32) of the expert output of (t, slot), then + shared_t; "
        "one cast. The order never depends on where or when an expert ran.", **BF16_TOLERANCE),
    OpContract(
        "ep_combine",
        "ep_combine(local_out[n, d] bf16, order[T*k] int64, counts[E] int64, k, shared[T, d] bf16, group) "
        "-> [T, d] bf16",
        "moe_combine across expert-parallel processes. `group` (dsv4.parallel.ExpertGroup, or None for one process) "
        "splits the E experts into equal contiguous ranges, one per rank; local_out holds this rank's rows of the "
        "dispatch order (those of its experts). Every rank returns moe_combine(expert_out, order, k, shared), "
        "expert_out being every rank's local_out concatenated in rank order. Canonical: the collective only moves "
        "rows (an all-gather), and moe_combine runs locally, so the bits do not depend on the degree or on the "
        "collective's algorithm.", **BF16_TOLERANCE),
    OpContract(
        "sample",
        "sample(logits[b, V] fp32, temperature[b] fp32, top_p[b] fp32, seed: int, request[b] int64, "
        "position[b] int64) -> [b] int64",
        "temperature 0: argmax (ties: lower id). Otherwise p = softmax(logits / T) restricted to the smallest set "
        "of most likely tokens whose mass reaches top_p, and the token maximising p_i / E_i with E_i = -log(U_i), "
        "U from a counter-based generator keyed by (seed, request, position, i): the same draw on every device.",
        atol=0.0, rtol=0.0, exact_only_output=True),
]}


def contract(name: str) -> OpContract:
    return CONTRACTS[name]


class Ops(Protocol):
    """The typed face of an op table (`dsv4.backends.registry.OpTable` implements it): one method per contract in
    CONTRACTS, with the contract's parameters in its order. Shapes, dtypes, what the op computes and its canonical
    order are the contract's text above; the canonical composite of each op is `dsv4.backends.canonical.ops.<name>`.
    A kernel registered for an op must take exactly these parameters (`signature_mismatch`, checked whenever a
    table is resolved)."""

    def rms_norm(self, x: Tensor, weight: Tensor | None, eps: float) -> Tensor: ...

    def rope(self, x: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> Tensor: ...

    def hadamard(self, x: Tensor) -> Tensor: ...

    def fake_quant(self, x: Tensor, fmt: str, block: int) -> Tensor: ...

    def encode_rows(self, x: Tensor, fmt: str, block: int) -> tuple[Tensor, Tensor]: ...

    def linear(self, x: Tensor, weight: Tensor) -> Tensor: ...

    def quant_linear(self, x: Tensor, weight: Tensor, scale: Tensor) -> Tensor: ...

    def grouped_quant_linear(self, x: Tensor, counts: Tensor, weight: Tensor, scale: Tensor) -> Tensor: ...

    def compress_pool(self, kv: Tensor, score: Tensor) -> Tensor: ...

    def indexer_topk(self, q: Tensor, weights: Tensor, keys: PagedRows, block_table: Tensor, n_visible: Tensor,
                     k: int) -> Tensor: ...

    def sparse_attention(self, q: Tensor, kv: PagedRows, fresh: Tensor, idx: Tensor, sink: Tensor,
                         scale: float) -> Tensor: ...

    def hca_attention(self, q: Tensor, kv: PagedRows, fresh: Tensor, window_idx: Tensor, block_table: Tensor,
                      n_comp: Tensor, sink: Tensor, scale: float) -> Tensor: ...

    def mhc_pre(self, x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, norm_eps: float, hc_eps: float,
                iters: int) -> tuple[Tensor, Tensor, Tensor]: ...

    def mhc_post(self, f: Tensor, x: Tensor, post: Tensor, comb: Tensor) -> Tensor: ...

    def mhc_head(self, x: Tensor, fn: Tensor, scale: Tensor, base: Tensor, norm_eps: float,
                 hc_eps: float) -> Tensor: ...

    def moe_gate(self, x: Tensor, weight: Tensor, bias: Tensor | None, hash_experts: Tensor | None, k: int,
                 route_scale: float) -> tuple[Tensor, Tensor]: ...

    def moe_dispatch(self, experts: Tensor, n_experts: int) -> tuple[Tensor, Tensor]: ...

    def swiglu(self, g: Tensor, u: Tensor, limit: float, route_weight: Tensor | None) -> Tensor: ...

    def moe_combine(self, expert_out: Tensor, order: Tensor, k: int, shared: Tensor) -> Tensor: ...

    def ep_combine(self, local_out: Tensor, order: Tensor, counts: Tensor, k: int, shared: Tensor,
                   group: ExpertGroup | None) -> Tensor: ...

    def sample(self, logits: Tensor, temperature: Tensor, top_p: Tensor, seed: int, request: Tensor,
               position: Tensor) -> Tensor: ...


def parameters(op: str) -> list[str]:
    """The contract's parameter names of `op`, in call order (from its method on `Ops`)."""
    return list(inspect.signature(getattr(Ops, op)).parameters)[1:]


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def signature_mismatch(op: str, fn: Callable) -> str | None:
    """Why `fn` cannot serve as a kernel of `op`, or None when it takes the contract's parameters.

    The model calls a kernel with the contract's arguments in order, so its leading positional parameters must be
    the contract's, by name; further parameters need defaults; `*args` may take the remaining ones. A callable whose
    signature Python cannot see (a builtin) is not checked."""
    want = parameters(op)
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p for p in params if p.kind in _POSITIONAL]
    names = [p.name for p in positional]
    takes_rest = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)
    required_extra = [p.name for p in positional[len(want):] if p.default is inspect.Parameter.empty]
    required_extra += [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY
                       and p.default is inspect.Parameter.empty]
    if names[:len(want)] == (want if not takes_rest else want[:len(names)]) and not required_extra:
        return None
    stars = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    shown = ", ".join(stars.get(p.kind, "") + p.name for p in params)
    return f"takes ({shown}) but the contract is {op}({', '.join(want)})"
