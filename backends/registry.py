"""The backend registry: every hot op of the model goes through here to one backend's kernel.

A backend is a package exposing `register(registry)` under the entry-point group `dsv4.backends` (the built-in
`cpu`, `cuda` and `npu` backends use exactly that path). It names the device types it serves, probes whether it can
run here (keeping the reason when not), and registers kernels: one function per op contract, each declaring the
strongest determinism level it meets.

Selection: a device type picks its backend; each op then takes the backend's first kernel (in the backend's
preference order, fastest first) that declares at least the requested level. Per-op overrides may name another
backend's kernel for the same device. If no kernel qualifies, resolution fails with an error naming op, backend and
level: there is no silent fallback. A chosen kernel whose parameters are not its contract's (`contracts.Ops`) is
refused the same way, so a stale kernel fails at load with its name rather than mid-forward with a TypeError.
"""
from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass, field
from typing import Callable

from dsv4 import validate
from dsv4.backends.contracts import CONTRACTS, Ops, signature_mismatch
from dsv4.backends.levels import Level
from dsv4.errors import DSV4Error

ENTRY_POINT_GROUP = "dsv4.backends"
OVERRIDE_ENV = "DSV4_OP_OVERRIDES"


@dataclass(frozen=True)
class Kernel:
    """One implementation of one op: the function, the level it declares, and a short name for reports."""
    op: str
    fn: Callable
    level: Level
    name: str
    backend: str


@dataclass
class Backend:
    name: str
    device_types: tuple[str, ...]
    probe: Callable[[], str | None] = lambda: None   # None when usable here, else the reason it is not
    description: str = ""
    kernels: dict[str, list[Kernel]] = field(default_factory=dict)

    def add(self, op: str, fn: Callable, level: Level | str, name: str) -> None:
        """Register `fn` for `op`. Call in preference order: the first kernel meeting a level wins."""
        if op not in CONTRACTS:
            raise DSV4Error(f"backend {self.name!r} registers unknown op {op!r}")
        self.kernels.setdefault(op, []).append(Kernel(op, fn, Level.parse(level), name, self.name))

    def unavailable_reason(self) -> str | None:
        try:
            return self.probe()
        except Exception as e:  # a probe must never take the registry down
            return f"probe failed: {type(e).__name__}: {e}"


class OpTable(Ops):
    """The resolved kernels for one (backend, level): `table.rms_norm(...)` calls the chosen kernel.

    Its methods are typed by `dsv4.backends.contracts.Ops` (one per contract); each is replaced here by the kernel
    the registry chose, whose parameters `Registry.resolve` has checked against the contract."""

    def __init__(self, backend: str, level: Level, kernels: dict[str, Kernel]):
        missing = [op for op in CONTRACTS if op not in kernels]
        if missing:
            raise DSV4Error(f"an op table for {backend!r} needs a kernel for every op; missing: {', '.join(missing)}")
        self.backend, self.level, self.kernels = backend, level, kernels
        for op, kernel in kernels.items():
            setattr(self, op, kernel.fn)

    def describe(self) -> dict[str, str]:
        return {op: f"{k.backend}:{k.name} ({k.level.label})" for op, k in self.kernels.items()}


class Registry:
    def __init__(self) -> None:
        self.backends: dict[str, Backend] = {}
        self.load_errors: dict[str, str] = {}

    def add_backend(self, backend: Backend) -> Backend:
        if backend.name in self.backends:
            raise DSV4Error(f"backend {backend.name!r} is registered twice")
        self.backends[backend.name] = backend
        return backend

    def discover(self) -> "Registry":
        """Load every backend package installed under the `dsv4.backends` entry-point group."""
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in self.backends:
                continue
            try:
                ep.load()(self)
            except Exception as e:
                self.load_errors[ep.name] = f"failed to load ({ep.value}): {type(e).__name__}: {e}"
        return self

    def backend(self, name: str) -> Backend:
        if name not in self.backends:
            known = ", ".join(sorted(self.backends)) or "none"
            extra = f" ({self.load_errors[name]})" if name in self.load_errors else ""
            raise DSV4Error(f"unknown backend {name!r}{extra}; installed: {known}")
        return self.backends[name]

    def backend_for_device(self, device_type: str) -> Backend:
        """The backend serving a device type: the built-in one of that name first, else the first that claims it."""
        candidates = [b for b in self.backends.values() if device_type in b.device_types]
        if not candidates:
            installed = ", ".join(f"{b.name} ({'/'.join(b.device_types)})" for b in self.backends.values())
            raise DSV4Error(f"no backend serves device {device_type!r}; installed backends: {installed}")
        candidates.sort(key=lambda b: b.name != _BUILTIN_FOR_DEVICE.get(device_type))
        return candidates[0]

    def resolve(self, backend: str | Backend, level: Level | str = Level.FAST,
                overrides: dict[str, str] | None = None, check_available: bool = True) -> OpTable:
        """Pick one kernel per op for `backend` at `level`; `overrides` maps op -> 'backend[:kernel]'."""
        b = backend if isinstance(backend, Backend) else self.backend(backend)
        level = Level.parse(level)
        if check_available and (reason := b.unavailable_reason()):
            raise DSV4Error(f"backend {b.name!r} is not usable here: {reason}")
        overrides = dict(overrides or {})
        for op, target in overrides.items():
            if op not in CONTRACTS:
                raise validate.unknown_key(op, CONTRACTS, "op override")
            if not isinstance(target, str) or not target.partition(":")[0]:
                raise DSV4Error(f"op override {op}={target!r}: expected 'backend[:kernel]'")
        chosen: dict[str, Kernel] = {}
        for op in CONTRACTS:
            source, kernel_name = b, None
            if op in overrides:
                target, _, kernel_name = overrides[op].partition(":")
                source = self.backend(target)
                shared = set(source.device_types) & set(b.device_types)
                if not shared:
                    raise DSV4Error(f"override {op}={overrides[op]}: backend {source.name!r} does not run on "
                                    f"{'/'.join(b.device_types)}")
            kernel = chosen[op] = _pick(source, op, level, kernel_name or None)
            if reason := signature_mismatch(op, kernel.fn):
                raise DSV4Error(f"op {op}: kernel {kernel.backend}:{kernel.name} {reason}")
        return OpTable(b.name, level, chosen)


