"""Per-op benchmark (`dsv4 bench ops`): every hot registry op at the real dimensions of one V4 layer, for decode batch
sizes and prefill lengths, at every determinism level, against baselines and the hardware limits of the same run.

For each (op, shape, phase, size) the kernel that the backend resolves for each level is timed (a kernel serving
several levels is timed once), and so are the baselines that exist for the op:
- `composite`: the CPU reference's canonical ops run on the device through plain torch (small sizes only: slow);
- `cublas_bf16` and `scaled_mm_fp8` for the quantised GEMMs (cuBLAS on bf16 weights; torch._scaled_mm FP8 with
  per-tensor scales, a lower bound on what a block-scaled FP8 GEMM costs in cuBLAS);
- `sdpa` for attention: torch's scaled_dot_product_attention over a dense key set of the same size.
Every row carries the bytes and FLOPs the op must move and do at least, so it reports the fraction of the HBM
bandwidth and of the tensor-core rate measured in the same run. Inputs are random: a benchmark times, conformance
checks bits.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from dsv4.backends.canonical import ops as canonical
from dsv4.backends.levels import Level
from dsv4.backends.registry import Kernel
from dsv4.benchmarks.timing import level_tables, limits, time_us
from dsv4.backends.contracts import FP4_BLOCK, KV_FP8_BLOCK
from dsv4.cache import PagedRows, blocks_for, index_key_rows, kv_rows
from dsv4.config import CACHE_BLOCK, CSA_RATIO, ModelConfig, preset
from dsv4.formats import quantize_weight_fp4, quantize_weight_fp8

COMPOSITE_MAX_TOKENS = 16      # the torch composite is timed up to this many tokens (it is slow by design)
SLOW_CALL_US = 50_000          # calls slower than this are timed 3 times instead of 20
EXACT_PREFILL_MAX = 16384      # kernels declared exact are timed on prefills up to this length


@dataclass
class Case:
    op: str
    shape: str
    phase: str                   # "decode" (size = batch, one token each) or "prefill" (size = prompt length)
    size: int
    args: tuple
    bytes: int                   # the least bytes the op reads and writes
    flops: int                   # the least arithmetic (multiply-adds count 2)
    baselines: dict[str, Callable] = field(default_factory=dict)


@dataclass
class Row:
    op: str
    shape: str
    phase: str
    size: int
    kernel: str                  # backend:kernel, or the baseline's name
    levels: str                  # the levels this kernel serves ("" for a baseline)
    us: float
    graphed: bool
    hbm_fraction: float
    tensor_core_fraction: float


def _bf16(*shape: int, device: torch.device) -> torch.Tensor:
    return torch.randn(*shape, device=device).bfloat16()


def _quant_weight(n: int, k: int, fmt: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k, device=device) * k ** -0.5
    return quantize_weight_fp8(w) if fmt == "fp8" else quantize_weight_fp4(w)


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _dense_attention(q: torch.Tensor, keys: torch.Tensor) -> Callable[[], torch.Tensor]:
    """SDPA baseline: each sequence's s*H query rows against one dense shared K=V head of the same key count (the
    work of the sparse op without its gather; a single KV head needs no GQA expansion)."""
    b, s, h, d = q.shape
    q_rows, kv = q.reshape(b, 1, s * h, d), keys[:, None].contiguous()
    return lambda: F.scaled_dot_product_attention(q_rows, kv, kv)


@dataclass
class LayerStorage:
    """One layer's paged KV storage for `b` sequences of equal length, filled with random codes."""
    kv: PagedRows
    keys: PagedRows | None
    block_table: torch.Tensor


def random_layer_storage(c: ModelConfig, b: int, length: int, ratio: int, device: torch.device) -> LayerStorage:
    """Ring rows for b sequences, then a pool where sequence i owns its own blocks (block 0 stays the null block)."""
    nb = blocks_for(length) + 1
    epb = CACHE_BLOCK // ratio
    table = (1 + torch.arange(b * nb, device=device)).view(b, nb).int()
    pool = (b * nb + 1) * epb
    kv = kv_rows(c, b * c.window_size, pool, epb, device)
    kv.codes.copy_(torch.randn(kv.codes.shape, device=device).to(kv.codes.dtype))
    kv.tail.normal_()
    keys = None
    if ratio == CSA_RATIO:
        keys = index_key_rows(c, pool, epb, device)
        keys.codes.copy_(torch.randint(0, 256, keys.codes.shape, device=device, dtype=torch.uint8))
    return LayerStorage(kv, keys, table)


def kv_row_bytes(c: ModelConfig) -> int:
    """Bytes of one cached KV row: FP8 codes and fp32 scales of the non-RoPE dims, bf16 RoPE dims."""
    return c.nope_head_dim + c.nope_head_dim // KV_FP8_BLOCK * 4 + c.rope_head_dim * 2


