"""Checks every Triton kernel in dsv4.kernels against the canonical reference on one device (argv[1]: 'cpu' under
TRITON_INTERPRET=1, or 'cuda'): exact kernels bit for bit, fast kernels within the op's tolerance. Prints one line
per kernel and 'ok' at the end; any mismatch raises. Run by tests/test_cuda_kernels.py."""
import sys

import torch
import triton
import triton.language as tl

from dsv4.backends.canonical import ops as C
from dsv4.backends.canonical import primitives as P
from dsv4.backends.contracts import contract
from dsv4.formats import fake_quant, quantize_weight_fp4, quantize_weight_fp8
from dsv4.kernels import compress_pool, exact_math, indexer, linear, mhc_pre, pointwise, quant_gemm, rms_norm, sparse_attention

device = sys.argv[1]
torch.manual_seed(0)


def same(name, out, ref):
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    for o, r in zip(outs, refs):
        o = o.cpu()
        assert o.dtype == r.dtype and o.shape == r.shape, (name, o.dtype, r.dtype, o.shape, r.shape)
        bits = {torch.bfloat16: torch.int16, torch.float32: torch.int32}.get(r.dtype)
        equal = torch.equal(o.view(bits), r.view(bits)) if bits else torch.equal(o, r)
        assert equal, f"{name}: bits differ from the reference"
    print(name, "exact")


def close(name, op, out, ref):
    c = contract(op)
    out, ref = out.cpu().float(), ref.float()
    bad = (out - ref).abs() > c.atol + c.rtol * ref.abs()
    assert not bad.any(), f"{name}: {int(bad.sum())} values outside the {op} tolerance"
    print(name, "within tolerance")


def on(*args):
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


