"""Checksum manifests: the sha256 of every file of a checkpoint, and of every tensor inside its safetensors files.

`dsv4-manifest.json` sits next to the files it describes:

    {"format": "dsv4-manifest", "version": 1,
     "files": {"config.json": {"size": 954, "sha256": "…"},
               "model-00001-of-00001.safetensors": {"size": 13173248, "sha256": "…", "tensors": {"embed.weight": "…"}}}}

dsv4 writes one with every checkpoint it writes; `dsv4 checkpoint manifest DIR` writes one for a download (its per-file
sha256 are what Hugging Face lists for each LFS file, so they can be compared once). Loads check against it: a file's
size always, its sha256 when the checkpoint is at most HASH_ON_LOAD_LIMIT bytes (or when asked), and a mismatch names
the file and the tensor whose bytes changed. `dsv4 checkpoint verify DIR` hashes a checkpoint of any size.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dsv4 import validate
from dsv4.errors import DSV4Error

MANIFEST_FILE = "dsv4-manifest.json"
FORMAT, VERSION = "dsv4-manifest", 1
# Loads hash checkpoints up to this size by default (the embedded 13 MB model in ~20 ms); a larger one only has its
# file sizes checked on load, and `dsv4 checkpoint verify` hashes it (disk-bound: minutes for V4-Flash).
HASH_ON_LOAD_LIMIT = 1 << 30
_CHUNK = 1 << 24
_MAX_HEADER = 100 << 20          # safetensors caps its JSON header at 100 MB


@dataclass(frozen=True)
class FileDigest:
    size: int
    sha256: str
    tensors: dict[str, str] = field(default_factory=dict)   # safetensors files: tensor key -> sha256 of its bytes


@dataclass(frozen=True)
class Manifest:
    format: str
    version: int
    files: dict[str, FileDigest]

    @property
    def nbytes(self) -> int:
        return sum(d.size for d in self.files.values())


# -- hashing --------------------------------------------------------------------------------------------------------
def digest(path: Path) -> FileDigest:
    """One pass over the file: its sha256 and, for a safetensors file, the sha256 of each tensor's bytes."""
    size = path.stat().st_size
    ranges = _tensor_ranges(path, size) if path.suffix == ".safetensors" else []
    whole = hashlib.sha256()
    parts = {name: hashlib.sha256() for name, _, _ in ranges}
    i, pos = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            view, end = memoryview(chunk), pos + len(chunk)
            whole.update(view)
            while i < len(ranges) and ranges[i][1] < end:      # the tensors that start in this chunk or before
                name, begin, stop = ranges[i]
                parts[name].update(view[max(begin, pos) - pos:min(stop, end) - pos])
                if stop > end:                                  # it continues in the next chunk
                    break
                i += 1
            pos = end
    return FileDigest(size, whole.hexdigest(), {name: h.hexdigest() for name, h in parts.items()})


def _tensor_ranges(path: Path, size: int) -> list[tuple[str, int, int]]:
    """(key, begin, end) file offsets of each tensor, in file order; [] when the header is not readable (a corrupt
    header then shows as a whole-file mismatch)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8 or not 0 < (n := struct.unpack("<Q", head)[0]) <= min(_MAX_HEADER, size - 8):
            return []
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return []
    if not isinstance(header, dict):
        return []
    base, ranges = 8 + n, []
    for key, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) and key != "__metadata__" else None
        if isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets):
            ranges.append((key, base + offsets[0], base + offsets[1]))
    return sorted(ranges, key=lambda r: r[1])


def _digest_all(root: Path, files: Sequence[str],
                progress: Callable[[int, int], None] | None = None) -> dict[str, FileDigest]:
    """Digests of `files` under `root`, several files at a time (hashlib releases the GIL on large buffers)."""
    done: dict[str, FileDigest] = {}
    with ThreadPoolExecutor(max_workers=min(len(files), os.cpu_count() or 1) or 1) as pool:
        for name, result in zip(files, pool.map(lambda f: digest(root / f), files)):
            done[name] = result
            if progress:
                progress(len(done), len(files))
    return done


# -- writing and reading --------------------------------------------------------------------------------------------
def write_manifest(root: Path, files: Sequence[str], progress: Callable[[int, int], None] | None = None) -> Manifest:
    """Hash `files` (names relative to `root`) into root/dsv4-manifest.json."""
    for name in files:
        validate.input_file(root / name, "checkpoint file")
    manifest = Manifest(FORMAT, VERSION, _digest_all(root, files, progress))
    (root / MANIFEST_FILE).write_text(json.dumps(asdict(manifest), indent=1) + "\n")
    return manifest


def read_manifest(root: Path) -> Manifest | None:
    """root's manifest, schema-checked; None when there is none."""
    path = root / MANIFEST_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(validate.read_text(path, "manifest"))
    except json.JSONDecodeError as e:
        raise DSV4Error(f"{path} is not valid JSON: {e}") from None
    manifest = validate.from_json(Manifest, data, str(path))
    if (manifest.format, manifest.version) != (FORMAT, VERSION):
        raise DSV4Error(f"{path} is not a {FORMAT} version {VERSION} file (format {manifest.format!r}, "
                        f"version {manifest.version})")
    return manifest


