"""The scheduler's Python API and the prefix cache on disk: files survive a restart, bad files (corrupt, another
model's, an older format, cut short) are ignored with a warning and recomputed, writes are atomic, the size cap
holds, and a directory that cannot be written turns persistence off with one warning."""
from __future__ import annotations

import errno
import shutil

import pytest
import torch

import dsv4
from dsv4.engine import Request, prompt_key
from dsv4.serve import store as store_module
from dsv4.serve.prefix import chain_keys
from dsv4.serve.scheduler import Scheduler
from dsv4.serve.store import SUFFIX, PrefixStore

PREFIX = [256] + list(b"import sys\n\n\ndef main(argv):\n    return len(argv)\n" * 6)[:255]   # one cache block
FIRST = PREFIX + list(b"\nif __name__ == '__main__':\n")
SECOND = PREFIX + list(b"\n\ndef helper():\n")
KEY = "0" * 32                     # the model key these tests' files are written under
OTHER = "f" * 32                   # another model's


@pytest.fixture(scope="module")
def pipe():
    return dsv4.load(determinism="exact")


def request(prompt: list[int], n: int = 3) -> Request:
    return Request(prompt, max_new_tokens=n, request_id=prompt_key(prompt))


def run(pipe, prompt, store=None, prefix=True):
    """(tokens, Finished) of one request through a fresh scheduler: a fresh cache, as after a restart."""
    scheduler = Scheduler(pipe, max_batch=2, prefix=prefix, store=store).start()
    try:
        stream = scheduler.stream(request(prompt), top_logprobs=0)
        tokens = [(t.token, t.logprob) for t in stream]
        return tokens, stream.finished, scheduler.prefix.stats if prefix else None
    finally:
        scheduler.close()


@pytest.fixture(scope="module")
def expected(pipe):
    """SECOND computed from scratch."""
    return run(pipe, SECOND, prefix=False)[0]


@pytest.fixture(scope="module")
def written(pipe, tmp_path_factory):
    """A store directory holding the prefix file FIRST leaves behind."""
    root = tmp_path_factory.mktemp("prefixes")
    run(pipe, FIRST, PrefixStore(root, KEY, 1 << 30, pytest.fail))
    return root


def test_python_api_streams_the_engines_tokens_for_many_requests(pipe):
    prompts = [FIRST, SECOND, [256] + list(b"x = 1\n")]
    engine = pipe.engine(max_batch=1)
    reference = [engine.generate([request(p, 4)])[0].tokens for p in prompts]
    scheduler = Scheduler(pipe, max_batch=2).start()
    try:
        streams = [scheduler.stream(request(p, 4)) for p in prompts]
        got = [[t.token for t in s] for s in streams]
    finally:
        scheduler.close()
    assert got == [r[:len(g)] for r, g in zip(reference, got)]
    assert [s.finished.reason for s in streams] == ["stop" if len(g) < 4 else "length" for g in got]


def test_requests_admitted_together_compute_their_shared_prefix_once(pipe, expected):
    scheduler = Scheduler(pipe, max_batch=2).start()
    try:
        streams = [scheduler.stream(request(p), top_logprobs=0) for p in (FIRST, SECOND)]
        tokens = [[(t.token, t.logprob) for t in s] for s in streams]
    finally:
        scheduler.close()
    assert tokens[1] == expected
    assert [s.finished.cached_tokens for s in streams] == [0, 256]