def _window_rows(b: int, s: int, W: int, device: torch.device) -> torch.Tensor:
    """Each query's window: random ring rows of its own sequence (sequence i owns rows i*W .. i*W + W-1)."""
    return torch.arange(b, device=device).view(b, 1, 1) * W + torch.randint(0, W, (b, s, W), device=device)


def gemm_shapes(c: ModelConfig) -> list[tuple[str, int, int, str]]:
    """(label, N, K, format) of the dense quantised linears of one layer (FP8)."""
    return [("wq_a", c.q_lora_rank, c.dim, "fp8"), ("wq_b", c.n_heads * c.head_dim, c.q_lora_rank, "fp8"),
            ("wkv", c.head_dim, c.dim, "fp8"), ("wo_b", c.dim, c.o_groups * c.o_lora_rank, "fp8"),
            ("shared_w1", c.moe_inter_dim, c.dim, "fp8"), ("shared_w2", c.dim, c.moe_inter_dim, "fp8")]


def cases(c: ModelConfig, phase: str, size: int, context: int, device: torch.device) -> Iterator[Case]:
    """The op cases of one layer: decode at batch `size` over `context` cached tokens, or a prefill of `size`."""
    tokens = size
    b, s = (size, 1) if phase == "decode" else (1, size)

    def case(op, shape, args, nbytes, flops=0, **baselines) -> Case:
        return Case(op, shape, phase, size, args, nbytes, flops, baselines)

    for label, n, k, fmt in gemm_shapes(c):
        weight, scale = _quant_weight(n, k, fmt, device)
        x = _bf16(tokens, k, device=device)
        w16, w8 = _bf16(n, k, device=device), torch.randn(n, k, device=device).to(torch.float8_e4m3fn)
        one = torch.ones((), device=device)
        x8 = torch.zeros(max(16, tokens), k, device=device, dtype=torch.float8_e4m3fn)
        yield case("quant_linear", f"{label} {n}x{k} {fmt}", (x, weight, scale),
            _nbytes(weight, scale, x) + tokens * n * 2, 2 * tokens * n * k,
            cublas_bf16=lambda x=x, w16=w16: x @ w16.T,
            scaled_mm_fp8=lambda x8=x8, w8=w8, one=one: torch._scaled_mm(x8, w8.T, scale_a=one, scale_b=one,
                                                                          out_dtype=torch.bfloat16))

    # routed experts: tokens * top-k rows spread uniformly over the experts (FP4)
    E, k_act = c.n_routed_experts, c.n_activated_experts
    rows = tokens * k_act
    counts = torch.bincount(torch.arange(rows) % E, minlength=E)
    hit = int((counts > 0).sum())
    for label, n, k in (("expert_w1", c.moe_inter_dim, c.dim), ("expert_w2", c.dim, c.moe_inter_dim)):
        experts = [_quant_weight(n, k, c.expert_dtype, device) for _ in range(min(E, 8))]
        weight = torch.stack([experts[e % len(experts)][0] for e in range(E)])
        scale = torch.stack([experts[e % len(experts)][1] for e in range(E)])
        x = _bf16(rows, k, device=device)
        per_expert = _nbytes(weight[0], scale[0])
        w16 = weight[:8].float().bfloat16() if c.expert_dtype == "fp8" else _bf16(8, n, k, device=device)
        starts = [0] + torch.cumsum(counts, 0).tolist()

        def cublas(x=x, w16=w16, starts=starts):
            for e in range(E):
                if starts[e + 1] > starts[e]:
                    x[starts[e]:starts[e + 1]] @ w16[e % 8].T
        yield case("grouped_quant_linear", f"{label} {E}x{n}x{k} {c.expert_dtype}", (x, counts.to(device), weight, scale),
            hit * per_expert + _nbytes(x) + rows * n * 2, 2 * rows * n * k, cublas_bf16=cublas)

    # attention: CSA (window + indexer top-k) and HCA (window + every compressed entry), reading the paged cache
    H, D, W = c.n_heads, c.head_dim, c.window_size
    q = _bf16(b, s, H, D, device=device)
    sink = torch.zeros(H, device=device)
    scale = D ** -0.5
    held = context if phase == "decode" else 0                          # positions cached before this step
    fresh = _bf16(b, s, D, device=device)
    window = _window_rows(b, s, W, device)
    csa = random_layer_storage(c, b, held + s, CSA_RATIO, device)
    n_entries = (held + s) // CSA_RATIO
    n_comp = min(c.index_topk, n_entries)
    selected = csa.kv.entry_rows(csa.block_table, torch.randint(0, max(1, n_entries), (b, s, n_comp), device=device))
    idx = torch.cat([window, selected], dim=-1)
    row = kv_row_bytes(c)
    read = b * s * (W + n_comp) * row if phase == "decode" else b * (held + s) * row
    yield case("sparse_attention", f"csa H={H} D={D} keys={W + n_comp}", (q, csa.kv, fresh, idx, sink, scale),
               2 * _nbytes(q) + _nbytes(idx) + read, 4 * b * s * H * (W + n_comp) * D,
               sdpa=_dense_attention(q, _bf16(b, W + n_comp, D, device=device)))
    hca_ratio = max(r for r in c.compress_ratios)
    hca = random_layer_storage(c, b, held + s, hca_ratio, device)
    n_comp = (held + s) // hca_ratio
    visible = ((held + torch.arange(s, device=device) + 1) // hca_ratio).expand(b, s)
    read = b * s * (W + n_comp) * row if phase == "decode" else b * (W + n_comp) * row
    yield case("hca_attention", f"hca H={H} D={D} keys={W + n_comp}",
               (q, hca.kv, fresh, window, hca.block_table, visible, sink, scale),
               2 * _nbytes(q) + _nbytes(window) + read, 4 * b * s * H * (W + n_comp) * D,
               sdpa=_dense_attention(q, _bf16(b, W + n_comp, D, device=device)))

    # lightning indexer over the visible compressed entries (FP4 keys in the paged pool)
    Hi, Di = c.index_n_heads, c.index_head_dim
    iq = _bf16(b, s, Hi, Di, device=device)
    weights = torch.randn(b, s, Hi, device=device)
    visible = ((held + torch.arange(s, device=device) + 1) // CSA_RATIO).expand(b, s)
    key_bytes = Di // 2 + Di // FP4_BLOCK * 4
    yield case("indexer_topk", f"H={Hi} d={Di} entries={n_entries} k={c.index_topk}",
        (iq, weights, csa.keys, csa.block_table, visible, c.index_topk),
        _nbytes(iq, weights) + b * n_entries * key_bytes, 2 * b * s * Hi * n_entries * Di)

    # the small ops of a layer
    x = _bf16(tokens, c.dim, device=device)
    norm_w = torch.ones(c.dim, device=device)
    yield case("rms_norm", f"{c.dim}", (x, norm_w, c.norm_eps), 2 * _nbytes(x))
    streams = _bf16(tokens, 1, c.hc_mult, c.dim, device=device)
    fn = torch.randn(c.hc_mix_dim, c.hc_mult * c.dim, device=device) * 0.01
    hc_scale, hc_base = torch.ones(3, device=device), torch.zeros(c.hc_mix_dim, device=device)
    yield case("mhc_pre", f"hc={c.hc_mult} d={c.dim}", (streams, fn, hc_scale, hc_base, c.norm_eps, c.hc_eps,
                                                  c.hc_sinkhorn_iters), _nbytes(streams, fn) + _nbytes(x))
    post, comb = torch.rand(tokens, 1, c.hc_mult, device=device), torch.rand(tokens, 1, c.hc_mult, c.hc_mult,
                                                                               device=device)
    yield case("mhc_post", f"hc={c.hc_mult} d={c.dim}", (x.view(tokens, 1, -1), streams, post, comb),
        _nbytes(x) + 2 * _nbytes(streams))
    g, u = _bf16(tokens, c.moe_inter_dim, device=device), _bf16(tokens, c.moe_inter_dim, device=device)
    yield case("swiglu", f"{c.moe_inter_dim}", (g, u, c.swiglu_limit, None), 3 * _nbytes(g))
    gate_w, bias = torch.randn(E, c.dim, device=device) * 0.02, torch.zeros(E, device=device)
    yield case("moe_gate", f"E={E} d={c.dim} k={k_act}", (x, gate_w, bias, None, k_act, c.route_scale),
        _nbytes(x, gate_w), 2 * tokens * E * c.dim)
    order = torch.randperm(rows, device=device)
    yield case("moe_combine", f"k={k_act} d={c.dim}", (_bf16(rows, c.dim, device=device), order, k_act, x),
        (rows + 2 * tokens) * c.dim * 2)
    cos = torch.rand(b, s, 1, c.rope_head_dim // 2, device=device)
    yield case("rope", f"H={H} D={D}", (q, cos, cos, False), 2 * _nbytes(q))
    G = c.o_groups
    o = _bf16(b, s, G, H * D // G, device=device)
    wo_a = _bf16(G, c.o_lora_rank, H * D // G, device=device)
    yield case("linear", f"wo_a grouped {G}x{c.o_lora_rank}x{H * D // G} bf16", (o, wo_a),
        _nbytes(o, wo_a) + b * s * G * c.o_lora_rank * 2, 2 * b * s * G * c.o_lora_rank * H * D // G)


def _time(fn: Callable, args: tuple) -> tuple[float, bool]:
    us, graphed = time_us(lambda: fn(*args), iters=3)
    if us < SLOW_CALL_US:
        us, graphed = time_us(lambda: fn(*args), iters=20)
    return us, graphed


def run(preset_name: str, batches: tuple[int, ...], prefills: tuple[int, ...], context: int,
        levels: tuple[Level, ...], device: str = "cuda", ops: tuple[str, ...] = (),
        progress: Callable[[str], None] = lambda _: None, on_row: Callable[[dict], None] = lambda _: None) -> dict:
    dev = torch.device(device)
    tables = level_tables(dev, levels)
    hw = limits(dev)
    config = preset(preset_name)
    rows: list[Row] = []
    skipped: list[str] = []
    plan = [("decode", n) for n in batches] + [("prefill", n) for n in prefills]
    for phase, size in plan:
        for case in cases(config, phase, size, context, dev):
            if ops and case.op not in ops:
                continue
            progress(f"{case.op} {case.shape} {phase} {size}")
            served: dict[Kernel, list[str]] = {}                        # kernel -> the levels it serves
            for level, table in tables.items():
                served.setdefault(table.kernels[case.op], []).append(level.label)
            timed = {}
            for kernel, level_names in served.items():
                name = f"{kernel.backend}:{kernel.name}"
                if phase == "prefill" and size > EXACT_PREFILL_MAX and kernel.level == Level.EXACT:
                    skipped.append(f"{name} {case.op} {case.shape} prefill {size}: kernels declared exact are timed "
                                   f"on prefills up to {EXACT_PREFILL_MAX} tokens (slow by design; "
                                   "see docs/benchmarks.md)")
                    continue
                timed[name] = (_time(kernel.fn, case.args), ",".join(level_names))
            if size <= COMPOSITE_MAX_TOKENS and all(k.name != "canonical" for k in served):
                timed["composite"] = (_time(getattr(canonical, case.op), case.args), "")
            for name, fn in case.baselines.items():
                try:
                    timed[name] = (_time(fn, ()), "")
                except RuntimeError as e:      # a baseline outside its library's limits is noted, not fatal
                    skipped.append(f"{name} {case.op} {case.shape} {phase} {size}: {str(e).splitlines()[0]}")
            for name, ((us, graphed), level_names) in timed.items():
                seconds = us * 1e-6
                rows.append(Row(case.op, case.shape, phase, size, name, level_names, us, graphed,
                                case.bytes / hw["hbm_bytes_per_s"] / seconds,
                                case.flops / hw["tensor_core_flops"] / seconds))
                on_row(asdict(rows[-1]))
        torch.cuda.empty_cache()           # each phase's inputs differ in size: keep fragmentation down
    return {**hw, "preset": preset_name, "context": context, "rows": [asdict(r) for r in rows], "skipped": skipped}


def table(result: dict) -> str:
    """Rows grouped by case; each kernel's time, fractions of the limits, and its ratio to every baseline."""
    lines = [f"dsv4 bench ops on {result['device']} (torch {result['torch']}, triton {result['triton']}, "
             f"{result['date']}), {result['preset']} dimensions, decode context {result['context']} tokens",
             f"limits measured now: HBM {result['hbm_bytes_per_s'] / 1e12:.2f} TB/s, "
             f"bf16 tensor cores {result['tensor_core_flops'] / 1e12:.0f} TFLOP/s",
             f"{'op':22} {'shape':40} {'phase':7} {'size':>6} {'kernel':24} {'levels':28} {'us':>10} "
             f"{'%HBM':>6} {'%TC':>6}  ratios to baselines"]
    groups: dict[tuple, list[dict]] = {}
    for r in result["rows"]:
        groups.setdefault((r["op"], r["shape"], r["phase"], r["size"]), []).append(r)
    for (op, shape, phase, size), rs in groups.items():
        base = {r["kernel"]: r["us"] for r in rs if not r["levels"]}
        for r in rs:
            ratios = " ".join(f"/{name}={r['us'] / us:.2f}" for name, us in base.items()) if r["levels"] else ""
            lines.append(f"{op:22} {shape[:40]:40} {phase:7} {size:>6} {r['kernel'][:24]:24} {r['levels'][:28]:28} "
                         f"{r['us']:10.1f} {100 * r['hbm_fraction']:6.1f} {100 * r['tensor_core_fraction']:6.1f}  "
                         f"{ratios}{'' if r['graphed'] else ' (eager)'}")
    lines += [f"not timed: {reason}" for reason in result["skipped"]]
    return "\n".join(lines)