def require(root: Path) -> Manifest:
    """root's manifest, or an error saying how to write one."""
    found = read_manifest(root)
    if found is None:
        raise DSV4Error(f"{root} has no {MANIFEST_FILE} to verify against; `dsv4 checkpoint manifest {root}` "
                        f"writes one")
    return found


# -- verifying ------------------------------------------------------------------------------------------------------
def check_sizes(root: Path, manifest: Manifest) -> None:
    """Every file of the manifest is present with its size (cheap: catches truncated and missing files)."""
    for name, expected in manifest.files.items():
        path = root / name
        if not path.is_file():
            raise DSV4Error(f"{name}, listed in {MANIFEST_FILE}, is missing from {root}")
        if (size := path.stat().st_size) != expected.size:
            raise DSV4Error(f"{name} in {root} has {size} bytes, {MANIFEST_FILE} says {expected.size} "
                            f"(truncated or replaced)")


def verify_files(root: Path, manifest: Manifest, progress: Callable[[int, int], None] | None = None) -> None:
    """Hash every file of the manifest; the first mismatch is a DSV4Error naming the file and the tensor."""
    check_sizes(root, manifest)
    actual = _digest_all(root, list(manifest.files), progress)
    for name, expected in manifest.files.items():
        if actual[name].sha256 != expected.sha256:
            raise DSV4Error(_mismatch(root, name, expected, actual[name]))


def check_on_load(root: Path, verify: bool | None, notice: Callable[[str], None]) -> Manifest | None:
    """What a load checks, returning the manifest it checked against (None: none). `verify` None: hash a checkpoint
    of at most HASH_ON_LOAD_LIMIT bytes, only check the sizes of a larger one; True: always hash (a manifest must
    exist); False: skip the manifest. `notice` is told when files go unhashed, and how to check them."""
    if verify is False:
        return None
    found = require(root) if verify else read_manifest(root)
    if found is None:
        notice(f"{root} has no {MANIFEST_FILE}, so its files are not checksummed; `dsv4 checkpoint manifest {root}` "
               f"writes one, which every later load checks")
        return None
    if verify or found.nbytes <= HASH_ON_LOAD_LIMIT:
        verify_files(root, found)
    else:
        check_sizes(root, found)
        notice(f"{found.nbytes / 2**30:.1f} GiB of checkpoint files were not hashed on load (over "
               f"{HASH_ON_LOAD_LIMIT >> 30} GiB; --verify hashes them); `dsv4 checkpoint verify {root}` checks them "
               f"against {MANIFEST_FILE}")
    return found


def _mismatch(root: Path, name: str, expected: FileDigest, actual: FileDigest) -> str:
    where = f"{name} in {root} does not match its sha256 in {MANIFEST_FILE} (the file is corrupt or was changed)"
    if expected.tensors and not actual.tensors:
        return f"{where}: its safetensors header is not readable"
    changed = [key for key, sha in expected.tensors.items() if actual.tensors.get(key) != sha]
    if changed:
        more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
        return f"{where}: the bytes of tensor {changed[0]}{more} differ"
    if expected.tensors:
        return f"{where}: its safetensors header differs"
    return where