def test_a_prefix_on_disk_is_used_after_a_restart_with_the_same_bits(pipe, written, expected, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(written, root)
    assert [p.name for p in (root / KEY).iterdir()] == [chain_keys(FIRST)[0] + SUFFIX]
    tokens, finished, stats = run(pipe, SECOND, PrefixStore(root, KEY, 1 << 30, pytest.fail))
    assert tokens == expected
    assert finished.cached_tokens == 256 and stats.disk_hits == 1


def _flip_payload_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def _older_format(path):
    data = path.read_bytes()
    header, _, payload = data.partition(b"\n")
    path.write_bytes(header.replace(b" %d " % store_module.FORMAT_VERSION, b" 0 ") + b"\n" + payload)


def _cut_short(path):
    path.write_bytes(path.read_bytes()[:1000])


@pytest.mark.parametrize("spoil, reason", [
    (_flip_payload_byte, "checksum mismatch"),
    (_older_format, "format version 0"),
    (_cut_short, "checksum mismatch"),
    ("other model", "another model"),
])
def test_a_bad_file_is_ignored_with_a_warning_and_recomputed(pipe, written, expected, tmp_path, spoil, reason):
    root = tmp_path / "copy"
    shutil.copytree(written, root)
    name = chain_keys(FIRST)[0] + SUFFIX
    if spoil == "other model":      # the same block as another model wrote it, put where this model's files are
        rows, state = PrefixStore(root, KEY, 1 << 30, pytest.fail).load(name.removesuffix(SUFFIX), PREFIX,
                                                                        *_shapes(pipe))
        PrefixStore(root, OTHER, 1 << 30, pytest.fail).save(name.removesuffix(SUFFIX), PREFIX, rows, state)
        shutil.copy(root / OTHER / name, root / KEY / name)
    else:
        spoil(root / KEY / name)
    warnings = []
    tokens, finished, stats = run(pipe, SECOND, PrefixStore(root, KEY, 1 << 30, warnings.append))
    assert tokens == expected and finished.cached_tokens == 0 and stats.disk_hits == 0
    assert len(warnings) == 1 and reason in warnings[0] and "recomputing" in warnings[0]
    fresh = PrefixStore(root, KEY, 1 << 30, pytest.fail)          # and the recomputed block replaced the file
    assert fresh.load(name.removesuffix(SUFFIX), PREFIX, *_shapes(pipe)) is not None


def _shapes(pipe):
    scheduler = Scheduler(pipe, max_batch=1)
    return scheduler.cache.block_rows(0), scheduler.cache.slot_state(0)


def _fake(n: int) -> list[torch.Tensor]:
    return [torch.full((n,), 1.0)]


def test_the_directory_stays_under_its_size_cap_dropping_the_least_recently_used(tmp_path):
    probe = PrefixStore(tmp_path / "probe", KEY, 1 << 30, pytest.fail)
    probe.save("a", [1], _fake(1000), _fake(10))
    size = probe.used_bytes
    store = PrefixStore(tmp_path / "capped", KEY, 2 * size + size // 2, pytest.fail)
    for key in "abc":
        store.save(key, [1], _fake(1000), _fake(10))
        assert store.load("a", [1], _fake(1000), _fake(10)) is not None or key == "c"   # "a" stays in use
    files = sorted(p.name for p in (tmp_path / "capped" / KEY).iterdir())
    assert files == ["a" + SUFFIX, "c" + SUFFIX]
    assert sum(p.stat().st_size for p in (tmp_path / "capped" / KEY).iterdir()) <= store.max_bytes


def test_a_write_that_fails_leaves_no_file_and_turns_persistence_off_once(tmp_path, monkeypatch):
    def full_disk(_):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(store_module.os, "fsync", full_disk)
    warnings = []
    store = PrefixStore(tmp_path, KEY, 1 << 30, warnings.append)
    store.save("a", [1], _fake(10), _fake(10))
    store.save("b", [1], _fake(10), _fake(10))
    assert list((tmp_path / KEY).iterdir()) == []              # neither a half file nor a temporary one
    assert not store.enabled and len(warnings) == 1 and "No space left" in warnings[0]


def test_an_unwritable_directory_means_memory_only_with_one_warning(pipe, tmp_path, expected):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    warnings = []
    store = PrefixStore(blocker / "prefixes", KEY, 1 << 30, warnings.append)
    assert not store.enabled and len(warnings) == 1 and "memory only" in warnings[0]
    assert run(pipe, SECOND, store)[0] == expected
    assert len(warnings) == 1
