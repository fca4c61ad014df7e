"""The example vendor plugin (examples/vendor-backend) installed for real and found through its entry point.

The package is pip-installed into a temporary folder and `dsv4` runs in subprocesses with that folder on
PYTHONPATH, so discovery goes through importlib.metadata exactly as for a vendor's wheel. The (long) exact
verification starts in the background as soon as the package is installed; the other checks run meanwhile.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from test_default_model import SLICE

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "vendor-backend"
DSV4 = shutil.which("dsv4") or os.path.join(os.path.dirname(sys.executable), "dsv4")


@dataclass
class Installed:
    workdir: Path
    env: dict[str, str]
    verify: subprocess.Popen   # `dsv4 verify --backend example --level exact`, running in the background

    def run(self, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), cwd=self.workdir, env=self.env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Installed:
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed, so pip cannot build the example plugin without build isolation")
    root = tmp_path_factory.mktemp("vendor")
    source, site = root / "src", root / "site"
    shutil.copytree(EXAMPLE, source)            # build outside the repository: no build/ or egg-info left there
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--no-index", "--target", str(site), str(source)], capture_output=True, text=True)
    assert pip.returncode == 0, f"pip could not install the example plugin:\n{pip.stderr}"
    # One thread per process: beside the verification in the background, two threads per process on a two-core
    # machine spin against each other (OpenMP's busy wait) and run 5x slower or worse.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    verify = subprocess.Popen([DSV4, "verify", "--backend", "example", "--level", "exact", "--presets", "tiny",
                               "--report", "r.json", "--quiet"], cwd=root, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield Installed(root, env, verify)
    if verify.poll() is None:
        verify.kill()
        verify.communicate()


def test_backends_lists_the_plugin(plugin):
    proc = plugin.run(DSV4, "backends", "--level", "exact")
    assert proc.returncode == 0, proc.stderr
    assert any(line.startswith("example ") and "available" in line for line in proc.stdout.splitlines()), proc.stdout
    assert "torch_rms_norm(exact)" in proc.stdout and "torch_silu(fast)" in proc.stdout
    assert "example at exact: ok" in proc.stdout


def test_fast_resolves_the_vendor_kernel_and_exact_the_canonical_one(plugin):
    code = ("import json; from dsv4.backends.registry import default_registry as r; "
            "print(json.dumps({l: r().resolve('example', l).describe() for l in ('fast', 'exact')}))")
    proc = plugin.run(sys.executable, "-c", code)
    assert proc.returncode == 0, proc.stderr
    tables = json.loads(proc.stdout)
    assert tables["fast"]["swiglu"] == "example:torch_silu (fast)"
    assert tables["exact"]["swiglu"] == "example:canonical (exact)"
    for level in ("fast", "exact"):
        assert tables[level]["rms_norm"] == "example:torch_rms_norm (exact)"
        assert tables[level]["rope"] == "example:canonical (exact)"


def test_exact_backends_give_the_same_perplexity_bits(plugin):
    """`dsv4 eval` of the held-out slice's first segment at exact prints the same NLL sum and logits digest on the
    CPU reference and on the plugin (docs/model-card.md)."""
    outputs = []
    for backend in ("cpu", "example"):
        proc = plugin.run(DSV4, "eval", "--file", str(SLICE), "--segments", "1", "--determinism", "exact",
                          "--backend", backend, "--quiet")
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout)
    assert "[example/cpu, exact]" in outputs[1]
    cpu, vendor = ([line.split("[")[0] for line in out.splitlines()] for out in outputs)
    assert cpu == vendor


def test_verify_exact_passes_with_no_failed_check(plugin):
    stdout, stderr = plugin.verify.communicate(timeout=600)
    assert plugin.verify.returncode == 0, stdout + stderr
    report = json.loads((plugin.workdir / "r.json").read_text())
    assert report["backend"] == "example" and report["level"] == "exact"
    assert report["checks"] and not [c for c in report["checks"] if c["status"] == "fail"]
    names = {c["name"] for c in report["checks"]}
    assert {"op/rms_norm/golden", "op/swiglu/golden", "model/tiny/generation-golden"} <= names
