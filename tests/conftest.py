"""Shared fixtures (small random checkpoints written once per session in the official layout, and one `dsv4 serve`)
and the helpers every test compares with: `same_bits` for bit-for-bit claims, `assert_within_contract` for
tolerances, which come from the op contracts and are never re-typed here."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch

import dsv4
from dsv4.api import DEFAULT_MODEL
from dsv4.backends.contracts import CONTRACTS
from dsv4.checkpoint import write_checkpoint
from dsv4.config import CSA_RATIO, preset

_IEEE_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor (any dtype, fp8 included), every NaN as one pattern: IEEE fixes that a result is NaN,
    not which NaN."""
    t = t.detach().cpu().contiguous()
    if t.dtype in _IEEE_FLOATS:
        t = torch.where(torch.isnan(t), torch.full_like(t, math.nan), t)
    return t.reshape(-1).view(torch.uint8)


def same_bits(a, b) -> bool:
    """Tensors, or (nested) tuples and lists of them, of the same shapes and dtypes and the same bits."""
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(same_bits(x, y) for x, y in zip(a, b))
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def assert_within_contract(op: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    """|out - ref| <= atol + rtol * |ref| everywhere, with the fast-level tolerance that the contract of `op` states
    (ref is typically an fp64 computation of what the contract says)."""
    c = CONTRACTS[op]
    torch.testing.assert_close(out.double(), ref.double(), atol=c.atol, rtol=c.rtol)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Keep the embedded-default checkpoint out of the user's home directory."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DSV4_CACHE", str(tmp_path_factory.mktemp("dsv4-cache")))
    yield
    mp.undo()


def short_block_config():
    """The tiny preset with an HCA ratio of 8 instead of 128, so tests cross many compression blocks cheaply."""
    return dataclasses.replace(preset("tiny"), compress_ratios=(0, CSA_RATIO, 8, CSA_RATIO, 0))


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


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """`dsv4 serve` of the embedded default model with a small chat template added (served as "chatty"), at the exact
    level with no prefix cache: every prompt is computed. One server for the serve tests of every module."""
    from serving import Server            # the openai client: imported by the tests that serve only

    model = tmp_path_factory.mktemp("models") / "chatty"
    shutil.copytree(DEFAULT_MODEL, model)
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE, "bos_token": "<s>"}))
    with Server(tmp_path_factory.mktemp("logs") / "serve.log", "--model", str(model), "--determinism", "exact",
                "--no-prefix-cache", "--max-batch", "8", "--max-queue", "64") as s:
        yield s


def random_prompt(n: int, seed: int, vocab: int = 256) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()
