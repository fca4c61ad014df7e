"""Conformance: check every kernel a backend declares against the level it claims, per op and for the whole model.

Nothing is taken on trust. For a backend on a device at a level, `verify` runs:
- per op case: numerics against the CPU reference (within the contract's tolerance; bit for bit at `exact`), the
  same bits run to run (`deterministic`), one row alone against the same row inside batches of several sizes and
  positions (`batch-invariant`), and the golden digest made by the CPU reference (`exact`);
- per small preset (random weights from the portable generator): prefill logits against the reference, repeat runs,
  a prompt alone against the same prompt prefilled in a batch, decoded among other requests of other lengths and
  prefilled in chunks, and golden digests of logits and greedy tokens;
- a device arithmetic probe: IEEE basics, subnormals, FMA contraction, fp64 availability.

Inputs come from the counter-based generator, so every machine builds the same bits. A report is JSON plus a table;
two reports from different machines are compared check by check with `compare`.
"""
from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from dsv4 import validate
from dsv4.backends import contracts
from dsv4.backends.canonical.primitives import counter_uniform
from dsv4.backends.levels import Level
from dsv4.backends.registry import OpTable, Registry, default_registry
from dsv4.errors import DSV4Error
from dsv4.formats import quantize_weight_fp4, quantize_weight_fp8

GOLDEN_FILE = Path(__file__).parent / "golden" / "digests.json"
DEFAULT_PRESETS = ("tiny",)
BATCH_SIZES = (2, 5, 9)                         # batch-invariance: a row alone vs inside batches of these sizes
BATCH_TARGETS = (4242, 4243, 4244)                # the rows checked that way
# Fast level, whole model: rms(logits - ref) <= this * rms(ref). Random weights amplify rounding: 0.3% noise on every
# quantised GEMM output moves the tiny preset's logits by 12-16% RMS (measured), while a wrong kernel (layout, scale,
# index) moves them by ~100% or more. So this catches broken kernels, not small numeric drift; the op checks bound that.
MODEL_LOGITS_TOLERANCE = 0.5
ProgressCallback = Callable[[str, int, int], None]
CHECK_STATUSES = ("pass", "fail", "skip")


# -- checks and reports --------------------------------------------------------------------------------------------
@dataclass
class Check:
    name: str           # "op/<case>/<kind>", "model/<preset>/<kind>" or "probe/<kind>"
    status: str         # one of CHECK_STATUSES: "pass", "fail" or "skip"
    detail: str = ""
    digest: str = ""    # of the outputs this check saw, so reports from two machines can be compared


@dataclass
class Report:
    backend: str
    device: str
    level: str
    environment: dict
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0
    kernels: dict[str, str] = field(default_factory=dict)   # op -> "backend:kernel (declared level)" checked

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def load(cls, path: str | Path) -> "Report":
        """A report written by `dsv4 verify --report`, checked against this schema; errors name the field."""
        try:
            data = json.loads(validate.read_text(path, "report"))
        except json.JSONDecodeError as e:
            raise DSV4Error(f"{path} is not a dsv4 verify report: not valid JSON: {e}") from None
        report = validate.from_json(cls, data, f"report {path}")
        for i, check in enumerate(report.checks):
            if check.status not in CHECK_STATUSES:
                raise DSV4Error(f"report {path}: field 'checks'[{i}]: status {check.status!r} is not one of "
                                f"{', '.join(CHECK_STATUSES)}")
        return report

    def table(self) -> str:
        lines = [f"dsv4 verify: backend {self.backend} on {self.device} at level {self.level} "
                 f"({self.environment.get('torch')}, {self.environment.get('device_name')})"]
        width = max((len(c.name) for c in self.checks), default=10)
        for c in self.checks:
            lines.append(f"  {c.status.upper():4}  {c.name:{width}}  {c.detail}")
        counts = {s: sum(c.status == s for c in self.checks) for s in CHECK_STATUSES}
        lines.append(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped "
                     f"in {self.seconds:.1f}s: {'OK' if self.ok else 'FAILED'}")
        return "\n".join(lines)


