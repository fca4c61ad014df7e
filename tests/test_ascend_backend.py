"""The npu backend as a whole: registration from the mapping table, the capability tables and docs/ascend.md, the
probe in every failure case a user meets, the CLI's messages, and the HCCL environment per level.

Failure cases are simulated: torch-npu hidden from importlib, a torch_npu package that fails to import, a fake
torch_npu module reporting no NPU or a given SoC version, CANN's environment removed.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from dsv4.backends.contracts import CONTRACTS
from dsv4.backends.levels import Level
from dsv4.backends.npu import build_backend, device, distributed_env, mapping
from dsv4.backends.registry import Registry
from dsv4.cli import main as cli
from dsv4.errors import DSV4Error

DOCS = Path(__file__).resolve().parents[1] / "docs" / "ascend.md"
HAS_TRITON = importlib.util.find_spec("triton") is not None


# -- simulated machines -------------------------------------------------------------------------------------------
@pytest.fixture
def no_torch_npu(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch_npu" else real(name, *a))
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)


def fake_torch_npu(monkeypatch, available: bool = True, count: int = 1, soc: int = 223) -> None:
    """A torch_npu module in sys.modules whose torch_npu.npu answers as a machine with these NPUs would."""
    module = types.ModuleType("torch_npu")
    module.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
    module.npu = types.SimpleNamespace(is_available=lambda: available, device_count=lambda: count,
                                       get_soc_version=lambda: soc)
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    monkeypatch.setenv("ASCEND_HOME_PATH", "/usr/local/Ascend/ascend-toolkit/latest")


@pytest.fixture
def no_cann(monkeypatch, tmp_path):
    fake_torch_npu(monkeypatch)
    for name in device.CANN_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(device, "ASCEND_ROOT", tmp_path)
    return tmp_path


@pytest.fixture
def broken_torch_npu(monkeypatch, tmp_path):
    package = tmp_path / "torch_npu"
    package.mkdir()
    (package / "__init__.py").write_text('raise ImportError("libhccl.so: cannot open shared object file")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    monkeypatch.setenv("ASCEND_HOME_PATH", "/usr/local/Ascend/ascend-toolkit/latest")
    importlib.invalidate_caches()


# -- the probe ----------------------------------------------------------------------------------------------------
def test_probe_says_torch_npu_is_missing_and_how_to_install_it(no_torch_npu):
    reason = device.unavailable_reason()
    assert reason.startswith("torch-npu is not installed") and "pip install" in reason and "CANN" in reason


def test_probe_says_cann_is_missing_when_no_toolkit_is_installed(no_cann):
    reason = device.unavailable_reason()
    assert "CANN toolkit was not found" in reason and "set_env.sh" in reason


def test_probe_says_which_set_env_to_source_when_cann_is_installed_but_not_set_up(no_cann):
    script = no_cann / "ascend-toolkit" / "set_env.sh"
    script.parent.mkdir()
    script.write_text("")
    assert device.unavailable_reason() == f"the CANN toolkit is installed but not set up in this shell: source {script}"


def test_probe_reports_a_torch_npu_import_failure_with_its_error(broken_torch_npu):
    reason = device.unavailable_reason()
    assert reason.startswith("torch-npu failed to import (ImportError: libhccl.so") and "must match torch" in reason


def test_probe_says_no_npu_is_visible_and_names_the_visibility_variable(monkeypatch):
    fake_torch_npu(monkeypatch, available=False, count=0)
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "7")
    reason = device.unavailable_reason()
    assert reason.startswith("no Ascend NPU is visible") and "npu-smi info" in reason
    assert "ASCEND_RT_VISIBLE_DEVICES='7'" in reason


def test_probe_rejects_an_unsupported_chip_by_name(monkeypatch):
    fake_torch_npu(monkeypatch, soc=202)                            # Atlas 300I (310P): no bf16
    reason = device.unavailable_reason()
    assert "SoC version 202" in reason and "not supported" in reason and "Ascend 950" in reason


@pytest.mark.parametrize("soc,chip", [(220, "910B"), (225, "910B"), (250, "910C"), (255, "910C"), (260, "950")])
def test_probe_accepts_each_supported_generation_and_detects_its_chip(monkeypatch, soc, chip):
    fake_torch_npu(monkeypatch, soc=soc)
    assert device.unavailable_reason() is None and device.detect_chip() == chip


@pytest.mark.parametrize("soc", [104, 202, 226, 249, 256, 261])
def test_soc_versions_outside_the_supported_generations_have_no_chip(soc):
    assert device.chip_for_soc(soc) is None


def test_triton_kernels_are_not_used_without_an_npu(no_torch_npu):
    assert device.detect_chip() is None and device.triton_ascend_available() is False


# -- the CLI ------------------------------------------------------------------------------------------------------
SCENARIOS = {
    "no torch-npu": ("no_torch_npu", "torch-npu is not installed"),
    "no CANN": ("no_cann", "the CANN toolkit was not found"),
    "no NPU": ("hidden_npu", "no Ascend NPU is visible"),
}


@pytest.fixture
def hidden_npu(monkeypatch):
    fake_torch_npu(monkeypatch, available=False, count=0)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_backends_and_run_name_what_is_missing(request, scenario):
    fixture, needle = SCENARIOS[scenario]
    request.getfixturevalue(fixture)
    listing = CliRunner().invoke(cli, ["backends"])
    assert listing.exit_code == 0
    npu_line = next(line for line in listing.stdout.splitlines() if line.startswith("npu "))
    assert f"unavailable: {needle}" in npu_line
    run = CliRunner().invoke(cli, ["run", "--device", "npu", "--quiet"])
    assert run.exit_code == 2
    assert run.stderr.strip().splitlines() == [run.stderr.strip()]
    assert run.stderr.startswith(f"error: backend 'npu' is not usable here: {needle}")


@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None, reason="torch-npu is installed here")
def test_dsv4_run_on_npu_without_torch_npu_fails_with_one_line_in_a_fresh_process():
    exe = shutil.which("dsv4") or os.path.join(os.path.dirname(sys.executable), "dsv4")
    proc = subprocess.run([exe, "run", "--device", "npu"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: backend 'npu' is not usable here: {device.unavailable_reason()}"


# -- registration follows the mapping -----------------------------------------------------------------------------
def test_the_backend_registers_without_torch_npu_through_its_entry_point(no_torch_npu):
    registry = Registry().discover()
    assert "npu" in registry.backends and "npu" not in registry.load_errors
    assert "torch_npu" not in sys.modules


@pytest.mark.parametrize("chip", [None, *device.CHIPS])
def test_registered_kernels_are_the_mapping_entries_in_order_then_the_canonical_floor(chip):
    backend = build_backend(chip, triton=False)
    for op in CONTRACTS:
        entries = [e for e in mapping.entries_for(chip, False) if e.op == op]
        expected = [(e.kernel, e.level) for e in entries] + [("canonical", Level.EXACT)]
        assert [(k.name, k.level) for k in backend.kernels[op]] == expected, op


def test_without_an_npu_only_kernels_every_chip_has_are_registered():
    names = {(k.op, k.name) for ks in build_backend(None, triton=False).kernels.values() for k in ks}
    assert ("rms_norm", "npu_rms_norm") not in names and ("quant_linear", "integer_block_gemm") in names


def test_triton_kernels_are_registered_only_when_triton_ascend_is_usable():
    without = {k.name for ks in build_backend("910B", triton=False).kernels.values() for k in ks}
    assert not {name for name in without if name.startswith("triton_")}
    assert {e.kernel for e in mapping.entries_for("910B", True)} >= {"triton_compress_pool", "triton_mhc_pre"}


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: the Triton kernel modules cannot be imported")
def test_triton_kernels_load_as_registered_kernels():
    backend = build_backend("910C", triton=True)
    assert backend.kernels["compress_pool"][0].name == "triton_compress_pool"
    assert backend.kernels["mhc_pre"][0].fn.__module__ == "dsv4.kernels.mhc"


def test_every_op_has_an_operator_or_a_stated_reason_why_not():
    for op in CONTRACTS:
        operator = any(e.op == op and e.kind in (mapping.TORCH_NPU, mapping.TORCH) for e in mapping.ENTRIES)
        assert operator != (op in mapping.NO_OPERATOR), f"{op}: map it to an operator or say why there is none"
    assert set(mapping.NO_OPERATOR) <= set(CONTRACTS)


def test_entries_name_real_ops_chips_and_kernel_functions():
    for e in mapping.ENTRIES:
        assert e.op in CONTRACTS and set(e.chips) <= set(device.CHIPS) and e.source and e.conditions
        if e.kind != mapping.TRITON:
            assert callable(e.load()), e.target


@pytest.mark.parametrize("chip", device.CHIPS)
@pytest.mark.parametrize("triton", [False, True])
def test_capability_table_is_what_the_registry_resolves(chip, triton):
    if triton and not HAS_TRITON:
        pytest.skip("triton is not installed: the Triton kernel modules cannot be imported")
    registry = Registry()
    registry.add_backend(build_backend(chip, triton))
    table = mapping.capability(chip, triton)
    for level in Level:
        resolved = registry.resolve("npu", level, check_available=False).kernels
        assert {op: k.name for op, k in resolved.items()} == {op: table[op][level] for op in CONTRACTS}


@pytest.mark.parametrize("chip", device.CHIPS)
def test_every_chip_has_an_exact_path_without_fp64_or_float8(chip):
    table = mapping.capability(chip, triton=False)
    assert table["quant_linear"][Level.EXACT] == table["grouped_quant_linear"][Level.EXACT] == "integer_block_gemm"
    assert table["fake_quant"][Level.EXACT] == "integer_e4m3"


def test_docs_carry_the_generated_tables_verbatim():
    assert mapping.render() in DOCS.read_text(), "run: python -P -m dsv4.backends.npu.mapping --update docs/ascend.md"


# -- multi-process environment ------------------------------------------------------------------------------------
@pytest.mark.parametrize("level,expected", [
    ("fast", {}),
    ("deterministic", {"HCCL_DETERMINISTIC": "true", "LCCL_DETERMINISTIC": "1"}),
    ("batch-invariant", {"HCCL_DETERMINISTIC": "strict", "LCCL_DETERMINISTIC": "1"}),
    ("exact", {"HCCL_DETERMINISTIC": "strict", "LCCL_DETERMINISTIC": "1"})])
def test_distributed_env_pins_hccl_reductions_per_level(level, expected):
    assert distributed_env(level) == expected


def test_distributed_env_rejects_an_unknown_level():
    with pytest.raises(DSV4Error, match="unknown determinism level"):
        distributed_env("bitwise")


# -- on a real NPU ------------------------------------------------------------------------------------------------
@pytest.mark.npu
@pytest.mark.skipif(device.unavailable_reason() is not None,
                    reason=f"needs an Ascend NPU: {device.unavailable_reason()}")
def test_backend_on_this_npu_detects_its_chip_and_resolves_every_level():
    chip = device.detect_chip()
    assert chip in device.CHIPS
    registry = Registry()
    registry.add_backend(build_backend(chip, device.triton_ascend_available()))
    for level in Level:
        registry.resolve("npu", level)
