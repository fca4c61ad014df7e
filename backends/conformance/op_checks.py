"""Per-op checks: one case's kernel against the CPU reference (within the contract's tolerance, bit for bit at
`exact` or for integer outputs), run to run (`deterministic`), row alone against the same row inside batches
(`batch-invariant`), and against the golden digest (`exact`)."""
from __future__ import annotations

from typing import Callable

import torch

from dsv4.backends import contracts
from dsv4.backends.conformance.inputs import OpCase, Seed, to_device
from dsv4.backends.conformance.report import Check, digest, golden_check, same_bits, within
from dsv4.backends.levels import Level
from dsv4.backends.registry import OpTable

BATCH_SIZES = (2, 5, 9)                         # batch-invariance: a row alone vs inside batches of these sizes


def golden_key(case: OpCase) -> str:
    """The entry of the golden digests that holds the reference output of `case`."""
    return f"op/{case.name}"


def check_op(case: OpCase, table: OpTable, reference: OpTable, device: torch.device, level: Level,
             golden: dict[str, str]) -> list[Check]:
    kernel = table.kernels[case.op]
    fn, name = kernel.fn, f"op/{case.name}"
    args = case.build(list(Seed.CHECK_ROWS))
    ref = reference.kernels[case.op].fn(*args)
    try:
        out = fn(*to_device(args, device))
    except Exception as e:
        return [Check(f"{name}/reference", "fail", f"{kernel.backend}:{kernel.name} raised {type(e).__name__}: {e}")]
    checks = []
    contract = contracts.contract(case.op)
    if level >= Level.EXACT or contract.exact_only_output:
        ok = same_bits(out, ref)
        checks.append(Check(f"{name}/reference", "pass" if ok else "fail",
                            "bit-identical to the CPU reference" if ok else "bits differ from the CPU reference",
                            digest(out)))
    else:
        ok, detail = within(out, ref, contract.atol, contract.rtol)
        checks.append(Check(f"{name}/reference", "pass" if ok else "fail", detail, digest(out)))
    if level >= Level.DETERMINISTIC:
        again = fn(*to_device(args, device))
        ok = same_bits(out, again)
        checks.append(Check(f"{name}/repeat", "pass" if ok else "fail",
                            "same bits on a second run" if ok else "a second run gave other bits"))
    if level >= Level.BATCH_INVARIANT and case.row_outputs:
        checks.append(_batch_invariance(case, fn, device, name))
    if level >= Level.EXACT:
        checks.append(golden_check(f"{name}/golden", golden_key(case), golden, digest(out)))
    return checks


def _row(out, i: int):
    if isinstance(out, (tuple, list)):
        return tuple(_row(o, i) for o in out)
    return out[i]


def _batch_invariance(case: OpCase, fn: Callable, device: torch.device, name: str) -> Check:
    """Several target rows, each alone and then inside batches of other rows at the first, middle and last place."""
    for target in Seed.BATCH_TARGETS:
        alone_row = _row(fn(*to_device(case.build([target]), device)), 0)
        for size in BATCH_SIZES:
            for where in sorted({0, size // 2, size - 1}):
                seeds = [Seed.BATCH_FILLER + Seed.BATCH_FILLER_STRIDE * size + i for i in range(size)]
                seeds[where] = target
                out = fn(*to_device(case.build(seeds), device))
                if not same_bits(_row(out, case.row_position(seeds, target)), alone_row):
                    return Check(f"{name}/batch-invariance", "fail",
                                 f"row {target} differs inside a batch of {size} at position {where}")
    return Check(f"{name}/batch-invariance", "pass",
                 f"{len(Seed.BATCH_TARGETS)} rows identical alone and in batches of {BATCH_SIZES}")