@triton.jit
def _math_kernel(x_ptr, out_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    x = tl.load(x_ptr + i)
    tl.store(out_ptr + i, exact_math.exp(x))
    tl.store(out_ptr + N + i, exact_math.log(x))
    tl.store(out_ptr + 2 * N + i, exact_math.softplus(x))
    tl.store(out_ptr + 3 * N + i, exact_math.sigmoid(x))


# the canonical transcendentals: wide range, subnormals, zeros, infinities
values = torch.cat([torch.randn(2048) * 40, torch.rand(1024) * 1e-37, torch.tensor([0.0, -0.0, 1.0, 88.7, -103.9]),
                    torch.tensor([float("inf"), -float("inf"), 1e-45, 3e38]), torch.randn(1015)])
out = torch.empty(4 * 4096, device=device)
_math_kernel[(1,)](values.to(device), out, N=4096, enable_fp_fusion=False)
for i, (name, fn) in enumerate([("exp", P.exp), ("log", P.log), ("softplus", P.softplus), ("sigmoid", P.sigmoid)]):
    got, want = out[i * 4096:(i + 1) * 4096].cpu(), fn(values)
    same_bits = (got.view(torch.int32) == want.view(torch.int32)) | (got.isnan() & want.isnan())
    assert same_bits.all(), f"{name}: {int((~same_bits).sum())} values differ from the reference"
    print(name, "exact")

# quantised GEMMs (dense FP8/FP4, grouped FP4)
for m, n, k in [(1, 96, 256), (5, 130, 384), (19, 64, 128)]:
    x = torch.randn(m, k) * 2
    x[:, 128:256] *= 1e-6                         # a block below the amax floor: e4m3 subnormals
    x[0, :64] = 0.0                               # zeros and exact ties of the e4m3 grid
    x[-1, 1:5] = torch.tensor([1.0625, -1.0625, 0.0048828125, 448.0])
    x = x.bfloat16()
    for make in (quantize_weight_fp8, quantize_weight_fp4):
        w, s = make(torch.randn(n, k) * k ** -0.5)
        ref = C.quant_linear(x, w, s)
        same(f"quant_linear exact {make.__name__} {m}x{n}x{k}", quant_gemm.quant_linear("exact")(*on(x, w, s)), ref)
        for kind in ("fast", "invariant"):
            close(f"quant_linear {kind} {make.__name__} {m}x{n}x{k}", "quant_linear",
                  quant_gemm.quant_linear(kind)(*on(x, w, s)), ref)
experts = [quantize_weight_fp4(torch.randn(64, 256) * 0.06) for _ in range(4)]
W, S = torch.stack([w for w, _ in experts]), torch.stack([s for _, s in experts])
counts, x = torch.tensor([2, 0, 17, 1]), torch.randn(20, 256).bfloat16()
ref = C.grouped_quant_linear(x, counts, W, S)
same("grouped_quant_linear exact", quant_gemm.grouped_quant_linear("exact")(*on(x, counts, W, S)), ref)
for kind in ("fast", "invariant"):
    close(f"grouped_quant_linear {kind}", "grouped_quant_linear",
          quant_gemm.grouped_quant_linear(kind)(*on(x, counts, W, S)), ref)
counts, x = torch.tensor([150, 0, 70, 90]), torch.randn(310, 256).bfloat16()   # prefill-sized groups: large tiles
close("grouped_quant_linear fast, large groups", "grouped_quant_linear",
      quant_gemm.grouped_quant_linear("fast")(*on(x, counts, W, S)), C.grouped_quant_linear(x, counts, W, S))

# sparse and HCA attention: empty slots, an empty chunk, a query with nothing to attend to
for b, s, h, d, n, k in [(2, 3, 4, 128, 50, 70), (1, 2, 5, 64, 200, 130)]:
    q, kv = torch.randn(b, s, h, d).bfloat16(), torch.randn(b, n, d).bfloat16()
    idx = torch.randint(0, n, (b, s, k))
    idx[0, 0, 5:20], idx[0, 1, :64], idx[-1, -1, :] = -1, -1, -1
    sink = torch.randn(h)
    ref = C.sparse_attention(q, kv, idx, sink, d ** -0.5)
    same(f"sparse_attention exact {b}x{s}x{h}x{d}",
         sparse_attention.sparse_attention("exact")(*on(q, kv, idx, sink, d ** -0.5)), ref)
    close(f"sparse_attention fast {b}x{s}x{h}x{d}", "sparse_attention",
          sparse_attention.sparse_attention("fast")(*on(q, kv, idx, sink, d ** -0.5)), ref)
    window = torch.randint(-1, 8, (b, s, 8))
    n_comp = torch.randint(0, n - 8, (b, s))
    ref = C.hca_attention(q, kv, window, 8, n_comp, sink, d ** -0.5)
    same(f"hca_attention exact {b}x{s}", sparse_attention.hca_attention("exact")(
        *on(q, kv, window, 8, n_comp, sink, d ** -0.5)), ref)

# indexer: FP4 fake-quantised queries and keys, as the model feeds it; nothing / some / everything visible
q = fake_quant(torch.randn(2, 3, 5, 128).bfloat16(), "fp4", 32)
keys = fake_quant(torch.randn(2, 150, 128).bfloat16(), "fp4", 32)
w, visible = torch.randn(2, 3, 5), torch.tensor([[0, 10, 150], [3, 17, 100]])
same("indexer_topk", indexer.indexer_topk(*on(q, w, keys, visible, 16)), C.indexer_topk(q, w, keys, visible, 16))

# norms, linear, elementwise
x = torch.randn(37, 200).bfloat16()
weight = torch.rand(200) + 0.5
same("rms_norm bf16", rms_norm.rms_norm(*on(x, weight, 1e-6)), C.rms_norm(x, weight, 1e-6))
same("rms_norm fp32 no weight", rms_norm.rms_norm(*on(x.float(), None, 1e-6)), C.rms_norm(x.float(), None, 1e-6))
for m in (1, 3, 40):
    xf, wf = torch.randn(m, 300), torch.randn(70, 300)
    same(f"linear fp32 m={m}", linear.linear(*on(xf, wf)), C.linear(xf, wf))
    xg, wg = torch.randn(m, 2, 64).bfloat16(), torch.randn(2, 48, 64).bfloat16()
    same(f"linear grouped bf16 m={m}", linear.linear(*on(xg, wg)), C.linear(xg, wg))
    close(f"linear cublas m={m}", "linear", linear.cublas_linear(*on(xg, wg)), C.linear(xg, wg))
x, gate_w = torch.randn(13, 256).bfloat16(), torch.randn(8, 256) * 0.3
bias, hashed = torch.randn(8) * 0.1, torch.randint(0, 8, (13, 2))
for label, b, h in (("scored", bias, None), ("hashed", None, hashed)):
    same(f"moe_gate {label}", linear.moe_gate(*on(x, gate_w, b, h, 2, 1.5)), C.moe_gate(x, gate_w, b, h, 2, 1.5))
q = torch.randn(2, 3, 4, 128).bfloat16()
cos, sin = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
for inverse in (False, True):
    same(f"rope per head inverse={inverse}", pointwise.rope(*on(q, cos[:, :, None], sin[:, :, None], inverse)),
         C.rope(q, cos[:, :, None], sin[:, :, None], inverse))
    same(f"rope per token inverse={inverse}", pointwise.rope(*on(q[:, :, 0], cos, sin, inverse)),
         C.rope(q[:, :, 0], cos, sin, inverse))
g, u, rw = (torch.randn(9, 300) * 8).bfloat16(), (torch.randn(9, 300) * 8).bfloat16(), torch.rand(9)
for limit, weights in ((10.0, rw), (0.0, None)):
    same(f"swiglu limit={limit}", pointwise.swiglu(*on(g, u, limit, weights)), C.swiglu(g, u, limit, weights))
f, streams = torch.randn(2, 3, 200).bfloat16(), torch.randn(2, 3, 4, 200).bfloat16()
post, comb = torch.rand(2, 3, 4) * 2, torch.rand(2, 3, 4, 4)
kv, score = torch.randn(6, 8, 300), torch.randn(6, 8, 300) * 4
score[0, 3:] = float("-inf")                  # rows not written yet weigh 0
for r in (8, 128):
    kv_r, score_r = kv.repeat(1, r // 8, 1), score.repeat(1, r // 8, 1)
    same(f"compress_pool R={r}", compress_pool.compress_pool(*on(kv_r, score_r)), C.compress_pool(kv_r, score_r))
x = torch.randn(5, 1, 4, 200).bfloat16()
fn, hc_scale, hc_base = torch.randn(24, 800) * 0.05, torch.rand(3) + 0.5, torch.randn(24)
same("mhc_pre", mhc_pre.mhc_pre(*on(x, fn, hc_scale, hc_base, 1e-6, 1e-6, 20)),
     C.mhc_pre(x, fn, hc_scale, hc_base, 1e-6, 1e-6, 20))
same("mhc_post", pointwise.mhc_post(*on(f, streams, post, comb)), C.mhc_post(f, streams, post, comb))
experts = torch.randint(0, 8, (11, 3))
order, _ = C.moe_dispatch(experts, 8)
out, shared = torch.randn(33, 200).bfloat16(), torch.randn(11, 200).bfloat16()
same("moe_combine", pointwise.moe_combine(*on(out, order, 3, shared)), C.moe_combine(out, order, 3, shared))
print("ok")
