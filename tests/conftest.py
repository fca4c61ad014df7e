"""Shared fixtures: small random checkpoints written once per session in the official layout."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import dsv4
from dsv4.checkpoint import write_checkpoint
from dsv4.config import preset


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Keep the embedded-default checkpoint out of the user's home directory."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DSV4_CACHE", str(tmp_path_factory.mktemp("dsv4-cache")))
    yield
    mp.undo()


def short_block_config():
    """The tiny preset with an HCA ratio of 8 instead of 128, so tests cross many compression blocks cheaply."""
    return dataclasses.replace(preset("tiny"), compress_ratios=(0, 4, 8, 4, 0))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return write_checkpoint(preset("tiny"), tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def short_block_dir(tmp_path_factory):
    return write_checkpoint(short_block_config(), tmp_path_factory.mktemp("short-block"), seed=1)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    return dsv4.load(tiny_dir, determinism="exact")


@pytest.fixture(scope="session")
def short_block(short_block_dir):
    return dsv4.load(short_block_dir, determinism="exact")


def random_prompt(n: int, seed: int, vocab: int = 256) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()
