"""KV compressor semantics as the reference defines them: which tokens each compressed entry covers, and the values."""
from __future__ import annotations

import torch

from dsv4.cache import KVCache
from dsv4.config import CSA_RATIO

from conftest import assert_within_contract, short_block_config


def _entries(pipe, layer_id: int, x: torch.Tensor) -> torch.Tensor:
    """Run one layer's compressor on x [1, s, d] from position 0; return its compressed entries [s // ratio, D]."""
    attn = pipe.model.layers[layer_id].attn
    cache = KVCache(pipe.config, 1, "cpu")
    step = cache.step([0], [0], x.shape[1])
    with torch.inference_mode():
        attn.compressor(x, step, cache.layers[layer_id].compressor, pipe.model.rope_for(layer_id, x.device))
    store = cache.layers[layer_id].compressor.entries
    entries = torch.arange(x.shape[1] // attn.ratio)[None]
    return store.read(store.entry_rows(step.block_table, entries))[0].float()


def _tokens(s: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(1, s, d, generator=torch.Generator().manual_seed(seed)).bfloat16()


def _changed_entries(pipe, layer_id: int, s: int, token: int) -> set[int]:
    x = _tokens(s, pipe.config.dim, 0)
    y = x.clone()
    y[0, token] += 1.0
    a, b = _entries(pipe, layer_id, x), _entries(pipe, layer_id, y)
    return {i for i in range(a.shape[0]) if not torch.equal(a[i], b[i])}


def test_csa_entry_i_covers_tokens_of_blocks_i_minus_1_and_i(short_block):
    m = CSA_RATIO                                    # layer 1 is CSA: overlapping blocks
    for token in (0, 3, 4, 9, 15):
        expected = {token // m, token // m + 1} & set(range(20 // m))
        assert _changed_entries(short_block, 1, 20, token) == expected, f"token {token}"


def test_hca_entry_i_covers_only_block_i(short_block):
    m = short_block_config().compress_ratios[2]      # layer 2 is HCA with ratio 8 in this config
    for token in (0, 7, 8, 21):
        assert _changed_entries(short_block, 2, 32, token) == {token // m}, f"token {token}"


def test_compressed_entries_match_an_independent_float64_reference(short_block):
    layer_id, s = 1, 16
    comp = short_block.model.layers[layer_id].attn.compressor
    x = _tokens(s, short_block.config.dim, 1)
    got = _entries(short_block, layer_id, x)

    m, c, rd = comp.ratio, comp.head_dim, short_block.config.rope_head_dim
    kv = x[0].double() @ comp.wkv.weight.double().T                       # [s, 2c]
    score = x[0].double() @ comp.wgate.weight.double().T + comp.ape.double().repeat(s // m, 1)
    cos, sin = (t.double() for t in short_block.model.rope_for(layer_id, x.device))
    for i in range(s // m):
        cur = slice(i * m, (i + 1) * m)
        rows_kv, rows_score = kv[cur, c:], score[cur, c:]                   # this block: the "B" channels
        if i > 0:
            prev = slice((i - 1) * m, i * m)                               # previous block: the "A" channels
            rows_kv, rows_score = torch.cat([kv[prev, :c], rows_kv]), torch.cat([score[prev, :c], rows_score])
        pooled = (torch.softmax(rows_score, dim=0) * rows_kv).sum(0)
        normed = pooled * torch.rsqrt(pooled.square().mean() + short_block.config.norm_eps) * comp.norm.weight.double()
        a, b = normed[-rd::2].clone(), normed[-rd + 1::2].clone()          # interleaved RoPE at the block start
        cs, sn = cos[i * m], sin[i * m]
        normed[-rd::2], normed[-rd + 1::2] = a * cs - b * sn, a * sn + b * cs
        # the non-RoPE part is fake-quantised to FP8 (blocks of 64): within 1/16 of each block's largest value
        for blk in range(0, c - rd, 64):
            ref, val = normed[blk:blk + 64], got[i, blk:blk + 64].double()
            assert (ref - val).abs().max() <= ref.abs().max() / 16, f"entry {i} block {blk}"
        assert_within_contract("rope", got[i, -rd:], normed[-rd:])