def compare(a: Report, b: Report) -> list[str]:
    """Differences between two reports, check by check: status, or the digest of what the check saw."""
    diffs = []
    first, second = {c.name: c for c in a.checks}, {c.name: c for c in b.checks}
    for name in sorted(set(first) | set(second)):
        x, y = first.get(name), second.get(name)
        if x is None or y is None:
            diffs.append(f"{name}: only in {'first' if y is None else 'second'} report")
        elif x.status != y.status:
            diffs.append(f"{name}: {x.status} vs {y.status}")
        elif x.digest and y.digest and x.digest != y.digest:
            diffs.append(f"{name}: outputs differ ({x.digest[:12]} vs {y.digest[:12]})")
    return diffs


def digest(*outputs) -> str:
    """sha256 over shapes, dtypes and bytes of tensors (NaNs normalised: their bit patterns differ by device)."""
    h = hashlib.sha256()
    for t in _flatten(outputs):
        t = t.detach().cpu().contiguous()
        if t.is_floating_point():
            t = torch.where(torch.isnan(t), torch.full_like(t, float("nan")), t)
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _flatten(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _flatten(item)]
    return []


def _same_bits(a, b) -> bool:
    return digest(a) == digest(b)


def _within(out, ref, atol: float, rtol: float) -> tuple[bool, str]:
    worst = 0.0
    for o, r in zip(_flatten(out), _flatten(ref)):
        o, r = o.detach().cpu(), r.detach().cpu()
        if o.shape != r.shape or o.dtype != r.dtype:
            return False, f"shape/dtype {tuple(o.shape)} {o.dtype} vs reference {tuple(r.shape)} {r.dtype}"
        if not o.is_floating_point():
            if not torch.equal(o, r):
                return False, "integer outputs differ"
            continue
        o, r = o.double(), r.double()
        finite = torch.isfinite(r)
        if not torch.equal(torch.isfinite(o), finite) or not torch.equal(o[~finite], r[~finite]):
            return False, "non-finite values differ"
        excess = ((o - r).abs() - (atol + rtol * r.abs()))[finite]
        if excess.numel() and excess.max() > 0:
            return False, f"max error beyond tolerance by {excess.max().item():.3g}"
        if finite.any():
            worst = max(worst, (o - r).abs()[finite].max().item())
    return True, f"max abs error {worst:.3g}"


