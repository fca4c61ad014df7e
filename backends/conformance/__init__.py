"""Conformance: check every kernel a backend declares against the level it claims, per op and for the whole model.

Nothing is taken on trust. For a backend on a device at a level, `verify` runs:
- the device arithmetic probe (`probe`): IEEE basics, subnormals, FMA contraction, fp64 availability;
- per op case (`op_checks`, cases from `inputs`): numerics against the CPU reference (within the contract's
  tolerance; bit for bit at `exact`), the same bits run to run (`deterministic`), one row alone against the same row
  inside batches of several sizes and positions (`batch-invariant`), and the golden digest made by the CPU reference
  (`exact`);
- per small preset (`model_checks`): prefill logits against the reference, repeat runs, a prompt alone against the
  same prompt prefilled in a batch, decoded among other requests of other lengths and prefilled in chunks, and
  golden digests of logits and greedy tokens.

Inputs come from the counter-based generator by named seeds (`inputs.Seed`), so every machine builds the same bits.
A report (`report`) is JSON plus a table; two reports from different machines are compared check by check with
`compare`. The golden digests live in backends/golden/digests.json, under the key each check names.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from dsv4.backends.conformance.inputs import OP_CASES, OpCase, Seed, uniform
from dsv4.backends.conformance.model_checks import check_model
from dsv4.backends.conformance.op_checks import check_op
from dsv4.backends.conformance.probe import probe_device
from dsv4.backends.conformance.report import Check, Report, compare, digest, environment
from dsv4.backends.levels import Level
from dsv4.backends.registry import Registry, default_registry

__all__ = ["GOLDEN_FILE", "OP_CASES", "Check", "OpCase", "Report", "Seed", "compare", "digest", "load_golden",
           "regenerate_golden", "uniform", "verify"]

GOLDEN_FILE = Path(__file__).parent.parent / "golden" / "digests.json"
DEFAULT_PRESETS = ("tiny",)
ProgressCallback = Callable[[str, int, int], None]


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
    """Maintainer command: recompute the golden digests with the CPU reference at `exact` and write them, each under
    the key its check names."""
    report = verify("cpu", "cpu", Level.EXACT, presets, registry=registry, golden={})
    digests = {c.golden_key: c.digest for c in report.checks if c.golden_key}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"generated_by": f"cpu reference, torch {torch.__version__}",
                                "digests": dict(sorted(digests.items()))}, indent=1) + "\n")
    return digests
