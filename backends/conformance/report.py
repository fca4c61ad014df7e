"""The report of a `dsv4 verify` run: named checks with a status and a digest of what each saw, the environment that
ran them, JSON and a table; `compare` diffs two reports check by check, and `golden_check` compares a digest with
the golden one recorded by the CPU reference."""
from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dsv4 import validate
from dsv4.errors import DSV4Error

CHECK_STATUSES = ("pass", "fail", "skip")


@dataclass
class Check:
    name: str           # "op/<case>/<kind>", "model/<preset>/<kind>" or "probe/<kind>"
    status: str         # one of CHECK_STATUSES: "pass", "fail" or "skip"
    detail: str = ""
    digest: str = ""    # of the outputs this check saw, so reports from two machines can be compared
    golden_key: str = ""   # the entry of the golden digests this check compares `digest` with ("" for none)


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


def environment(device: torch.device) -> dict:
    """What ran the checks: torch, Python, machine, device name (and CUDA, Triton on a GPU), date."""
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


# -- comparing outputs ---------------------------------------------------------------------------------------------
def digest(*outputs) -> str:
    """sha256 over shapes, dtypes and bytes of tensors (NaNs normalised: their bit patterns differ by device)."""
    h = hashlib.sha256()
    for t in flatten(outputs):
        t = t.detach().cpu().contiguous()
        if t.is_floating_point():
            t = torch.where(torch.isnan(t), torch.full_like(t, float("nan")), t)
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def flatten(x) -> list[torch.Tensor]:
    """The tensors of a tensor or a (nested) tuple or list of them, in order; anything else is dropped."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in flatten(item)]
    return []


def same_bits(a, b) -> bool:
    """The same shapes, dtypes and bits (any NaN equal to any NaN)."""
    return digest(a) == digest(b)


def within(out, ref, atol: float, rtol: float) -> tuple[bool, str]:
    """Whether every output is within |out - ref| <= atol + rtol * |ref| of the reference (integers and non-finite
    values exactly), and a line saying so."""
    worst = 0.0
    for o, r in zip(flatten(out), flatten(ref)):
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


def golden_check(name: str, key: str, golden: dict[str, str], got: str) -> Check:
    """The check `name` that digest `got` is the golden digest recorded under `key`."""
    want = golden.get(key)
    if want == got:
        return Check(name, "pass", "matches the golden digest", got, key)
    detail = "no golden digest recorded" if want is None else f"golden {want[:12]} != {got[:12]}"
    return Check(name, "fail", detail, got, key)
