"""Determinism levels are enforced by the registry and checked by the conformance suite, which can fail."""
from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsv4.backends import conformance
from dsv4.backends.canonical import ops as canonical
from dsv4.backends.contracts import CONTRACTS
from dsv4.backends.levels import Level
from dsv4.backends.registry import Backend, Registry, collect_overrides, parse_overrides
from dsv4.errors import DSV4Error

from test_cli import dsv4, dsv4_at_once


def _registry_with(name: str, level: Level, replace: dict | None = None) -> Registry:
    """A registry with the real cpu backend plus a test backend: canonical kernels declared at `level`, except the
    ops in `replace` (op -> (fn, level))."""
    registry = Registry().discover()
    backend = registry.add_backend(Backend(name=name, device_types=("cpu",)))
    for op in CONTRACTS:
        fn, lvl = (replace or {}).get(op, (getattr(canonical, op), level))
        backend.add(op, fn, lvl, "test")
    return registry


@pytest.mark.parametrize("level", ["deterministic", "batch-invariant", "exact"])
def test_registry_refuses_a_kernel_that_does_not_declare_the_level(level):
    registry = _registry_with("fastonly", Level.FAST)
    registry.resolve("fastonly", "fast")                      # fine at the level it declares
    with pytest.raises(DSV4Error, match=rf"op \w+: backend 'fastonly' has no kernel that declares level '{level}'"):
        registry.resolve("fastonly", level)


def test_refusal_names_the_one_undeclared_op():
    registry = _registry_with("mostly", Level.EXACT, {"swiglu": (canonical.swiglu, Level.DETERMINISTIC)})
    registry.resolve("mostly", "deterministic")
    with pytest.raises(DSV4Error, match="op swiglu: backend 'mostly' .* 'batch-invariant'"):
        registry.resolve("mostly", "batch-invariant")


def test_a_backend_missing_an_op_is_refused_rather_than_filled_from_another_backend():
    registry = Registry().discover()
    partial = registry.add_backend(Backend(name="partial", device_types=("cpu",)))
    partial.add("rms_norm", canonical.rms_norm, Level.EXACT, "own")
    with pytest.raises(DSV4Error, match="backend 'partial' implements no kernel for it"):
        registry.resolve("partial", "fast")


def test_a_kernel_whose_parameters_are_not_its_contracts_is_refused_at_resolve():
    def stale_attention(q, kv, idx, sink, scale):                 # the contract has `fresh` after kv
        raise AssertionError("never called")

    registry = _registry_with("stale", Level.EXACT, {"sparse_attention": (stale_attention, Level.EXACT)})
    with pytest.raises(DSV4Error, match=r"op sparse_attention: kernel stale:test takes \(q, kv, idx, sink, scale\) "
                                        r"but the contract is sparse_attention\(q, kv, fresh, idx, sink, scale\)"):
        registry.resolve("stale", "fast")
    registry.backends["stale"].kernels["sparse_attention"][0] = dataclasses.replace(
        registry.backends["stale"].kernels["sparse_attention"][0], fn=lambda q, kv, fresh, idx, sink, scale, *rest: 0)
    assert registry.resolve("stale", "exact").backend == "stale"  # extra trailing parameters are fine


def _batch_variant_linear(x, weight):
    """Wrong on purpose, like a GEMM whose split-K depends on M: the sum over K is split into 4 partial sums once the
    batch has 4 rows or more, 1 otherwise."""
    rows = x.reshape(-1, x.shape[-1]).shape[0]
    if rows < 4 or weight.dim() != 2:
        return canonical.linear(x, weight)
    parts = [canonical.linear(x[..., i::4].contiguous(), weight[:, i::4].contiguous()).float() for i in range(4)]
    return ((parts[0] + parts[1]) + (parts[2] + parts[3])).to(x.dtype)


def test_verify_catches_a_batch_variant_kernel_registered_as_batch_invariant():
    registry = _registry_with("liar", Level.EXACT, {"linear": (_batch_variant_linear, Level.BATCH_INVARIANT)})
    report = conformance.verify("liar", "cpu", "batch-invariant", presets=(), registry=registry)
    failed = {c.name for c in report.checks if c.status == "fail"}
    assert "op/linear_fp32/batch-invariance" in failed
    assert not report.ok


