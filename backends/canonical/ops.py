"""Canonical ops: the exact-level implementation of every contract in `dsv4.backends.contracts`.

"Canonical" means each function performs exactly the sequence of IEEE-754 fp32 operations that its contract's
`canonical order` states, built only from the device-agnostic primitives in `canonical.primitives` (lane-order
sums, polynomial exp/log, exact block GEMMs, counter-based random numbers) and the exact codecs in `dsv4.formats`.
The result is therefore the same bits on every torch device. A new backend can register these functions on any
torch device (CPU, CUDA, NPU, a vendor's) and has a correct `exact` path at once; faster kernels then replace them
one op at a time, each checked bit for bit against these.

Memory stays bounded for large inputs: the loops slice rows, columns or queries, which never changes a result
because every output element has its own accumulation.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from dsv4 import formats
from dsv4.backends.canonical.primitives import (
    BUDGET,
    block_major,
    block_sums,
    counter_uniform,
    exp,
    float_matmul,
    lane_sum,
    log,
    rsqrt,
    sigmoid,
    silu,
    softplus,
    sqrt,
    topk_lower_index,
)
from dsv4.backends.contracts import ATTENTION_CHUNK, FP4_BLOCK, FP8_BLOCK

if TYPE_CHECKING:
    from dsv4.cache import PagedRows
    from dsv4.parallel import ExpertGroup


def _count(n: int, like: torch.Tensor) -> torch.Tensor:
    """n as a 0-dim fp32 tensor on `like`'s device: a divisor that no device turns into a reciprocal multiply
    (a fill, not a copy from the host, so a CUDA graph can capture it)."""
    return torch.full((), float(n), dtype=torch.float32, device=like.device)


# -- norms, rotations, formats --------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """weight * (x / rms(x)): s = lanesum(x*x); inv = 1/sqrt(s/n + eps); y = x*inv; y = weight*y."""
    xf = x.float()
    s = lane_sum(xf * xf)
    inv = rsqrt(s / _count(x.shape[-1], s) + eps)
    y = xf * inv[..., None]
    if weight is not None:
        y = weight.float() * y
    return y.to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Rotate the interleaved pairs of the last 2r dims: a' = a*c - b*s, b' = a*s + b*c (inverse: by -angle)."""
    d, r = x.shape[-1], cos.shape[-1]
    xf = x.float()
    a, b = xf[..., d - 2 * r::2], xf[..., d - 2 * r + 1::2]
    c, s = cos.float(), sin.float()
    if inverse:
        a2, b2 = a * c + b * s, b * c - a * s
    else:
        a2, b2 = a * c - b * s, a * s + b * c
    rotated = torch.stack((a2, b2), dim=-1).flatten(-2)
    return torch.cat((xf[..., :d - 2 * r], rotated), dim=-1).to(x.dtype)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Sylvester-order Walsh-Hadamard transform times n^-1/2: butterflies (a+b, a-b) for strides 1, 2, ... n/2."""
    n = x.shape[-1]
    assert n & (n - 1) == 0, f"hadamard needs a power-of-two size, got {n}"
    y = x.float().reshape(-1, n)
    stride = 1
    while stride < n:
        v = y.view(-1, n // (2 * stride), 2, stride)
        a, b = v[:, :, 0], v[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2).view(-1, n)
        stride *= 2
    return (y * n ** -0.5).view(x.shape).to(x.dtype)


def fake_quant(x: torch.Tensor, fmt: str, block: int) -> torch.Tensor:
    """Quantise each block to e4m3/e2m1 with a power-of-two scale and dequantise: exact on every device."""
    return formats.fake_quant(x, fmt, block)


def encode_rows(x: torch.Tensor, fmt: str, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The storage form of rounded values: block codes (FP4 packed two per byte) and their power-of-two scales."""
    codes, scale = formats.quantize_blocks(x, fmt, block)
    return (formats.pack_fp4(codes).view(torch.uint8) if fmt == "fp4" else codes), scale


