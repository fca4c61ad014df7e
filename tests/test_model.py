"""The model core: parameter layout, shapes, and the equivalence of prefill, chunked prefill and decode."""
from __future__ import annotations

import math

import pytest
import torch

from dsv4 import formats
from dsv4.api import resolve_ops
from dsv4.backends.contracts import FP8_BLOCK
from dsv4.checkpoint import runtime_layout
from dsv4.config import CSA_RATIO, preset
from dsv4.model import Transformer, rope_table

from conftest import assert_within_contract, random_prompt, same_bits

# Prefill, chunked prefill and decode run the same kernels on the same rows in the same order, so on the exact
# CPU reference their logits must agree bit for bit: the tolerance of these tests is zero.


@pytest.mark.parametrize("name", ["tiny", "small", "v4-flash", "v4-pro"])
def test_model_parameters_match_the_runtime_checkpoint_layout(name):
    config = preset(name)
    with torch.device("meta"):
        model = Transformer(config, resolve_ops("cpu"))
    params = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    expected = {k: (tuple(spec.shape), spec.dtype) for k, spec in runtime_layout(config).items()}
    assert params == expected


def test_tiny_preset_contains_every_layer_kind():
    c = preset("tiny")
    ratios = c.compress_ratios[:c.n_layers]
    assert ratios[0] == 0 and CSA_RATIO in ratios and 128 in ratios       # window-only lead, CSA and HCA interleaved
    assert c.n_hash_layers >= 1 and c.n_hash_layers < c.n_layers   # hash-routed and score-routed MoE
    assert c.n_mtp_layers == 1 and c.compress_ratios[-1] == 0


def test_forward_returns_fp32_logits_and_bf16_streams(tiny):
    engine = tiny.engine()
    logits = engine.prefill(random_prompt(9, 0), slot=0, all_logits=True)
    assert logits.shape == (1, 9, tiny.config.vocab_size) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all() and logits.std() > 0.1
    last = engine.prefill(random_prompt(9, 0), slot=0)
    assert last.shape == (1, 1, tiny.config.vocab_size)
    assert same_bits(last[0, -1], logits[0, -1])


def test_decode_token_by_token_matches_full_prefill_across_window_and_block_boundaries(short_block):
    # window 16, CSA ratio 4 (overlapping, indexer top-8), HCA ratio 8: 45 tokens cross all of them several times
    prompt = random_prompt(45, 1)
    full = short_block.engine().prefill(prompt, slot=0, all_logits=True)
    stepwise = short_block.engine(prefill_chunk=1).prefill(prompt, slot=0, all_logits=True)
    assert same_bits(stepwise, full)


def test_decode_after_prefill_crosses_a_128_token_hca_block(tiny):
    prompt = random_prompt(134, 2)
    full = tiny.engine().prefill(prompt, slot=0, all_logits=True)[0]
    engine = tiny.engine()
    engine.prefill(prompt[:123], slot=1)
    for pos in range(123, 134):                                    # teacher-forced decode across position 128
        out = engine.forward(torch.tensor([[prompt[pos]]]), [pos], [1])
        assert same_bits(out[0, -1], full[pos]), f"position {pos}"


def test_chunked_prefill_matches_whole_prefill(short_block):
    prompt = random_prompt(40, 3)
    whole = short_block.engine().prefill(prompt, slot=0, all_logits=True)
    for chunk in (5, 16):
        assert same_bits(short_block.engine(prefill_chunk=chunk).prefill(prompt, 0, all_logits=True), whole)


def _fp64_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xd = x.double()
    return weight.double() * xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + eps)


def _fp64_fp8_linear(x: torch.Tensor, linear) -> torch.Tensor:
    """x @ W.T in fp64 with the dequantised FP8 weight and x quantised per 128-block to e4m3, as the quant_linear
    contract quantises activations."""
    xq, xs = formats.quantize_act_fp8(x.reshape(-1, x.shape[-1]), FP8_BLOCK)
    x_deq = (xq.double() * xs.double().repeat_interleave(FP8_BLOCK, -1)).reshape(x.shape)
    return x_deq @ formats.dequantize_fp8_weight(linear.weight, linear.scale).double().T


