"""What runs where on Ascend: the op -> operator table, the ops that have no operator, and the per-chip capability.

`ENTRIES` is the one source of truth: the backend registers exactly these kernels (in this preference order, before
the canonical floor), and the tables in docs/ascend.md are rendered from them and from the registry's own resolution
(`render`; `python -P -m dsv4.backends.npu.mapping --update docs/ascend.md` rewrites the generated section, and a
test fails when the file is stale). `NO_OPERATOR` says, per op, why no torch-npu operator is used: those ops run as
the canonical composite (registered at `exact`) unless a Triton-Ascend kernel below takes them.
"""
from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dsv4.backends.contracts import CONTRACTS
from dsv4.backends.levels import Level
from dsv4.backends.npu.device import A2, A3, CHIP_NAMES, CHIPS

TORCH_NPU, TORCH, INTEGER, TRITON = "torch_npu", "torch", "integer", "triton-ascend"
OP_PLUGIN_DOCS = "Ascend/op-plugin docs/context"


@dataclass(frozen=True)
class Entry:
    """One registered kernel: which op, what runs on the NPU, for which chips, at which level, under which
    conditions, and where the operator's semantics are documented."""
    op: str
    kernel: str             # the name it is registered under (dsv4 backends, --ops npu:<kernel>)
    target: str             # "module:function" of the kernel
    operator: str
    kind: str               # TORCH_NPU, TORCH, INTEGER or TRITON
    level: Level
    chips: tuple[str, ...]
    conditions: str
    source: str

    def load(self) -> Callable:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)


_NPU = "dsv4.backends.npu"
ENTRIES: list[Entry] = [
    Entry("rms_norm", "npu_rms_norm", f"{_NPU}.fused:rms_norm", "torch_npu.npu_rms_norm", TORCH_NPU, Level.FAST,
          (A2, A3), "x and gamma in fp32 (gamma = ones when unweighted), one cast after; eps passed as epsilon",
          "hiascend torch_npu API reference, npu_rms_norm (A2/A3 listed); vllm-ascend batch_invariant.py"),
    Entry("rope", "npu_rotary_mul", f"{_NPU}.fused:rope", 'torch_npu.npu_rotary_mul(rotary_mode="interleave")',
          TORCH_NPU, Level.FAST, (A2, A3),
          "fp32 BSND view [1, S, N, 2r] with N < 1000, cos/sin repeated per pair as [1, S, 1, 2r], -sin for the "
          "inverse; pass-through dims untouched; one cast after",
          f"{OP_PLUGIN_DOCS}/torch_npu-npu_rotary_mul.md (interleave mode, A2/A3)"),
    Entry("linear", "torch_matmul", f"{_NPU}.fused:linear", "torch.matmul / torch.bmm (aclnnMatmul, cube)", TORCH,
          Level.FAST, CHIPS,
          "operands in the wider dtype, fp32 accumulation, one cast; fp32 relies on torch-npu's default "
          "torch_npu.npu.matmul.allow_hf32 = False",
          f"{OP_PLUGIN_DOCS}/torch_npu-npu-matmul-allow_hf32.md"),
    Entry("quant_linear", "dequant_matmul", f"{_NPU}.fused:quant_linear",
          "bf16 torch.matmul on dequantised operands", TORCH, Level.FAST, CHIPS,
          "no FP8 matmul on A2/A3: weights dequantised to bf16 and activations rounded to the e4m3 grid, both "
          "exact; only the accumulation order differs from the contract; weights dequantised per call",
          "tile-ai/tilelang-ascend#1177 (FP8 matmul on A5 only)"),
    Entry("quant_linear", "integer_block_gemm", f"{_NPU}.exact_gemm:npu_quant_linear",
          "torch_npu.npu_quant_matmul int8 x int8 -> int32 on base-2^7 digits", INTEGER, Level.EXACT, CHIPS,
          "exact block sums without fp64, rounded to fp32 in integer arithmetic; the int32 output is documented "
          "for A2/A3", f"{OP_PLUGIN_DOCS}/torch_npu-npu_quant_matmul.md (table 2, output_dtype int32)"),
    Entry("grouped_quant_linear", "npu_grouped_matmul", f"{_NPU}.fused:grouped_quant_linear",
          "torch_npu.npu_grouped_matmul on dequantised bf16 weights", TORCH_NPU, Level.FAST, (A2, A3),
          "x = [rows], weight = [experts with rows, as [G, K, N]], group_list = their counts (group_list_type=1), "
          "split_item=2, group_type=0; at most 32 experts per call",
          "vllm-ascend ops/fused_moe/moe_mlp.py (unquant_apply_mlp)"),
    Entry("grouped_quant_linear", "integer_block_gemm", f"{_NPU}.exact_gemm:npu_grouped_quant_linear",
          "torch_npu.npu_quant_matmul int8 x int8 -> int32 per expert", INTEGER, Level.EXACT, CHIPS,
          "as quant_linear, one expert's rows at a time",
          f"{OP_PLUGIN_DOCS}/torch_npu-npu_quant_matmul.md (table 2, output_dtype int32)"),
    Entry("fake_quant", "integer_e4m3", f"{_NPU}.e4m3:fake_quant", "integer rounding on the IEEE bits", INTEGER,
          Level.EXACT, CHIPS, "no float8 dtype needed (torch-npu refuses float8 tensors on A2/A3); fp4 as canonical",
          "xLLM-AI/xllm#1427 (Float8_e4m3fn has not been supported)"),
    Entry("swiglu", "npu_swiglu", f"{_NPU}.fused:swiglu", "torch_npu.npu_swiglu", TORCH_NPU, Level.FAST, (A2, A3),
          "clamps (gate above, up both sides) applied before, fp32 in and out, route weight after, one cast",
          "hiascend torch_npu API reference, npu_swiglu (A2 listed); vllm-ascend ops/fused_moe/moe_mlp.py; "
          "MindSpeed-LLM fused_swiglu_with_limit"),
    Entry("compress_pool", "triton_compress_pool", "dsv4.kernels.compress_pool:compress_pool",
          "Triton-Ascend kernel kernels/compress_pool.py", TRITON, Level.BATCH_INVARIANT, CHIPS,
          "only when triton-ascend is importable with an NPU target; one program per (row, channel block); written "
          "in the canonical order (exact on the H100), declared batch-invariant until verified on Ascend",
          "kernels/compress_pool.py"),
    Entry("mhc_pre", "triton_mhc_pre", "dsv4.kernels.mhc:mhc_pre",
          "Triton-Ascend kernel kernels/mhc.py", TRITON, Level.FAST, CHIPS,
          "only when triton-ascend is importable with an NPU target; one program per token: mixes, Sinkhorn, "
          "collapse; written in the canonical order (exact on the H100), declared fast until verified on Ascend",
          "kernels/mhc.py"),
]