# -- GEMMs --------------------------------------------------------------------------------------------------------
def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T with fp32 products summed in lane order over K; grouped: y[..., g, :] = x[..., g, :] @ w[g].T."""
    if weight.dim() == 2:
        return float_matmul(x, weight).to(x.dtype)
    groups = [float_matmul(x[..., g, :], weight[g]) for g in range(weight.shape[0])]
    return torch.stack(groups, dim=-2).to(x.dtype)


def quant_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Block-scaled FP8 (e4m3 [N, K], scales [N/128, K/128]) or FP4 (packed int8 [N, K/2], scales [N, K/32]) GEMM.

    Activations: e4m3 per token per 128. For each K block of the weight's scale granularity: the exact block dot
    product, rounded once to fp32, times the activation scale, times the weight scale; blocks accumulate in
    increasing order starting from block 0's term; one cast to bf16.
    """
    return _quant_matmul(x, _weight_values(weight), weight.dtype, scale)


def _quant_matmul(x: torch.Tensor, w: torch.Tensor, fmt: torch.dtype, scale: torch.Tensor) -> torch.Tensor:
    """quant_linear on decoded, block-major weight values w [K/block, block, N] (fp64); `fmt`: the stored dtype."""
    *lead, k = x.shape
    xq, x_scale = formats.quantize_act_fp8(x.reshape(-1, k), FP8_BLOCK)
    xq = xq.double()
    n = w.shape[-1]
    if fmt == torch.float8_e4m3fn:
        block = FP8_BLOCK
        w_scale = scale.float().repeat_interleave(FP8_BLOCK, dim=0)[:n]             # [N, K/128]
    else:
        block = FP4_BLOCK
        w_scale = scale.float()                                                       # [N, K/32]
        x_scale = x_scale.repeat_interleave(FP8_BLOCK // FP4_BLOCK, dim=-1)          # [M, K/32]
    m, nb = xq.shape[0], k // block
    cols = min(n, max(1, BUDGET // nb))
    rows = max(1, BUDGET // (nb * cols))
    y = torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
    for r0 in range(0, m, rows):
        for c0 in range(0, n, cols):
            sums = block_sums(xq[r0:r0 + rows], w[..., c0:c0 + cols])                   # [rows, nb, cols]
            y[r0:r0 + rows, c0:c0 + cols] = scale_and_accumulate(sums, x_scale[r0:r0 + rows],
                                                                  w_scale[c0:c0 + cols]).to(torch.bfloat16)
    return y.reshape(*lead, n)


# Decoded weights (fp64 values of e4m3/e2m1 codes) are kept per weight tensor while it lives, up to this many bytes in
# all: decoding costs more than the GEMM itself at decode batch sizes. The values are the same either way.
DECODED_WEIGHTS_BUDGET = 1 << 30
_decoded: WeakTensorKeyDictionary = WeakTensorKeyDictionary()   # weight -> (its version, values); dies with it


def _weight_values(weight: torch.Tensor) -> torch.Tensor:
    """Block-major fp64 values [..., K/block, block, N] of a stored FP8 (e4m3) or packed FP4 (int8) weight, cached
    while the weight is alive and unchanged."""
    cached = _decoded.get(weight)
    if cached is not None and cached[0] == weight._version:
        return cached[1]
    if weight.dtype == torch.float8_e4m3fn:
        values = block_major(weight, FP8_BLOCK)
    elif weight.dtype == torch.int8:
        values = block_major(formats.unpack_fp4(weight), FP4_BLOCK)
    else:
        raise ValueError(f"quant_linear: weight dtype {weight.dtype} is neither float8_e4m3fn nor packed-fp4 int8")
    held = sum(v.nbytes for _, v in _decoded.values()) - (cached[1].nbytes if cached is not None else 0)
    if held + values.nbytes <= DECODED_WEIGHTS_BUDGET:
        _decoded[weight] = (weight._version, values)
    elif cached is not None:
        del _decoded[weight]
    return values


def scale_and_accumulate(sums: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """The quantised GEMM's canonical tail: exact block sums [M, nb, N] (already rounded to fp32) times the activation
    scale [M, nb], times the weight scale [N, nb], accumulated over blocks in increasing order from block 0's term."""
    terms = (sums * x_scale[:, :, None]) * w_scale.T
    acc = terms[:, 0]
    for kb in range(1, terms.shape[1]):
        acc = acc + terms[:, kb]
    return acc


def grouped_quant_linear(x: torch.Tensor, counts: torch.Tensor, weight: torch.Tensor,
                         scale: torch.Tensor) -> torch.Tensor:
    """Rows sorted by expert: the counts[e] rows of block e go through quant_linear with expert e's weight."""
    y = torch.empty(x.shape[0], weight.shape[1], dtype=torch.bfloat16, device=x.device)
    start = 0
    values = _weight_values(weight)                                         # [E, K/block, block, N], decoded once
    for e, count in enumerate(counts.tolist()):
        if count:
            y[start:start + count] = _quant_matmul(x[start:start + count], values[e], weight.dtype, scale[e])
        start += count
    return y


# -- attention ----------------------------------------------------------------------------------------------------
def compress_pool(kv: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Per-channel softmax over the R rows, then the weighted sum: m = max; e = exp(score - m);
    den = lanesum_R(e); num = lanesum_R(e * kv); num / den. Rows with score -inf weigh 0."""
    e = exp(score - score.amax(dim=1, keepdim=True))
    return lane_sum(e * kv.float(), dim=1) / lane_sum(e, dim=1)


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, keys: PagedRows, block_table: torch.Tensor,
                 n_visible: torch.Tensor, k: int) -> torch.Tensor:
    """The min(k, n_visible) key slots t of best S[t] = sum_h relu(<q_h, key_t>) * w_h (ties: lower t), in
    ascending t, padded with -1 to width k; key t of sequence i is stored at keys.entry_rows(block_table, t).
    Dots lanesum over d, relu, times weight, lanesum over H. The keys read are sized by the largest n_visible (a
    host read: this composite is not graph-captured)."""
    b = q.shape[0]
    t = torch.arange(max(1, int(n_visible.max())) if n_visible.numel() else 1, device=q.device).expand(b, -1)
    values = keys.read(keys.entry_rows(block_table, t))                           # [b, T, d] bf16
    dots = torch.stack([float_matmul(q[i].float(), values[i]) for i in range(b)])  # [b, s, H, T]
    scores = lane_sum(torch.relu(dots) * weights.float()[..., None], dim=-2)       # [b, s, T]
    return select_topk(scores, n_visible, k)


def select_topk(scores: torch.Tensor, n_visible: torch.Tensor, k: int) -> torch.Tensor:
    """indexer_topk's selection from its scores [b, s, T]: the min(k, n_visible) best visible slots (ties: lower t),
    in ascending t, padded with -1 to width k. Integer work only: any device gives the same indices."""
    b, s, t = scores.shape
    slots = torch.arange(t, device=scores.device)
    visible = slots < n_visible[..., None]
    _, best = topk_lower_index(torch.where(visible, scores, -math.inf), min(k, t))
    # Invisible slots score -inf and have the highest indices, so they sort after every visible one.
    rank = torch.arange(best.shape[-1], device=scores.device)
    chosen = torch.where(rank < n_visible[..., None], best, t)
    chosen = torch.sort(chosen, dim=-1).values
    out = torch.full((b, s, k), -1, dtype=torch.int64, device=scores.device)
    out[..., :chosen.shape[-1]] = torch.where(chosen < t, chosen, -1)
    return out


RowReader = Callable[[torch.Tensor], torch.Tensor]   # index-list slots [S, C] -> fp32 rows [S, C, D]


def rows_reader(kv: PagedRows, fresh: torch.Tensor) -> RowReader:
    """One sequence's keys as attention indexes them: stored rows 0 .. R-1, then its fresh rows R + j."""
    n = kv.rows

    def read(slots: torch.Tensor) -> torch.Tensor:
        stored = kv.read(slots.clamp(0, n - 1))
        new = fresh[(slots - n).clamp(0, fresh.shape[0] - 1)]
        return torch.where((slots >= n)[..., None], new, stored).float()
    return read


def _attend(q: torch.Tensor, read: RowReader, idx: torch.Tensor, sink: torch.Tensor, scale: float) -> torch.Tensor:
    """Chunked online softmax with sink for queries q [S, H, D] (fp32) over the rows idx [S, K] that `read` gives."""
    n_q, heads, d = q.shape
    m = torch.full((n_q, heads), -math.inf, device=q.device)
    l = torch.zeros(n_q, heads, device=q.device)
    acc = torch.zeros(n_q, heads, d, device=q.device)
    for c0 in range(0, idx.shape[-1], ATTENTION_CHUNK):
        slots = idx[:, c0:c0 + ATTENTION_CHUNK]                                        # [S, C]
        valid = slots >= 0
        v = read(slots)                                                                # [S, C, D]
        s = lane_sum(q[:, :, None, :] * v[:, None, :, :]) * scale                      # [S, H, C]
        s = torch.where(valid[:, None, :], s, -math.inf)
        has_valid = valid.any(dim=-1)[:, None]                                         # [S, 1]
        m_new = torch.where(has_valid, torch.maximum(m, s.amax(dim=-1)), 0.0)          # 0: chunk is skipped
        corr = exp(m - m_new)
        p = exp(s - m_new[..., None])
        l_new = l * corr + lane_sum(p)
        pv = lane_sum(p.to(torch.bfloat16).float()[..., None] * v[:, None, :, :], dim=-2)
        acc_new = acc * corr[..., None] + pv
        m = torch.where(has_valid, m_new, m)
        l = torch.where(has_valid, l_new, l)
        acc = torch.where(has_valid[..., None], acc_new, acc)
    return (acc / (l + exp(sink - m))[..., None]).to(torch.bfloat16)


def sparse_attention(q: torch.Tensor, kv: PagedRows, fresh: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Single shared K=V head over the rows idx (stored row, or R + j for fresh row j; -1: empty slot), online
    softmax in chunks of ATTENTION_CHUNK slots, sink in the denominator only, probabilities rounded to bf16 for the
    value sum; bf16 output."""
    b, s, heads, d = q.shape
    per_step = max(1, BUDGET // (heads * ATTENTION_CHUNK * d))
    out = torch.empty(b, s, heads, d, dtype=torch.bfloat16, device=q.device)
    sinkf = sink.float()
    for i in range(b):
        read = rows_reader(kv, fresh[i])
        for q0 in range(0, s, per_step):
            sl = slice(q0, q0 + per_step)
            out[i, sl] = _attend(q[i, sl].float(), read, idx[i, sl], sinkf, scale)
    return out


def hca_attention(q: torch.Tensor, kv: PagedRows, fresh: torch.Tensor, window_idx: torch.Tensor,
                  block_table: torch.Tensor, n_comp: torch.Tensor, sink: torch.Tensor, scale: float) -> torch.Tensor:
    """sparse_attention over window_idx followed by the rows of compressed entries 0 .. n_comp-1."""
    return sparse_attention(q, kv, fresh, hca_indices(kv, window_idx, block_table, n_comp), sink, scale)


def hca_indices(kv: PagedRows, window_idx: torch.Tensor, block_table: torch.Tensor,
                n_comp: torch.Tensor) -> torch.Tensor:
    """The HCA index list [b, s, W + E]: window_idx, then the rows of entries 0 .. n_comp-1, then -1, for every
    entry the block table can address (E = its width times the entries per block: a static size, and trailing
    empty slots change nothing)."""
    b = window_idx.shape[0]
    j = torch.arange(block_table.shape[1] * kv.entries_per_block, device=window_idx.device)
    rows = kv.entry_rows(block_table, j.expand(b, -1))                               # [b, E]
    comp = torch.where(j < n_comp[..., None], rows[:, None, :], -1)
    return torch.cat((window_idx, comp), dim=-1)


# -- mHC ----------------------------------------------------------------------------------------------------------
def _hc_mixes(x: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """m = (flat(x) @ fn.T) * rsqrt(mean(flat(x)^2) + eps), all sums in lane order."""
    xf = x.flatten(-2).float()
    mean_sq = lane_sum(xf * xf) / _count(xf.shape[-1], xf)
    return float_matmul(xf, fn) * rsqrt(mean_sq + norm_eps)[..., None]


def _hc_collapse(x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """y = sum_j pre_j x_j in increasing j starting from the j=0 term, fp32, one cast to bf16."""
    xf = x.float()
    y = pre[..., 0, None] * xf[..., 0, :]
    for j in range(1, x.shape[-2]):
        y = y + pre[..., j, None] * xf[..., j, :]
    return y.to(torch.bfloat16)


def mhc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, norm_eps: float,
            hc_eps: float, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC pre-mapping: (y = sum_j pre_j x_j, post, comb) with comb from Sinkhorn of the row softmax."""
    hc = x.shape[-2]
    mixes = _hc_mixes(x, fn, norm_eps)
    pre = sigmoid(mixes[..., :hc] * scale[0] + base[:hc]) + hc_eps
    post = sigmoid(mixes[..., hc:2 * hc] * scale[1] + base[hc:2 * hc]) * 2.0
    comb = (mixes[..., 2 * hc:] * scale[2] + base[2 * hc:]).unflatten(-1, (hc, hc))
    comb = exp(comb - comb.amax(dim=-1, keepdim=True))
    comb = comb / lane_sum(comb)[..., None] + hc_eps
    comb = comb / (lane_sum(comb, dim=-2)[..., None, :] + hc_eps)
    for _ in range(iters - 1):
        comb = comb / (lane_sum(comb)[..., None] + hc_eps)
        comb = comb / (lane_sum(comb, dim=-2)[..., None, :] + hc_eps)
    return _hc_collapse(x, pre), post, comb


def mhc_post(f: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """out_k = post_k * f + sum_j comb[j, k] * x_j, the j terms added in increasing j; one cast to bf16."""
    xf = x.float()
    out = post[..., :, None] * f.float()[..., None, :]
    for j in range(x.shape[-2]):
        out = out + comb[..., j, :, None] * xf[..., j, None, :]
    return out.to(torch.bfloat16)


def mhc_head(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, norm_eps: float,
             hc_eps: float) -> torch.Tensor:
    """Collapse the streams before the final norm: pre = sigmoid(m*scale + base) + hc_eps; y = sum_j pre_j x_j."""
    pre = sigmoid(_hc_mixes(x, fn, norm_eps) * scale[0] + base) + hc_eps
    return _hc_collapse(x, pre)


# -- MoE ----------------------------------------------------------------------------------------------------------
def moe_gate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, hash_experts: torch.Tensor | None,
             k: int, route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """a = sqrt(softplus(x @ weight.T)); experts = hash_experts or the k best of a + bias (ties: lower id);
    weights = a[experts] / lanesum(a[experts]) * route_scale."""
    return route(sqrt(softplus(float_matmul(x.float(), weight))), bias, hash_experts, k, route_scale)


def route(a: torch.Tensor, bias: torch.Tensor | None, hash_experts: torch.Tensor | None, k: int,
          route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """moe_gate from its affinities a = sqrt(softplus(x @ weight.T)) [T, E]: expert choice, normalised weights."""
    if hash_experts is not None:
        experts = hash_experts.long()
    else:
        _, experts = topk_lower_index(a if bias is None else a + bias.float(), k)
    chosen = a.gather(-1, experts)
    return chosen / lane_sum(chosen)[..., None] * route_scale, experts


def moe_dispatch(experts: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort of the flat (token, slot) indices t*k + slot by expert id, and the rows per expert."""
    flat = experts.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices
    counts = torch.zeros(n_experts, dtype=torch.int64, device=flat.device)
    return order, counts.scatter_add_(0, flat, torch.ones_like(flat))   # bincount would read its size on the host


def swiglu(g: torch.Tensor, u: torch.Tensor, limit: float, route_weight: torch.Tensor | None) -> torch.Tensor:
    """silu(min(g, limit)) * clamp(u, -limit, limit) (clamps only when limit > 0), times route_weight; bf16."""
    gf, uf = g.float(), u.float()
    if limit > 0:
        gf, uf = gf.clamp_max(limit), uf.clamp(-limit, limit)
    h = silu(gf) * uf
    if route_weight is not None:
        h = h * route_weight.float()[:, None]
    return h.to(torch.bfloat16)


def moe_combine(expert_out: torch.Tensor, order: torch.Tensor, k: int, shared: torch.Tensor) -> torch.Tensor:
    """y_t = sum of the k slot outputs of token t in slot order (from slot 0's), then + shared_t; bf16."""
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)
    rows = expert_out[position].float().view(-1, k, expert_out.shape[-1])
    y = rows[:, 0]
    for slot in range(1, k):
        y = y + rows[:, slot]
    return (y + shared.float()).to(torch.bfloat16)


def ep_combine(local_out: torch.Tensor, order: torch.Tensor, counts: torch.Tensor, k: int, shared: torch.Tensor,
               group: ExpertGroup | None) -> torch.Tensor:
    """moe_combine over every rank's expert rows: the rows are all-gathered (data movement only), then summed here in
    slot order; `group` None is one process holding every row."""
    expert_out = local_out if group is None else group.gather_rows(local_out, counts)
    return moe_combine(expert_out, order, k, shared)


# -- sampling -----------------------------------------------------------------------------------------------------
_TOP_P_ONE = 2 ** 40   # probabilities in fixed point: floor(p * 2^40) is exact, and integer sums are order-free


def _first_argmax(x: torch.Tensor) -> torch.Tensor:
    """Index of the maximum along the last dim, the lowest one among equals."""
    ids = torch.arange(x.shape[-1], device=x.device)
    return torch.where(x == x.amax(dim=-1, keepdim=True), ids, x.shape[-1]).amin(dim=-1)


def _top_p_mask(p: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep, in descending p (ties: lower id), each token whose preceding cumulative mass is below top_p; the
    first always; every token when top_p >= 1. Masses are compared in exact 2^-40 fixed point."""
    fixed = torch.floor(p * float(_TOP_P_ONE)).to(torch.int64)
    order = torch.sort(p, dim=-1, descending=True, stable=True).indices
    ranked = fixed.gather(-1, order)
    before = torch.cumsum(ranked, dim=-1) - ranked
    limit = torch.ceil(top_p.float().clamp(max=1.0) * float(_TOP_P_ONE)).to(torch.int64)   # exact: a 2^40 scaling
    keep = before < limit[:, None]
    keep[:, 0] = True
    keep |= (top_p >= 1.0)[:, None]
    return torch.zeros_like(keep).scatter(-1, order, keep)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, seed: int,
           request: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """temperature 0: argmax (ties: lower id). Otherwise the kept token maximising p_i / E_i, p the softmax of
    logits / T, E_i = -log(U_i) with U from the counter-based generator keyed by (seed, request, position, i)."""
    lf = logits.float()
    sampling = temperature > 0
    t = torch.where(sampling, temperature.float(), 1.0)
    z = lf / t[:, None]
    e = exp(z - z.amax(dim=-1, keepdim=True))
    p = e / lane_sum(e)[:, None]
    u = counter_uniform(seed, request, position, lf.shape[-1], lf.device)
    score = torch.where(_top_p_mask(p, top_p), p / -log(u), -1.0)
    return torch.where(sampling, _first_argmax(score), _first_argmax(lf))