def _pick(backend: Backend, op: str, level: Level, kernel_name: str | None) -> Kernel:
    kernels = backend.kernels.get(op, [])
    if kernel_name:
        kernels = [k for k in kernels if k.name == kernel_name]
        if not kernels:
            raise DSV4Error(f"op {op}: backend {backend.name!r} has no kernel named {kernel_name!r}")
    if not kernels:
        raise DSV4Error(f"op {op}: backend {backend.name!r} implements no kernel for it")
    for k in kernels:
        if k.level >= level:
            return k
    best = max(k.level for k in kernels)
    raise DSV4Error(f"op {op}: backend {backend.name!r} has no kernel that declares level {level.label!r} "
                    f"(its strongest is {best.label!r}); refusing to run below the requested level")


_BUILTIN_FOR_DEVICE = {"cpu": "cpu", "cuda": "cuda", "npu": "npu"}


def parse_overrides(text: str | None) -> dict[str, str]:
    """'op=backend[:kernel],op2=...' -> dict. Used for the CLI flag, the environment variable and config files."""
    result: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        op, sep, target = item.partition("=")
        if not sep or not op.strip() or not target.strip():
            raise DSV4Error(f"bad op override {item!r}: expected op=backend[:kernel]")
        result[op.strip()] = target.strip()
    return result


def collect_overrides(cli: str | None = None, config_file: str | None = None) -> dict[str, str]:
    """Overrides from a TOML config file ([ops] table), then the environment, then the CLI (later ones win)."""
    merged = read_op_config(config_file) if config_file else {}
    merged.update(parse_overrides(os.environ.get(OVERRIDE_ENV)))
    merged.update(parse_overrides(cli))
    return merged


def read_op_config(path: str) -> dict[str, str]:
    """The overrides of an op-config TOML file: one [ops] table of op = "backend[:kernel]", every op a known one."""
    import tomllib

    where = f"op config {path}"
    try:
        data = tomllib.loads(validate.read_text(path, "op config"))
    except tomllib.TOMLDecodeError as e:
        raise DSV4Error(f"{where} is not valid TOML: {e}") from None
    for key in data:
        if key != "ops":
            raise validate.unknown_key(key, ["ops"], where)
    ops = data.get("ops")
    if not isinstance(ops, dict):
        raise DSV4Error(f"{where} has no [ops] table of op = \"backend[:kernel]\" lines")
    for op, target in ops.items():
        if op not in CONTRACTS:
            raise validate.unknown_key(op, CONTRACTS, f"{where}: [ops]")
        if not isinstance(target, str) or not target.partition(":")[0]:
            raise DSV4Error(f"{where}: [ops] {op} = {target!r}: expected a string \"backend[:kernel]\"")
    return ops


_DEFAULT: Registry | None = None


def default_registry() -> Registry:
    """The process-wide registry with every installed backend discovered (loaded once)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Registry().discover()
    return _DEFAULT


def add_canonical_kernels(backend: Backend) -> None:
    """Register the device-agnostic canonical composite of every op at level `exact`: the floor any backend on any
    torch device can start from before it writes a single kernel."""
    from dsv4.backends.canonical import ops as canonical

    for op in CONTRACTS:
        backend.add(op, getattr(canonical, op), Level.EXACT, "canonical")