NO_OPERATOR: dict[str, str] = {
    "fake_quant": "torch-npu's quantisation operators (npu_quantize, npu_dynamic_quant) produce int8 with their own "
                  "scales, not e4m3 with power-of-two block scales; A2/A3 have no float8 dtype",
    "hadamard": "torch-npu has no Walsh-Hadamard operator (SGLang's NPU compressor fuses one in a custom op)",
    "encode_rows": "the paged cache's storage form (e4m3 bytes, packed e2m1, power-of-two block scales) has no "
                   "torch-npu operator; the canonical composite needs a float8 dtype, which A2/A3 lack (docs/ascend.md)",
    "compress_pool": "V4's compressor is vllm-ascend's custom op _C_ascend.compressor, not in torch-npu",
    "indexer_topk": "npu_lightning_indexer scores in low precision with unspecified tie order; the contract "
                    "requires the exact index set (ties to the lower index, ascending) at every level",
    "sparse_attention": "npu_sparse_flash_attention (V3.2) has no attention sink; V4's sink attention is "
                        "vllm-ascend's custom op _C_ascend.npu_sparse_attn_sharedkv",
    "hca_attention": "as sparse_attention",
    "mhc_pre": "mHC is vllm-ascend's custom op _C_ascend.npu_hc_pre_v, not in torch-npu",
    "mhc_post": "mHC is vllm-ascend's custom op _C_ascend.npu_hc_post, not in torch-npu",
    "mhc_head": "no torch-npu operator for the stream collapse",
    "moe_gate": "npu_moe_gating_top_k scores with softmax or sigmoid only (norm_type 0/1; on A2/A3 also 256 experts "
                "and k_group=4 only); sqrt(softplus) is only in vllm-ascend's custom moe_gating_top_k_hash",
    "moe_dispatch": "the order is exact by contract (stable sort by expert); the canonical stable sort and bincount "
                    "already run natively",
    "moe_combine": "npu_moe_distribute_combine is an expert-parallel collective; the local combine is a gather and "
                   "an ordered sum (canonical)",
    "ep_combine": "npu_moe_distribute_combine does not specify its summation order; the canonical all-gather of "
                  "rows (HCCL on NPUs, pinned by distributed_env) and the local ordered combine are used",
    "sample": "exact by contract (counter-based generator); canonical",
}