# -- deterministic inputs ------------------------------------------------------------------------------------------
def uniform(seed: int, shape: tuple[int, ...], low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    """fp32 values in (low, high) from the counter-based generator: the same on every machine."""
    u = counter_uniform(seed, torch.tensor([0]), torch.tensor([0]), max(1, math.prod(shape)), "cpu")[0]
    return (u[:math.prod(shape)] * (high - low) + low).view(shape)


def _rows(seeds: list[int], shape: tuple[int, ...], low=-1.0, high=1.0, dtype=torch.float32) -> torch.Tensor:
    return torch.stack([uniform(s, shape, low, high) for s in seeds]).to(dtype)


@dataclass
class OpCase:
    """Sample inputs for one op: `build(row_seeds)` returns the args of a batch whose row i is made from row_seeds[i]
    alone (and shared args made from fixed seeds). `row_outputs` says whether output dim 0 is that row."""
    name: str
    op: str
    build: Callable[[list[int]], tuple]
    row_outputs: bool = True


def _op_cases() -> list[OpCase]:
    bf = torch.bfloat16
    w8, s8 = quantize_weight_fp8(uniform(11, (192, 256), -0.1, 0.1))
    w4, s4 = quantize_weight_fp4(uniform(12, (128, 256), -0.1, 0.1))
    ew4 = [quantize_weight_fp4(uniform(20 + e, (64, 256), -0.1, 0.1)) for e in range(4)]
    gw, gs = torch.stack([w for w, _ in ew4]), torch.stack([s for _, s in ew4])

    def angles(seeds):
        a = _rows(seeds, (1, 32), 0, 6.283).double()
        return a.cos().float(), a.sin().float()

    def grouped(seeds):   # rows sorted by their expert (seed % 4), as the dispatch would hand them over
        order = sorted(range(len(seeds)), key=lambda i: seeds[i] % 4)
        counts = torch.bincount(torch.tensor([seeds[i] % 4 for i in order], dtype=torch.int64), minlength=4)
        return _rows([seeds[i] for i in order], (256,), -3, 3, bf), counts, gw, gs

    def indexer(seeds):
        n_visible = torch.tensor([[3 + s % 37] for s in seeds])
        return (_rows(seeds, (1, 4, 128), -1, 1, bf), _rows([s + 1 for s in seeds], (1, 4), 0, 1),
                _rows([s + 2 for s in seeds], (40, 128), -1, 1, bf), n_visible, 8)

    def attention_idx(seeds, n_keys, width):
        idx = (_rows(seeds, (1, width), 0, n_keys) ).long()
        return torch.where(_rows([s + 9 for s in seeds], (1, width), 0, 1) < 0.2, -1, idx)

    def experts(seeds, k=2, e=8):   # k distinct experts per row, from the portable generator
        return torch.stack([torch.argsort(uniform(s, (e,)), stable=True)[:k] for s in seeds])

    sink = uniform(5, (4,), -1, 1)
    return [
        OpCase("rms_norm", "rms_norm", lambda s: (_rows(s, (256,), -3, 3, bf), uniform(1, (256,), 0.5, 1.5), 1e-6)),
        OpCase("rms_norm_unweighted_fp32", "rms_norm", lambda s: (_rows(s, (256,), -3, 3), None, 1e-6)),
        OpCase("rope", "rope", lambda s: (_rows(s, (4, 128), -2, 2, bf), *angles(s), False)),
        OpCase("rope_inverse", "rope", lambda s: (_rows(s, (4, 128), -2, 2, bf), *angles(s), True)),
        OpCase("hadamard", "hadamard", lambda s: (_rows(s, (2, 128), -2, 2, bf),)),
        OpCase("fake_quant_fp8", "fake_quant", lambda s: (_rows(s, (448,), -5, 5, bf), "fp8", 64)),
        OpCase("fake_quant_fp4", "fake_quant", lambda s: (_rows(s, (128,), -5, 5, bf), "fp4", 32)),
        OpCase("linear_bf16", "linear", lambda s: (_rows(s, (256,), -1, 1, bf), uniform(2, (96, 256), -.1, .1).to(bf))),
        OpCase("linear_fp32", "linear", lambda s: (_rows(s, (256,), -1, 1, bf).float(), uniform(3, (40, 256), -.1, .1))),
        OpCase("linear_grouped", "linear",
               lambda s: (_rows(s, (2, 128), -1, 1, bf), uniform(4, (2, 64, 128), -.1, .1).to(bf))),
        OpCase("quant_linear_fp8", "quant_linear", lambda s: (_rows(s, (256,), -3, 3, bf), w8, s8)),
        OpCase("quant_linear_fp4", "quant_linear", lambda s: (_rows(s, (256,), -3, 3, bf), w4, s4)),
        OpCase("grouped_quant_linear_fp4", "grouped_quant_linear", grouped),
        OpCase("compress_pool", "compress_pool", lambda s: (
            _rows(s, (8, 128), -2, 2),
            torch.where(torch.arange(8)[None, :, None] < torch.tensor([x % 3 for x in s])[:, None, None],
                        float("-inf"), _rows([x + 1 for x in s], (8, 128), -3, 3)))),
        OpCase("indexer_topk", "indexer_topk", indexer),
        OpCase("sparse_attention", "sparse_attention", lambda s: (
            _rows(s, (1, 4, 128), -1, 1, bf), _rows([x + 1 for x in s], (80, 128), -2, 2, bf),
            torch.cat([torch.zeros(len(s), 1, 1, dtype=torch.long), attention_idx(s, 80, 23)], -1), sink, 128 ** -0.5)),
        OpCase("hca_attention", "hca_attention", lambda s: (
            _rows(s, (1, 4, 128), -1, 1, bf), _rows([x + 1 for x in s], (48, 128), -2, 2, bf),
            torch.cat([torch.zeros(len(s), 1, 1, dtype=torch.long), attention_idx(s, 17, 15)], -1), 17,
            torch.tensor([[x % 32] for x in s]), sink, 128 ** -0.5)),
        OpCase("mhc_pre", "mhc_pre", lambda s: (
            _rows(s, (1, 4, 256), -2, 2, bf), uniform(6, (24, 1024), -.05, .05), uniform(7, (3,), 0.5, 1.5),
            uniform(8, (24,), -1, 1), 1e-6, 1e-6, 20)),
        OpCase("mhc_post", "mhc_post", lambda s: (
            _rows(s, (1, 256), -2, 2, bf), _rows([x + 1 for x in s], (1, 4, 256), -2, 2, bf),
            _rows([x + 2 for x in s], (1, 4), 0, 2), _rows([x + 3 for x in s], (1, 4, 4), 0, 1))),
        OpCase("mhc_head", "mhc_head", lambda s: (
            _rows(s, (1, 4, 256), -2, 2, bf), uniform(9, (4, 1024), -.05, .05), uniform(10, (1,), 0.5, 1.5),
            uniform(13, (4,), -1, 1), 1e-6, 1e-6)),
        OpCase("moe_gate_scored", "moe_gate", lambda s: (
            _rows(s, (256,), -2, 2, bf), uniform(14, (8, 256), -.1, .1), uniform(15, (8,), -.1, .1), None, 2, 1.5)),
        OpCase("moe_gate_hashed", "moe_gate", lambda s: (
            _rows(s, (256,), -2, 2, bf), uniform(14, (8, 256), -.1, .1), None, experts(s), 2, 1.5)),
        OpCase("moe_dispatch", "moe_dispatch", lambda s: (experts(s), 8), row_outputs=False),
        OpCase("swiglu", "swiglu", lambda s: (
            _rows(s, (128,), -14, 14, bf), _rows([x + 1 for x in s], (128,), -14, 14, bf), 10.0,
            _rows([x + 2 for x in s], (), 0, 1))),
        OpCase("moe_combine", "moe_combine", lambda s: (
            _rows(s, (2, 256), -2, 2, bf).flatten(0, 1), torch.arange(2 * len(s)), 2,
            _rows([x + 1 for x in s], (256,), -2, 2, bf))),
        # One process: the collective is checked across processes by tests/test_expert_parallel.py.
        OpCase("ep_combine", "ep_combine", lambda s: (
            _rows(s, (2, 256), -2, 2, bf).flatten(0, 1), torch.arange(2 * len(s)), torch.tensor([2 * len(s)]), 2,
            _rows([x + 1 for x in s], (256,), -2, 2, bf), None)),
        OpCase("sample", "sample", lambda s: (
            _rows(s, (260,), -4, 4), torch.tensor([(0.0, 0.7, 1.3)[x % 3] for x in s]),
            torch.tensor([(1.0, 0.9, 0.5)[x % 3] for x in s]), 1234, torch.tensor(s), torch.tensor([x * 7 for x in s]))),
    ]


OP_CASES = {case.name: case for case in _op_cases()}


def _to(args: tuple, device: torch.device) -> tuple:
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def _row(out, i: int):
    if isinstance(out, (tuple, list)):
        return tuple(_row(o, i) for o in out)
    return out[i]


# -- op checks -----------------------------------------------------------------------------------------------------
def check_op(case: OpCase, table: OpTable, reference: OpTable, device: torch.device, level: Level,
             golden: dict[str, str]) -> list[Check]:
    kernel = table.kernels[case.op]
    fn, name = kernel.fn, f"op/{case.name}"
    seeds = [101, 202, 303]
    args = case.build(seeds)
    ref = reference.kernels[case.op].fn(*args)
    try:
        out = fn(*_to(args, device))
    except Exception as e:
        return [Check(f"{name}/reference", "fail", f"{kernel.backend}:{kernel.name} raised {type(e).__name__}: {e}")]
    checks = []
    contract = contracts.contract(case.op)
    if level >= Level.EXACT or contract.exact_only_output:
        ok = _same_bits(out, ref)
        checks.append(Check(f"{name}/reference", "pass" if ok else "fail",
                            "bit-identical to the CPU reference" if ok else "bits differ from the CPU reference",
                            digest(out)))
    else:
        ok, detail = _within(out, ref, contract.atol, contract.rtol)
        checks.append(Check(f"{name}/reference", "pass" if ok else "fail", detail, digest(out)))
    if level >= Level.DETERMINISTIC:
        again = fn(*_to(args, device))
        ok = _same_bits(out, again)
        checks.append(Check(f"{name}/repeat", "pass" if ok else "fail",
                            "same bits on a second run" if ok else "a second run gave other bits"))
    if level >= Level.BATCH_INVARIANT and case.row_outputs:
        checks.append(_batch_invariance(case, fn, device, name))
    if level >= Level.EXACT:
        want = golden.get(name)
        got = digest(out)
        status = "fail" if want is None or want != got else "pass"
        detail = "matches the golden digest" if status == "pass" else (
            "no golden digest recorded" if want is None else f"golden {want[:12]} != {got[:12]}")
        checks.append(Check(f"{name}/golden", status, detail, got))
    return checks


def _batch_invariance(case: OpCase, fn: Callable, device: torch.device, name: str) -> Check:
    """Several target rows, each alone and then inside batches of other rows at the first, middle and last place."""
    for target in BATCH_TARGETS:
        alone_row = _row(fn(*_to(case.build([target]), device)), 0)
        for size in BATCH_SIZES:
            for where in sorted({0, size // 2, size - 1}):
                seeds = [7000 + 13 * size + i for i in range(size)]
                seeds[where] = target
                out = fn(*_to(case.build(seeds), device))
                if not _same_bits(_row(out, _rows_position(case, seeds, target)), alone_row):
                    return Check(f"{name}/batch-invariance", "fail",
                                 f"row {target} differs inside a batch of {size} at position {where}")
    return Check(f"{name}/batch-invariance", "pass",
                 f"{len(BATCH_TARGETS)} rows identical alone and in batches of {BATCH_SIZES}")


def _rows_position(case: OpCase, seeds: list[int], target: int) -> int:
    if case.op == "grouped_quant_linear":   # rows are sorted by expert, stably
        order = sorted(range(len(seeds)), key=lambda i: seeds[i] % 4)
        return order.index(seeds.index(target))
    return seeds.index(target)


# -- whole-model checks --------------------------------------------------------------------------------------------
MODEL_PROMPTS = ((256, *b"def add(a, b):\n    return a + b\n"), (256, *b"import os\nprint(os.getcwd())"),
                 (256, *b"x"))


def check_model(preset: str, backend: str, device: torch.device, level: Level, golden: dict[str, str],
                registry: Registry) -> list[Check]:
    from dsv4.api import load, preset_checkpoint
    from dsv4.engine import Request

    path = preset_checkpoint(preset)
    name = f"model/{preset}"
    pipe = load(path, device=str(device), determinism=level, backend=backend, registry=registry)
    ref = load(path, device="cpu", determinism=Level.EXACT, backend="cpu", registry=registry)
    prompts = [list(p) for p in MODEL_PROMPTS]
    checks = []

    def prefill(p, prompt, chunk=None):
        return p.engine(prefill_chunk=chunk).prefill(prompt, 0, all_logits=True)[0].cpu()

    out = [prefill(pipe, p) for p in prompts]
    want = [prefill(ref, p) for p in prompts]
    if level >= Level.EXACT:
        ok = _same_bits(out, want)
        checks.append(Check(f"{name}/prefill-reference", "pass" if ok else "fail",
                            "logits bit-identical to the CPU reference" if ok else "logits differ from the CPU reference",
                            digest(out)))
    else:
        rms = lambda t: t.double().pow(2).mean().sqrt().item()
        err = max(rms(o - w) / rms(w) for o, w in zip(out, want))
        ok = err <= MODEL_LOGITS_TOLERANCE and all(torch.isfinite(o).all() for o in out)
        checks.append(Check(f"{name}/prefill-reference", "pass" if ok else "fail",
                            f"rms logit error {err:.3g} of rms logit (tolerance {MODEL_LOGITS_TOLERANCE})", digest(out)))

    requests = [Request(p, max_new_tokens=6, request_id=i) for i, p in enumerate(prompts)]
    alone = [pipe.engine(max_batch=1).generate([r], record_logits=True)[0] for r in requests]
    gen_digest = digest([torch.tensor(r.tokens) for r in alone], [torch.stack(r.logits) for r in alone])
    if level >= Level.DETERMINISTIC:
        again = [prefill(pipe, p) for p in prompts]
        ok = _same_bits(out, again)
        checks.append(Check(f"{name}/repeat", "pass" if ok else "fail",
                            "same logits on a second run" if ok else "a second run gave other logits"))
    if level >= Level.BATCH_INVARIANT:
        checks += _model_batch_invariance(pipe, prompts, requests, alone, out, name)
    if level >= Level.EXACT:
        ref_tokens = [ref.engine(max_batch=1).generate([r])[0].tokens for r in requests]
        ok = [r.tokens for r in alone] == ref_tokens
        checks.append(Check(f"{name}/generation-reference", "pass" if ok else "fail",
                            "greedy tokens equal to the CPU reference" if ok else "greedy tokens differ", gen_digest))
        for kind, got in (("prefill", digest(out)), ("generation", gen_digest)):
            want_digest = golden.get(f"{name}/{kind}")
            status = "pass" if want_digest == got else "fail"
            detail = "matches the golden digest" if status == "pass" else (
                "no golden digest recorded" if want_digest is None else f"golden {want_digest[:12]} != {got[:12]}")
            checks.append(Check(f"{name}/{kind}-golden", status, detail, got))
    return checks


def _model_batch_invariance(pipe, prompts, requests, alone, prefills, name) -> list[Check]:
    checks = []
    # 1. the same prompt prefilled inside a batch of equal-length prompts
    target = prompts[0]
    others = [[(t * 7 + i) % 256 for t in target] for i in range(3)]
    engine = pipe.engine(max_batch=4)
    for slot in range(4):
        engine.cache.reset(slot)
    batch = torch.tensor([others[0], target, others[1], others[2]])
    logits = engine.forward(batch, [0] * 4, [0, 1, 2, 3], all_logits=True)[1].cpu()
    ok = _same_bits(logits, prefills[0])
    checks.append(Check(f"{name}/batch-invariance-prefill", "pass" if ok else "fail",
                        "prefill logits identical alone and in a batch of 4" if ok else "prefill logits differ in a batch"))
    # 2. decoding among other requests of other lengths, batches of 2 and all 3, at every generated position
    bad = []
    for size in (2, len(requests)):
        together = pipe.engine(max_batch=size).generate(requests, record_logits=True)
        for r, a in zip(together, alone):
            if r.tokens != a.tokens or not _same_bits(r.logits, a.logits):
                bad.append(f"request {r.request.request_id} in batches of {size}")
    checks.append(Check(f"{name}/batch-invariance-decode", "fail" if bad else "pass",
                        "; ".join(bad) or "every decode step identical alone and in batches of 2 and 3"))
    # 3. chunked prefill
    bad = [str(chunk) for chunk in (1, 5, 16)
           if not _same_bits(pipe.engine(prefill_chunk=chunk).prefill(prompts[0], 0, all_logits=True)[0].cpu(),
                             prefills[0])]
    checks.append(Check(f"{name}/batch-invariance-chunked-prefill", "fail" if bad else "pass",
                        f"logits differ with chunks of {', '.join(bad)}" if bad else
                        "logits identical at every position with chunks of 1, 5 and 16"))
    return checks


# -- device arithmetic probe ---------------------------------------------------------------------------------------
def probe_device(device: torch.device, level: Level) -> list[Check]:
    """Does the device do what the canonical composite assumes: IEEE +-*/ on fp32 with subnormals, no FMA
    contraction in eager elementwise ops, fp64 matrix multiply for the block-exact GEMM?"""
    strict = level >= Level.EXACT
    checks = []
    a = uniform(31, (4096,), -1e3, 1e3)
    b = uniform(32, (4096,), -1e3, 1e3)
    tiny = torch.tensor([1e-40, -3e-39, 1.4e-45, 1.1754942e-38])
    a = torch.cat([a, tiny, tiny * 3]); b = torch.cat([b, torch.full((4,), 0.5), torch.full((4,), 2.0)])
    da, db = a.to(device), b.to(device)
    results = {"add": (da + db, a + b), "mul": (da * db, a * b), "div": (da / db, a / b), "sub": (da - db, a - b)}
    bad = [op for op, (x, y) in results.items() if not _same_bits(x, y)]
    checks.append(Check("probe/ieee-basic-ops", "fail" if bad and strict else ("skip" if bad else "pass"),
                        f"differ from the CPU: {', '.join(bad)}" if bad else "+ - * / bit-identical to the CPU"))
    sub = (torch.tensor([1e-40], device=device) * torch.tensor([0.5], device=device)).item()
    ok = sub != 0.0
    checks.append(Check("probe/subnormals", "pass" if ok else ("fail" if strict else "skip"),
                        "subnormal results kept" if ok else "subnormals are flushed to zero"))
    x, y, z = uniform(33, (4096,), -2, 2).to(device), uniform(34, (4096,), -2, 2).to(device), uniform(35, (4096,), -2, 2).to(device)
    fused = (x.double() * y.double() + z.double()).float()
    separate = ((x.cpu() * y.cpu()) + z.cpu())
    eager = x * y + z
    ok = _same_bits(eager, separate)
    contracted = not ok and _same_bits(eager, fused)
    checks.append(Check("probe/fma-contraction", "pass" if ok else ("fail" if strict else "skip"),
                        "eager a*b+c rounds twice, as the contract needs" if ok else
                        ("eager a*b+c is contracted into an FMA" if contracted else "eager a*b+c differs from the CPU")))
    try:
        m = torch.arange(16, dtype=torch.float64, device=device).view(4, 4)
        ok = torch.equal((m @ m).cpu(), torch.arange(16, dtype=torch.float64).view(4, 4) @
                         torch.arange(16, dtype=torch.float64).view(4, 4))
        detail = "fp64 matmul available" if ok else "fp64 matmul gives wrong results"
    except Exception as e:
        ok, detail = False, f"no fp64 matmul ({type(e).__name__}); the canonical quant_linear needs an integer path"
    checks.append(Check("probe/fp64-matmul", "pass" if ok else ("fail" if strict else "skip"), detail))
    return checks


# -- driver --------------------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "device_name": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d")}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        try:
            import triton
            env["triton"] = triton.__version__
        except ImportError:
            pass
    return env


def load_golden(path: Path = GOLDEN_FILE) -> dict[str, str]:
    if not path.exists():
        return {}
    return json.loads(path.read_text())["digests"]


def verify(backend: str, device: str | None = None, level: Level | str = Level.EXACT,
           presets: tuple[str, ...] = DEFAULT_PRESETS, registry: Registry | None = None,
           golden: dict[str, str] | None = None, progress: ProgressCallback | None = None) -> Report:
    """Run every check for `backend` on `device` (default: the backend's first device type) at `level`."""
    registry = registry or default_registry()
    b = registry.backend(backend)
    level = Level.parse(level)
    dev = torch.device(device or b.device_types[0])
    table = registry.resolve(b, level)             # refuses at once if a kernel does not declare the level
    reference = registry.resolve("cpu", Level.EXACT)
    golden = load_golden() if golden is None else golden
    report = Report(backend, str(dev), level.label, environment(dev), kernels=table.describe())
    start = time.perf_counter()
    report.checks += probe_device(dev, level)
    cases = list(OP_CASES.values())
    for i, case in enumerate(cases):
        report.checks += check_op(case, table, reference, dev, level, golden)
        if progress:
            progress("verify ops", i + 1, len(cases))
    for i, preset in enumerate(presets):
        report.checks += check_model(preset, b.name, dev, level, golden, registry)
        if progress:
            progress("verify models", i + 1, len(presets))
    report.seconds = time.perf_counter() - start
    return report


def regenerate_golden(presets: tuple[str, ...] = DEFAULT_PRESETS, path: Path = GOLDEN_FILE,
                      registry: Registry | None = None) -> dict[str, str]:
    """Maintainer command: recompute the golden digests with the CPU reference at `exact` and write them."""
    report = verify("cpu", "cpu", Level.EXACT, presets, registry=registry, golden={})
    digests = {}
    for c in report.checks:
        if c.name.endswith("/golden"):
            digests[c.name.rsplit("/", 1)[0]] = c.digest
        elif c.name.endswith("-golden"):
            digests[c.name[:-len("-golden")]] = c.digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"generated_by": f"cpu reference, torch {torch.__version__}",
                                "digests": dict(sorted(digests.items()))}, indent=1) + "\n")
    return digests
