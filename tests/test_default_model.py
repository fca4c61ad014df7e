"""The embedded default model (docs/model-card.md): official layout, the card's held-out numbers. (The same bits on
another exact backend: tests/test_vendor_plugin.py.)"""
from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest

import dsv4
from dsv4.api import DEFAULT_MODEL
from dsv4.checkpoint import E4M3, load_checkpoint, official_layout
from dsv4.cli import DEFAULT_PROMPT
from dsv4.config import preset
from dsv4.evaluation import perplexity, read_source, segments
from dsv4.formats import dequantize_fp4_weight, dequantize_fp8_weight

REPO = Path(__file__).resolve().parents[1]
SLICE = REPO / "tests" / "data" / "heldout_slice.txt"    # bytes 8176..10219 of the held-out random.py (Python 3.11.7)
CARD_SLICE_PPL = 2.6149         # docs/model-card.md: dsv4, exact level, CPU
TOLERANCE = 5e-4                # the card's rounding; exact backends reproduce the bits on any machine


@pytest.fixture(scope="module")
def default():
    return dsv4.load(determinism="exact")


def _slice_segments(pipe) -> list[list[int]]:
    return segments([pipe.tokenizer.encode(read_source(SLICE))], pipe.config.bos_token_id)


def test_shipped_files_are_the_official_layout_of_the_default_preset():
    config, tensors, _ = load_checkpoint(DEFAULT_MODEL)
    assert config == preset("default")
    layout = official_layout(config)
    assert layout["layers.2.ffn.experts.0.w1.weight"].dtype.itemsize == 1 and "fp4" == config.expert_dtype
    assert "layers.0.ffn.gate.tid2eid" in layout and "layers.1.attn.indexer.wq_b.scale" in layout
    assert sum(p.stat().st_size for p in DEFAULT_MODEL.iterdir()) < 15e6


def test_held_out_slice_perplexity_is_the_cards_and_close_to_the_trained_bf16_model(default):
    result = perplexity(default.model, _slice_segments(default), default.device)
    assert result.tokens == 2044
    assert abs(result.value - CARD_SLICE_PPL) < TOLERANCE
    summary = json.loads((REPO / "tools" / "default-run" / "summary.json").read_text())
    assert result.value < 1.10 * summary["mirror_slice"]["ppl"]       # FP4/FP8 export within 10% of BF16
    assert result.value < 256 / 20                                     # far below a uniform guess over bytes


def _dequantised_official_weights(config, tensors) -> dict:
    """The loaded checkpoint back under official names with linears as fp32 [out, in]: what the mirror trains."""
    weights = {}
    for name, spec in official_layout(config).items():
        expert = re.match(r"^(.*\.ffn\.experts)\.(\d+)\.(w[123])\.weight$", name)
        if name.endswith(".scale"):
            continue
        if expert:
            stacked = f"{expert[1]}.{expert[3]}"
            e = int(expert[2])
            weights[name] = dequantize_fp4_weight(tensors[f"{stacked}.weight"][e], tensors[f"{stacked}.scale"][e])
        elif spec.dtype == E4M3 and not name.endswith("wo_a.weight"):       # wo_a is bf16 once loaded
            weights[name] = dequantize_fp8_weight(tensors[name], tensors[name.replace(".weight", ".scale")])
        else:
            weights[name] = tensors[name] if name.endswith("tid2eid") else tensors[name].float()
    return weights


def test_training_mirror_on_the_shipped_weights_computes_what_dsv4_computes(default):
    """tools/train_default.py's differentiable mirror, given the exported (quantised) weights, scores the slice as
    dsv4's inference model does, up to activation quantisation and rounding."""
    spec = importlib.util.spec_from_file_location("train_default", REPO / "tools" / "train_default.py")
    train_default = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_default)
    config, tensors, _ = load_checkpoint(DEFAULT_MODEL)
    mirror = train_default.Mirror(config, _dequantised_official_weights(config, tensors), default.device)
    nll, count = train_default.mirror_nll(mirror, _slice_segments(default), batch=4)
    assert count == 2044
    assert abs(math.exp(nll / count) / CARD_SLICE_PPL - 1) < 0.005


def test_default_prompt_gets_a_python_looking_body(default):
    text = default.complete(DEFAULT_PROMPT, max_new_tokens=32)
    assert text.startswith("    ") and any(word in text for word in ("if ", "return", "for ", "while "))