def entries_for(chip: str | None, triton: bool) -> list[Entry]:
    """The entries a backend registers on `chip` (None: no NPU visible, so only entries every chip has), Triton
    kernels only when Triton-Ascend is usable."""
    return [e for e in ENTRIES
            if (chip in e.chips if chip else set(CHIPS) <= set(e.chips)) and (triton or e.kind != TRITON)]


def capability(chip: str, triton: bool) -> dict[str, dict[Level, str]]:
    """op -> level -> the kernel the registry picks for the npu backend on `chip`, by the registry's own resolution.
    The kernels are registered by name and level only (their modules are not imported: Triton need not be here);
    each stands in as the canonical function, which has the contract's parameters that resolution checks."""
    from dsv4.backends.canonical import ops as canonical
    from dsv4.backends.registry import Backend, Registry, add_canonical_kernels

    backend = Backend(name="npu", device_types=("npu",))
    for entry in entries_for(chip, triton):
        backend.add(entry.op, getattr(canonical, entry.op), entry.level, entry.kernel)
    add_canonical_kernels(backend)
    registry = Registry()
    registry.add_backend(backend)
    table: dict[str, dict[Level, str]] = {op: {} for op in CONTRACTS}
    for level in Level:
        for op, kernel in registry.resolve("npu", level, check_available=False).kernels.items():
            table[op][level] = kernel.name
    return table


# -- docs ---------------------------------------------------------------------------------------------------------
BEGIN = "<!-- generated by `python -P -m dsv4.backends.npu.mapping --update docs/ascend.md`: do not edit below -->"
END = "<!-- end of generated tables -->"


def _mapping_table() -> list[str]:
    lines = ["| op | kernel | runs on the NPU as | kind | level | chips | conditions | source |",
             "|---|---|---|---|---|---|---|---|"]
    for e in ENTRIES:
        lines.append(f"| {e.op} | `{e.kernel}` | {e.operator} | {e.kind} | {e.level.label} | "
                     f"{', '.join(e.chips)} | {e.conditions} | {e.source} |")
    return lines


def _capability_table(chip: str) -> list[str]:
    with_triton, without = capability(chip, True), capability(chip, False)
    lines = [f"**{CHIP_NAMES[chip]}**", "",
             "| op | " + " | ".join(level.label for level in Level) + " |", "|---|" + "---|" * len(Level)]
    for op in CONTRACTS:
        cells = []
        for level in Level:
            a, b = with_triton[op][level], without[op][level]
            cells.append(f"`{a}`" if a == b else f"`{a}` (without Triton-Ascend: `{b}`)")
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return lines


def render() -> str:
    """The generated section of docs/ascend.md: the mapping, the ops without an operator, one capability table per
    chip."""
    lines = [BEGIN, "", "### Op -> operator", "", *_mapping_table(), "", "### Ops with no torch-npu operator", "",
             "| op | why | runs as |", "|---|---|---|"]
    for op, why in NO_OPERATOR.items():
        own = [e for e in ENTRIES if e.op == op]
        if any(e.kind == TRITON for e in own):
            runs = "Triton-Ascend kernel when available, else the canonical composite"
        elif own:
            runs = " then ".join(f"`{e.kernel}` ({e.kind}, {e.level.label})" for e in own)
        else:
            runs = "the canonical composite"
        lines.append(f"| {op} | {why} | {runs} |")
    lines += ["", "### Capability per chip (kernel the registry picks at each level)", ""]
    for chip in CHIPS:
        lines += [*_capability_table(chip), ""]
    return "\n".join(lines + [END])


def update(path: Path) -> None:
    """Rewrite the generated section of `path` between the BEGIN and END markers."""
    text = path.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    path.write_text(head + render() + tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", type=Path, help="rewrite the generated section of this markdown file")
    args = parser.parse_args()
    if args.update:
        update(args.update)
    else:
        print(render())


if __name__ == "__main__":
    main()
