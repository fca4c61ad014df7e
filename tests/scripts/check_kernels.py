"""Every Triton kernel in dsv4.kernels against the canonical reference on one device: exact kernels bit for bit, fast
kernels within the op's tolerance.

`python check_kernels.py DEVICE [CASE ...]` (DEVICE 'cpu' under TRITON_INTERPRET=1, or 'cuda') runs the named cases
(all by default) and prints one JSON line per case: {"case", "ok", "detail"}. tests/test_cuda_kernels.py runs it in
child processes (Triton's interpreter must be chosen before triton is imported), two with half the cases each, and
asserts each case as its own parametrized test.
"""
from __future__ import annotations

import json
import sys
import traceback
from typing import Callable

import torch
import triton
import triton.language as tl

from dsv4.backends.canonical import ops as C
from dsv4.backends.canonical import primitives as P
from dsv4.backends.contracts import FP4_BLOCK, KV_FP8_BLOCK, contract
from dsv4.cache import PagedRows
from dsv4.formats import fake_quant, quantize_weight_fp4, quantize_weight_fp8
from dsv4.kernels import compress_pool, exact_math, indexer, linear, mhc, pointwise, quant_gemm, quantize, rms_norm
from dsv4.kernels import sparse_attention

CASES: dict[str, Callable[[str], str]] = {}


def case(name: str):
    def register(fn: Callable[[str], str]) -> Callable[[str], str]:
        CASES[name] = fn
        return fn
    return register


def same(out, ref) -> str:
    """Assert bit equality of (tuples of) tensors; float NaNs compare equal to NaNs."""
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    for o, r in zip(outs, refs):
        o = o.cpu()
        assert o.dtype == r.dtype and o.shape == r.shape, f"{o.dtype} {tuple(o.shape)} vs {r.dtype} {tuple(r.shape)}"
        bits = {torch.bfloat16: torch.int16, torch.float32: torch.int32}.get(r.dtype)
        if bits:
            differ = (o.view(bits) != r.view(bits)) & ~(o.isnan() & r.isnan())
            first = [(tuple(i), o[tuple(i)].item(), r[tuple(i)].item()) for i in differ.nonzero()[:3].tolist()]
            assert not differ.any(), (f"{int(differ.sum())} of {r.numel()} values differ from the reference in bits; "
                                      f"first (index, got, reference): {first}")
        else:
            assert torch.equal(o, r), "integer outputs differ from the reference"
    return "bit-identical"


def close(op: str, out, ref) -> str:
    c = contract(op)
    out, ref = out.cpu().float(), ref.float()
    bad = (out - ref).abs() > c.atol + c.rtol * ref.abs()
    assert not bad.any(), f"{int(bad.sum())} values outside the {op} tolerance"
    return f"within tolerance (max error {(out - ref).abs().max().item():.3g})"


def on(device: str, *args):
    return tuple(a.to(device) if isinstance(a, (torch.Tensor, PagedRows)) else a for a in args)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@triton.jit
