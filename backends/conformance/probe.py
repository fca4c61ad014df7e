"""The device arithmetic probe: does the device do what the canonical composite assumes? IEEE + - * / on fp32 with
subnormals, no FMA contraction in eager elementwise ops, fp64 matrix multiply for the block-exact GEMM. At `exact`
a miss fails the report; below it is a skip (the faster levels do not rely on it)."""
from __future__ import annotations

import torch

from dsv4.backends.conformance.inputs import Seed, uniform
from dsv4.backends.conformance.report import Check, same_bits
from dsv4.backends.levels import Level


def probe_device(device: torch.device, level: Level) -> list[Check]:
    strict = level >= Level.EXACT
    checks = []
    a = uniform(Seed.PROBE_A, (4096,), -1e3, 1e3)
    b = uniform(Seed.PROBE_B, (4096,), -1e3, 1e3)
    tiny = torch.tensor([1e-40, -3e-39, 1.4e-45, 1.1754942e-38])
    a = torch.cat([a, tiny, tiny * 3]); b = torch.cat([b, torch.full((4,), 0.5), torch.full((4,), 2.0)])
    da, db = a.to(device), b.to(device)
    results = {"add": (da + db, a + b), "mul": (da * db, a * b), "div": (da / db, a / b), "sub": (da - db, a - b)}
    bad = [op for op, (x, y) in results.items() if not same_bits(x, y)]
    checks.append(Check("probe/ieee-basic-ops", "fail" if bad and strict else ("skip" if bad else "pass"),
                        f"differ from the CPU: {', '.join(bad)}" if bad else "+ - * / bit-identical to the CPU"))
    sub = (torch.tensor([1e-40], device=device) * torch.tensor([0.5], device=device)).item()
    ok = sub != 0.0
    checks.append(Check("probe/subnormals", "pass" if ok else ("fail" if strict else "skip"),
                        "subnormal results kept" if ok else "subnormals are flushed to zero"))
    x, y, z = (uniform(seed, (4096,), -2, 2).to(device) for seed in (Seed.PROBE_X, Seed.PROBE_Y, Seed.PROBE_Z))
    fused = (x.double() * y.double() + z.double()).float()
    separate = ((x.cpu() * y.cpu()) + z.cpu())
    eager = x * y + z
    ok = same_bits(eager, separate)
    contracted = not ok and same_bits(eager, fused)
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