def test_verify_at_exact_fails_when_outputs_leave_the_golden_digests():
    golden = conformance.load_golden()
    tampered = dict(golden, **{"op/hadamard": "0" * 64})
    report = conformance.verify("cpu", "cpu", "exact", presets=(), golden=tampered)
    assert {c.name for c in report.checks if c.status == "fail"} == {"op/hadamard/golden"}


@pytest.fixture(scope="module")
def cpu_verify(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`dsv4 verify --backend cpu --level exact` (every op case and the tiny preset) as a user runs it: the report
    file it writes and the finished process."""
    report = tmp_path_factory.mktemp("verify") / "cpu.json"
    return report, dsv4("verify", "--backend", "cpu", "--level", "exact", "--report", str(report), "--quiet")


def test_golden_digests_of_the_tiny_preset_are_reproduced_by_the_cpu_reference(cpu_verify):
    report = conformance.Report.load(cpu_verify[0])
    golden_checks = [c for c in report.checks if "golden" in c.name]
    assert len(golden_checks) == len(conformance.OP_CASES) + 2
    assert all(c.status == "pass" for c in report.checks), report.table()


def test_cli_verify_writes_a_report_that_compares_equal_to_itself(cpu_verify):
    report, proc = cpu_verify
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 failed" in proc.stdout and json.loads(report.read_text())["level"] == "exact"
    same = dsv4("compare", str(report), str(report))
    assert same.returncode == 0 and "0 difference(s)" in same.stdout


def test_compare_reports_a_difference_between_two_machines(tmp_path):
    a = conformance.Report("cpu", "cpu", "exact", {}, [conformance.Check("op/x/reference", "pass", "", "ab" * 32)])
    b = conformance.Report("cuda", "cuda", "exact", {}, [conformance.Check("op/x/reference", "pass", "", "cd" * 32)])
    (tmp_path / "a.json").write_text(a.to_json())
    (tmp_path / "b.json").write_text(b.to_json())
    proc = dsv4("compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    assert proc.returncode == 1 and "op/x/reference: outputs differ" in proc.stdout


def test_run_exact_gives_the_same_tokens_and_logit_bits_alone_and_inside_a_batch(tiny_dir, tmp_path):
    common = ("run", "--model", str(tiny_dir), "--determinism", "exact", "--max-new-tokens", "6", "--quiet",
              "--temperature", "0.9", "--seed", "4")
    alone, batch = dsv4_at_once((*common, "--prompt", "def f(x):", "--logits-out", str(tmp_path / "alone.st")),
                                (*common, "--prompt", "import sys", "--prompt", "def f(x):", "--prompt",
                                 "class A:\n  pass", "--logits-out", str(tmp_path / "batch.st")))
    assert alone.returncode == 0 and batch.returncode == 0, alone.stderr + batch.stderr
    assert alone.stdout.strip() == batch.stdout.splitlines()[1].strip() or alone.stdout in batch.stdout
    a = load_file(tmp_path / "alone.st")["prompt0"]
    b = load_file(tmp_path / "batch.st")["prompt1"]
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_op_overrides_come_from_config_file_then_environment_then_cli(tmp_path, monkeypatch):
    config = tmp_path / "ops.toml"
    config.write_text('[ops]\nrms_norm = "cpu:canonical"\nswiglu = "cpu"\n')
    monkeypatch.setenv("DSV4_OP_OVERRIDES", "swiglu=cpu:canonical,rope=cpu")
    merged = collect_overrides("rope=cpu:canonical", str(config))
    assert merged == {"rms_norm": "cpu:canonical", "swiglu": "cpu:canonical", "rope": "cpu:canonical"}
    with pytest.raises(DSV4Error, match="expected op=backend"):
        parse_overrides("rms_norm")


def test_an_override_to_another_backends_kernel_is_used_and_still_level_checked():
    registry = _registry_with("vendorish", Level.EXACT, {"swiglu": (canonical.swiglu, Level.FAST)})
    table = registry.resolve("cpu", "exact", {"rms_norm": "vendorish:test"})
    assert table.kernels["rms_norm"].backend == "vendorish"
    with pytest.raises(DSV4Error, match="op swiglu: backend 'vendorish'"):
        registry.resolve("cpu", "exact", {"swiglu": "vendorish"})