def _math_kernel(x_ptr, out_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    x = tl.load(x_ptr + i)
    tl.store(out_ptr + i, exact_math.exp(x))
    tl.store(out_ptr + N + i, exact_math.log(x))
    tl.store(out_ptr + 2 * N + i, exact_math.softplus(x))
    tl.store(out_ptr + 3 * N + i, exact_math.sigmoid(x))


@case("exact_math transcendentals")
def _(device):
    """The canonical exp, log, softplus, sigmoid: wide range, subnormals, zeros, infinities."""
    g = gen(0)
    values = torch.cat([torch.randn(2048, generator=g) * 40, torch.rand(1024, generator=g) * 1e-37,
                        torch.tensor([0.0, -0.0, 1.0, 88.7, -103.9, float("inf"), -float("inf"), 1e-45, 3e38]),
                        torch.randn(1015, generator=g)])
    out = torch.empty(4 * 4096, device=device)
    _math_kernel[(1,)](values.to(device), out, N=4096, enable_fp_fusion=False)
    for i, fn in enumerate((P.exp, P.log, P.softplus, P.sigmoid)):
        same(out[i * 4096:(i + 1) * 4096], fn(values))
    return "bit-identical"


def _gemm_input(m: int, k: int, seed: int) -> torch.Tensor:
    x = torch.randn(m, k, generator=gen(seed)) * 2
    x[:, 128:256] *= 1e-6                         # a block below the amax floor: e4m3 subnormals
    x[0, :64] = 0.0                               # zeros and exact ties of the e4m3 grid
    x[-1, 1:5] = torch.tensor([1.0625, -1.0625, 0.0048828125, 448.0])
    return x.bfloat16()


GEMM_SHAPES = [(1, 96, 256), (5, 130, 384), (19, 64, 128)]


def _dense_gemm_case(kind: str, make):
    def run(device):
        details = []
        for m, n, k in GEMM_SHAPES:
            x = _gemm_input(m, k, m)
            w, s = make(torch.randn(n, k, generator=gen(n)) * k ** -0.5)
            out, ref = quant_gemm.quant_linear(kind)(*on(device, x, w, s)), C.quant_linear(x, w, s)
            details.append(same(out, ref) if kind == "exact" else close("quant_linear", out, ref))
        return details[-1]
    return run


for _kind in ("exact", "invariant", "fast"):
    for _make in (quantize_weight_fp8, quantize_weight_fp4):
        case(f"quant_linear {_kind} {_make.__name__[16:]}")(_dense_gemm_case(_kind, _make))


@case("quant_linear exact, unsplit")
def _(device):
    """The exact kernel's one-sequence path, taken when the block terms of a split would not fit."""
    budget, quant_gemm.EXACT_TERMS_BYTES = quant_gemm.EXACT_TERMS_BYTES, 0
    try:
        return _dense_gemm_case("exact", quantize_weight_fp4)(device)
    finally:
        quant_gemm.EXACT_TERMS_BYTES = budget


def _expert_weights():
    experts = [quantize_weight_fp4(torch.randn(64, 256, generator=gen(e)) * 0.06) for e in range(4)]
    return torch.stack([w for w, _ in experts]), torch.stack([s for _, s in experts])


def _grouped_case(kind: str, counts: list[int]):
    def run(device):
        W, S = _expert_weights()
        n = torch.tensor(counts)
        x = torch.randn(int(n.sum()), 256, generator=gen(7)).bfloat16()
        out, ref = quant_gemm.grouped_quant_linear(kind)(*on(device, x, n, W, S)), C.grouped_quant_linear(x, n, W, S)
        return same(out, ref) if kind == "exact" else close("grouped_quant_linear", out, ref)
    return run


for _kind in ("exact", "invariant", "fast"):
    case(f"grouped_quant_linear {_kind}")(_grouped_case(_kind, [2, 0, 17, 1]))
case("grouped_quant_linear fast, prefill-sized groups")(_grouped_case("fast", [100, 0, 100, 60]))


def _kv_storage(rows: int, d: int, seed: int, pool_base: int = 0, epb: int = 0) -> PagedRows:
    """Stored KV rows on the cache's grid: d - 64 FP8 dims (blocks of 64), then 64 bf16 RoPE dims."""
    v = torch.randn(rows, d, generator=gen(seed)).bfloat16()
    v = torch.cat([fake_quant(v[:, :-64], "fp8", KV_FP8_BLOCK), v[:, -64:]], dim=-1)
    return PagedRows.holding(v, "fp8", KV_FP8_BLOCK, 64, pool_base, epb)


def _fresh(b: int, s: int, d: int, seed: int) -> torch.Tensor:
    v = torch.randn(b, s, d, generator=gen(seed)).bfloat16()
    return torch.cat([fake_quant(v[..., :-64], "fp8", KV_FP8_BLOCK), v[..., -64:]], dim=-1)


ATTENTION_SHAPES = [(2, 3, 4, 128, 50, 70), (1, 2, 5, 256, 200, 130)]   # b, s, heads, head dim, stored rows, slots


def _sparse_case(kind: str):
    """Stored and fresh rows, empty slots, an empty chunk, a query with nothing to attend to."""
    def run(device):
        detail = ""
        for b, s, h, d, n, k in ATTENTION_SHAPES:
            q, kv, fresh = torch.randn(b, s, h, d, generator=gen(1)).bfloat16(), _kv_storage(n, d, 2), _fresh(b, s, d, 3)
            idx = torch.randint(0, n + s, (b, s, k), generator=gen(4))
            idx[0, 0, 5:20], idx[0, 1, :64], idx[-1, -1, :] = -1, -1, -1
            sink = torch.randn(h, generator=gen(5))
            ref = C.sparse_attention(q, kv, fresh, idx, sink, d ** -0.5)
            out = sparse_attention.sparse_attention(kind)(*on(device, q, kv, fresh, idx, sink, d ** -0.5))
            detail = same(out, ref) if kind == "exact" else close("sparse_attention", out, ref)
        return detail
    return run


def _hca_case(kind: str):
    """Window slots (stored and fresh), then compressed entries through per-sequence block tables."""
    def run(device):
        detail = ""
        for b, s, h, d, n, _ in ATTENTION_SHAPES:
            epb, n_blocks = 6, (n - 16) // 6
            q, fresh = torch.randn(b, s, h, d, generator=gen(1)).bfloat16(), _fresh(b, s, d, 3)
            kv = _kv_storage(16 + n_blocks * epb, d, 2, pool_base=16, epb=epb)
            window = torch.randint(-1, 16 + s, (b, s, 8), generator=gen(4))
            table = torch.stack([torch.randperm(n_blocks, generator=gen(9 + i)) for i in range(b)]).int()
            n_comp = torch.randint(0, n_blocks * epb, (b, s), generator=gen(6))
            n_comp[0, 0] = 0
            sink = torch.randn(h, generator=gen(5))
            ref = C.hca_attention(q, kv, fresh, window, table, n_comp, sink, d ** -0.5)
            out = sparse_attention.hca_attention(kind)(*on(device, q, kv, fresh, window, table, n_comp, sink,
                                                           d ** -0.5))
            detail = same(out, ref) if kind == "exact" else close("hca_attention", out, ref)
        return detail
    return run


for _kind in ("exact", "split"):
    case(f"sparse_attention {_kind}")(_sparse_case(_kind))
    case(f"hca_attention {_kind}")(_hca_case(_kind))


@case("indexer_topk")
def _(device):
    """FP4 queries and paged FP4 keys, as the model feeds them; nothing / some / everything visible; 4 and 20 heads
    (a partial head group)."""
    for heads in (4, 20):
        q = fake_quant(torch.randn(2, 3, heads, 128, generator=gen(heads)).bfloat16(), "fp4", FP4_BLOCK)
        values = fake_quant(torch.randn(160, 128, generator=gen(2)).bfloat16(), "fp4", FP4_BLOCK)
        keys = PagedRows.holding(values, "fp4", FP4_BLOCK, 0, entries_per_block=32)
        table = torch.stack([torch.randperm(5, generator=gen(3 + i)) for i in range(2)]).int()
        w, visible = torch.randn(2, 3, heads, generator=gen(4)), torch.tensor([[0, 10, 160], [3, 17, 100]])
        same(indexer.indexer_topk(*on(device, q, w, keys, table, visible, 16)),
             C.indexer_topk(q, w, keys, table, visible, 16))
    return "bit-identical"


def _quant_input(rows: int, n: int, seed: int) -> torch.Tensor:
    """Values across many binades, blocks below the amax floor, signed zeros and exact grid ties."""
    x = torch.randn(rows, n, generator=gen(seed)) * torch.logspace(-6, 3, rows)[:, None]
    x[0, :8] = torch.tensor([0.0, -0.0, 0.25, -0.75, 1.25, 2.5, -5.0, 3.5])
    x[1] *= 1e-9
    return x.bfloat16()


@case("fake_quant")
def _(device):
    """FP8 in blocks of 64 (448 values: 7 blocks, as the KV vectors) and FP4 in blocks of 32."""
    for fmt, block, n in (("fp8", KV_FP8_BLOCK, 448), ("fp8", KV_FP8_BLOCK, 128), ("fp4", FP4_BLOCK, 128)):
        x = _quant_input(9, n, 1)
        same(quantize.fake_quant(*on(device, x, fmt, block)), C.fake_quant(x, fmt, block))
    return "bit-identical"


@case("encode_rows")
def _(device):
    for fmt, block, n in (("fp8", KV_FP8_BLOCK, 448), ("fp4", FP4_BLOCK, 128)):
        x = C.fake_quant(_quant_input(9, n, 2), fmt, block)
        same(quantize.encode_rows(*on(device, x, fmt, block)), C.encode_rows(x, fmt, block))
    return "bit-identical"


@case("hadamard")
def _(device):
    for n in (64, 128):
        x = _quant_input(7, n, 3)
        same(quantize.hadamard(on(device, x)[0]), C.hadamard(x))
    return "bit-identical"


@case("rms_norm")
def _(device):
    """A few rows (one program each) and many (BLOCK_R rows a program, the last tile partial); a partial column tile."""
    weight = torch.rand(200, generator=gen(2)) + 0.5
    for rows in (3, 4 * rms_norm.BLOCK_R + 6):
        x = torch.randn(rows, 200, generator=gen(rows)).bfloat16()
        same(rms_norm.rms_norm(*on(device, x, weight, 1e-6)), C.rms_norm(x, weight, 1e-6))
        same(rms_norm.rms_norm(*on(device, x.float(), None, 1e-6)), C.rms_norm(x.float(), None, 1e-6))
    return "bit-identical"


LINEAR_ROWS = (1, 3, 20)


@case("linear exact")
def _(device):
    """One row, a partial row tile, two row tiles (the last partial); odd N: a partial column tile."""
    for m in LINEAR_ROWS:
        xf, wf = torch.randn(m, 300, generator=gen(m)), torch.randn(37, 300, generator=gen(1))
        same(linear.linear(*on(device, xf, wf)), C.linear(xf, wf))
        xg, wg = torch.randn(m, 2, 64, generator=gen(m)).bfloat16(), torch.randn(2, 21, 64, generator=gen(2)).bfloat16()
        same(linear.linear(*on(device, xg, wg)), C.linear(xg, wg))
    return "bit-identical"


@case("linear cublas")
def _(device):
    detail = ""
    for m in LINEAR_ROWS:
        xg, wg = torch.randn(m, 2, 64, generator=gen(m)).bfloat16(), torch.randn(2, 48, 64, generator=gen(2)).bfloat16()
        detail = close("linear", linear.cublas_linear(*on(device, xg, wg)), C.linear(xg, wg))
    return detail


@case("moe_gate")
def _(device):
    x, gate_w = torch.randn(13, 256, generator=gen(1)).bfloat16(), torch.randn(8, 256, generator=gen(2)) * 0.3
    bias, hashed = torch.randn(8, generator=gen(3)) * 0.1, torch.randint(0, 8, (13, 2), generator=gen(4))
    for b, h in ((bias, None), (None, hashed)):
        same(linear.moe_gate(*on(device, x, gate_w, b, h, 2, 1.5)), C.moe_gate(x, gate_w, b, h, 2, 1.5))
    return "bit-identical"


@case("rope")
def _(device):
    q = torch.randn(2, 3, 4, 128, generator=gen(1)).bfloat16()
    cos, sin = torch.randn(2, 3, 32, generator=gen(2)), torch.randn(2, 3, 32, generator=gen(3))
    for inverse in (False, True):
        same(pointwise.rope(*on(device, q, cos[:, :, None], sin[:, :, None], inverse)),
             C.rope(q, cos[:, :, None], sin[:, :, None], inverse))
        same(pointwise.rope(*on(device, q[:, :, 0], cos, sin, inverse)), C.rope(q[:, :, 0], cos, sin, inverse))
    return "bit-identical"


@case("swiglu")
def _(device):
    g, u = (torch.randn(9, 300, generator=gen(1)) * 8).bfloat16(), (torch.randn(9, 300, generator=gen(2)) * 8).bfloat16()
    rw = torch.rand(9, generator=gen(3))
    for limit, weights in ((10.0, rw), (0.0, None)):
        same(pointwise.swiglu(*on(device, g, u, limit, weights)), C.swiglu(g, u, limit, weights))
    return "bit-identical"


@case("compress_pool")
def _(device):
    """Two entries (the first with rows not written yet), a full and a partial channel block, R = 8 and 128 (fewer
    rows than lanes, and many rows per lane)."""
    kv, score = torch.randn(2, 8, 200, generator=gen(1)), torch.randn(2, 8, 200, generator=gen(2)) * 4
    score[0, 3:] = float("-inf")                  # rows not written yet weigh 0
    for r in (8, 128):
        kv_r, score_r = kv.repeat(1, r // 8, 1), score.repeat(1, r // 8, 1)
        same(compress_pool.compress_pool(*on(device, kv_r, score_r)), C.compress_pool(kv_r, score_r))
    return "bit-identical"


@case("mhc_pre")
def _(device):
    x = torch.randn(2, 1, 4, 200, generator=gen(1)).bfloat16()
    fn, hc_scale, hc_base = (torch.randn(24, 800, generator=gen(2)) * 0.05, torch.rand(3, generator=gen(3)) + 0.5,
                             torch.randn(24, generator=gen(4)))
    return same(mhc.mhc_pre(*on(device, x, fn, hc_scale, hc_base, 1e-6, 1e-6, 20)),
                C.mhc_pre(x, fn, hc_scale, hc_base, 1e-6, 1e-6, 20))


@case("mhc_head")
def _(device):
    x = torch.randn(2, 1, 4, 200, generator=gen(1)).bfloat16()
    fn, hc_scale, hc_base = (torch.randn(4, 800, generator=gen(2)) * 0.05, torch.rand(1, generator=gen(3)) + 0.5,
                             torch.randn(4, generator=gen(4)))
    return same(mhc.mhc_head(*on(device, x, fn, hc_scale, hc_base, 1e-6, 1e-6)),
                C.mhc_head(x, fn, hc_scale, hc_base, 1e-6, 1e-6))


@case("mhc_post")
def _(device):
    f, streams = torch.randn(2, 3, 200, generator=gen(1)).bfloat16(), torch.randn(2, 3, 4, 200, generator=gen(2)).bfloat16()
    post, comb = torch.rand(2, 3, 4, generator=gen(3)) * 2, torch.rand(2, 3, 4, 4, generator=gen(4))
    return same(pointwise.mhc_post(*on(device, f, streams, post, comb)), C.mhc_post(f, streams, post, comb))


@case("moe_combine")
def _(device):
    order, _ = C.moe_dispatch(torch.randint(0, 8, (11, 3), generator=gen(1)), 8)
    out, shared = torch.randn(33, 200, generator=gen(2)).bfloat16(), torch.randn(11, 200, generator=gen(3)).bfloat16()
    return same(pointwise.moe_combine(*on(device, out, order, 3, shared)), C.moe_combine(out, order, 3, shared))


def main(device: str, names: list[str]) -> None:
    for name in names or list(CASES):
        try:
            result = {"case": name, "ok": True, "detail": CASES[name](device)}
        except Exception as e:   # report and go on: every case gets its own line
            result = {"case": name, "ok": False, "detail": f"{type(e).__name__}: {e}",
                      "traceback": traceback.format_exc()[-2000:]}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
