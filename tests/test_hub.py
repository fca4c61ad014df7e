"""`--model org/name` finds a checkpoint already in the local Hugging Face cache, and never downloads."""
from __future__ import annotations

import os

import pytest

from dsv4.api import checkpoint_config
from dsv4.errors import DSV4Error
from dsv4.hub import hub_cache, resolve_model

from test_cli import dsv4_at_once

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tmp_path, tiny_dir, monkeypatch):
    """A Hugging Face cache holding the tiny checkpoint as repo dsv4-test/tiny at COMMIT (refs/main), its files
    linked from blobs/ as huggingface_hub lays them out."""
    repo = tmp_path / "hub" / "models--dsv4-test--tiny"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in tiny_dir.iterdir():
        blob = repo / "blobs" / f.name
        blob.write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return snapshot


def test_the_cache_is_found_where_huggingface_hub_puts_it(monkeypatch, tmp_path):
    for name in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub_cache() == tmp_path / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub_cache() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "direct"))
    assert hub_cache() == tmp_path / "direct"


def test_a_repo_id_resolves_to_its_snapshot_by_ref_or_by_commit(hf_cache, tiny_dir):
    assert resolve_model("dsv4-test/tiny") == hf_cache
    assert resolve_model(f"dsv4-test/tiny@{COMMIT}") == hf_cache
    assert checkpoint_config("dsv4-test/tiny") == checkpoint_config(tiny_dir)


def test_an_existing_directory_wins_over_a_repo_id_and_other_paths_pass_through(hf_cache, tmp_path, monkeypatch):
    local = tmp_path / "dsv4-test" / "tiny"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model("dsv4-test/tiny") == local.relative_to(tmp_path)
    assert str(resolve_model("/no/such/dir")) == "/no/such/dir"


def test_a_repo_missing_from_the_cache_is_one_clear_error_that_names_the_cache(hf_cache):
    with pytest.raises(DSV4Error, match=r"dsv4-test/other: .* not in the Hugging Face cache at .*never downloads"):
        resolve_model("dsv4-test/other")
    with pytest.raises(DSV4Error, match=f"no revision 'v2' of it \\(snapshots: {COMMIT}\\)"):
        resolve_model("dsv4-test/tiny@v2")


def test_run_takes_a_repo_id_and_generates_what_the_directory_generates(hf_cache, tiny_dir):
    args = ("run", "--max-new-tokens", "4", "--quiet", "--prompt", "def")
    by_id, by_dir = dsv4_at_once((*args, "--model", "dsv4-test/tiny"), (*args, "--model", str(tiny_dir)))
    assert by_id.returncode == 0, by_id.stderr
    assert by_id.stdout == by_dir.stdout and by_id.stdout.startswith("def")