def test_mtp_block_input_is_the_projected_next_embedding_plus_the_projected_streams(tiny, monkeypatch):
    """DeepSeek's MTP: the block predicting token t+2 takes e_proj(enorm(embed(token t+1))) + h_proj(hnorm(h_t)),
    h_t the main model's streams at t. Recomputed here in fp64 from the dequantised weights, and compared with what
    the MTP block really receives (the first mhc_pre call of mtp_logits); the swapped wiring is shown to differ."""
    from dsv4.model import Step

    c, model, mtp = tiny.config, tiny.model, tiny.model.mtp[0]
    assert mtp.e_proj.fmt == mtp.h_proj.fmt == "fp8"
    engine = tiny.engine()
    prompt = random_prompt(12, 4)
    step = Step(start=torch.tensor([0]), slots=torch.tensor([0]), cache=engine.cache, n_new=11)
    engine.cache.reset(0)
    block_inputs = []
    original = model.ops.mhc_pre

    def recording_mhc_pre(x, *args):
        block_inputs.append(x.clone())
        return original(x, *args)

    with torch.inference_mode():
        _, streams = model(torch.tensor([prompt[:11]]), step)
        monkeypatch.setattr(model.ops, "mhc_pre", recording_mhc_pre)
        logits = model.mtp_logits(streams, torch.tensor([prompt[1:12]]), step)
    assert logits.shape == (1, 11, c.vocab_size) and logits.dtype == torch.float32 and torch.isfinite(logits).all()

    def combine(embedding_proj, stream_proj):
        e = model.embed.weight[torch.tensor([prompt[1:12]])]
        normed_e = _fp64_rms_norm(e, mtp.enorm.weight, c.norm_eps).to(torch.bfloat16)
        normed_h = _fp64_rms_norm(streams, mtp.hnorm.weight, c.norm_eps).to(torch.bfloat16)
        return _fp64_fp8_linear(normed_e, embedding_proj)[:, :, None] + _fp64_fp8_linear(normed_h, stream_proj)

    received = block_inputs[0]
    assert received.shape == streams.shape
    assert_within_contract("quant_linear", received, combine(mtp.e_proj, mtp.h_proj))
    with pytest.raises(AssertionError):
        assert_within_contract("quant_linear", received, combine(mtp.h_proj, mtp.e_proj))


def test_rope_tables_use_yarn_only_on_compressed_layers():
    c = preset("v4-flash")
    cos_c, sin_c = rope_table(c, compressed=True)
    cos_w, sin_w = rope_table(c, compressed=False)
    assert cos_c.shape == (c.max_seq_len, c.rope_head_dim // 2)
    # window layers: plain theta = 10000; angle of pair i at position 1 is 10000^(-2i/64)
    assert math.isclose(math.atan2(sin_w[1, 5], cos_w[1, 5]), 10000 ** (-10 / 64), rel_tol=1e-6)
    # compressed layers, base 160000, YaRN: fast pairs below low=15 are kept, slow pairs from high=25 are divided by
    # the factor 16
    f = lambda i: 160000 ** (-2 * i / 64)
    assert math.isclose(math.atan2(sin_c[1, 3], cos_c[1, 3]), f(3), rel_tol=1e-6)
    assert math.isclose(math.atan2(sin_c[1, 30], cos_c[1, 30]), f(30) / 16, rel_tol=1e-6)


def test_hash_layers_route_each_token_by_its_id_whatever_the_context(tiny):
    """Layers below n_hash_layers take a token's experts from the checkpoint's tid2eid table, so the same token id
    goes to the same experts in any context; score-routed layers depend on the hidden state."""
    ops, seen = tiny.model.ops, []
    original = ops.moe_gate

    def recording_gate(x, weight, bias, hash_experts, k, route_scale):
        weights, experts = original(x, weight, bias, hash_experts, k, route_scale)
        seen.append((hash_experts is not None, experts.clone()))
        return weights, experts

    ops.moe_gate = recording_gate
    try:
        first, second = [7, 42, 99, 42], [42, 3, 3, 200]
        for prompt in (first, second):
            tiny.engine().prefill(prompt, slot=0)
    finally:
        ops.moe_gate = original
    n_layers = tiny.config.n_layers
    runs = [seen[:n_layers], seen[n_layers:]]
    for layer in range(tiny.config.n_hash_layers):
        table = tiny.model.layers[layer].ffn.gate.tid2eid
        for prompt, run in zip((first, second), runs):
            hashed, experts = run[layer]
            assert hashed and torch.equal(experts, table[torch.tensor(prompt)])
        assert torch.equal(runs[0][layer][1][1], runs[1][layer][1][0])      # token 42 in both prompts
    assert not any(hashed for hashed, _ in runs[0][tiny.config.n_hash_layers:])


def test_a_written_checkpoint_loads_back_to_identical_logits(tiny, tmp_path):
    """Writing the same model again (here split into 3 shards) and loading it gives the same logits, bit for bit."""
    import dsv4
    from dsv4.checkpoint import write_checkpoint

    again = dsv4.load(write_checkpoint(preset("tiny"), tmp_path / "resharded", seed=0, shards=3), determinism="exact")
    prompt = random_prompt(20, 9)
    assert same_bits(again.engine().prefill(prompt, 0, all_logits=True), tiny.engine().prefill(prompt, 0, all_logits=True))
