"""DeepSeek-V4, device-agnostic: every reduction, transcendental and quantised GEMM goes through `self.ops`.

Read top to bottom: RoPE tables, linear layers, the KV compressor, the lightning indexer, attention (sliding window +
compressed entries + sink), the MoE, the mHC block, the MTP block, the transformer. Names of parameters match the
official checkpoint (see dsv4.checkpoint.runtime_layout). The architecture follows DeepSeek's reference
`inference/model.py`; where dsv4 differs on purpose it says so (docs/model.md).

One forward step processes `s` new tokens for each of `b` sequences, each starting at its own position. Prefill,
chunked prefill and decode are the same code path: keys are always read from the cache plus the fresh chunk, and
compressed entries are always built through the compressor's block state, so the bits of a sequence do not depend on
how its prompt was chunked or what it was batched with (given batch-invariant kernels).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from dsv4.backends.contracts import KV_FP8_BLOCK, FP4_BLOCK
from dsv4.backends.registry import OpTable
from dsv4.cache import CompressorState, LayerCache, PagedRows, Step
from dsv4.config import CSA_RATIO, ModelConfig
from dsv4.parallel import ExpertGroup


# -- RoPE tables ---------------------------------------------------------------------------------------------------
def rope_table(config: ModelConfig, compressed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [max_seq_len, rope_head_dim/2] fp32, computed on the host: frequencies and angles rounded to fp32
    where the reference computes them in fp32, cos/sin in float64 rounded once (the same table on every machine).

    Compressed layers use compress_rope_theta with YaRN frequency interpolation (no mscale); window-only layers and
    MTP use rope_theta without YaRN (reference L199-244, L474-480)."""
    def fp32(t: torch.Tensor) -> torch.Tensor:   # round to fp32 where the reference computes in fp32
        return t.float().double()

    rd = config.rope_head_dim
    base = config.compress_rope_theta if compressed else config.rope_theta
    freqs = fp32(1.0 / fp32(torch.tensor(float(base), dtype=torch.float64) ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd)))
    if compressed and config.original_seq_len > 0:
        def correction_dim(n_rot: float) -> float:
            return rd * math.log(config.original_seq_len / (n_rot * 2 * math.pi)) / (2 * math.log(base))
        low = max(math.floor(correction_dim(config.beta_fast)), 0)
        high = min(math.ceil(correction_dim(config.beta_slow)), rd - 1)
        span = fp32(torch.tensor(high - low if high != low else high + 0.001 - low, dtype=torch.float64))
        smooth = fp32(1 - fp32((torch.arange(rd // 2, dtype=torch.float64) - low) / span).clamp(0, 1))
        freqs = fp32(fp32(fp32(freqs / config.rope_factor) * fp32(1 - smooth)) + fp32(freqs * smooth))
    angles = fp32(torch.outer(torch.arange(config.max_seq_len, dtype=torch.float64), freqs))
    return angles.cos().float(), angles.sin().float()


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


# -- linear layers -------------------------------------------------------------------------------------------------
class Linear(nn.Module):
    """A linear layer in one of the checkpoint formats: 'fp8' (e4m3 + 128x128 scales), 'fp4' (packed e2m1 + 1x32
    scales) or 'bf16'. Quantised weights go through quant_linear, bf16 weights through linear, whose output has the
    input's dtype (fp32 products either way: the compressor passes fp32 rows and gets fp32 back)."""

    def __init__(self, ops: OpTable, in_features: int, out_features: int, fmt: str):
        super().__init__()
        self.ops, self.fmt = ops, fmt
        if fmt == "fp8":
            self.weight = _param(out_features, in_features, dtype=torch.float8_e4m3fn)
            self.scale = _param(-(-out_features // 128), -(-in_features // 128), dtype=torch.float32)
        elif fmt == "fp4":
            self.weight = _param(out_features, in_features // 2, dtype=torch.int8)
            self.scale = _param(out_features, in_features // FP4_BLOCK, dtype=torch.float32)
        else:
            self.weight = _param(out_features, in_features, dtype=torch.bfloat16)
            self.scale = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            return self.ops.linear(x, self.weight)
        return self.ops.quant_linear(x, self.weight, self.scale)


class RMSNorm(nn.Module):
    def __init__(self, ops: OpTable, dim: int, eps: float):
        super().__init__()
        self.ops, self.eps = ops, eps
        self.weight = _param(dim, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)


# -- KV compressor -------------------------------------------------------------------------------------------------
class Compressor(nn.Module):
    """Pools every `ratio` tokens into one compressed KV entry (reference Compressor, L279-377).

    Ratio 4 overlaps: block i pools 2*ratio rows, the previous block's tokens on the first `c` channels and its own
    tokens on the last `c`. A token's projected rows wait in the per-sequence block state until their block is
    complete; a completed block is softmax-pooled per channel, normed, rotated at the block's start position and
    fake-quantised (FP8 for attention keys, Hadamard + FP4 for indexer keys)."""

    def __init__(self, ops: OpTable, config: ModelConfig, ratio: int, head_dim: int, rotate: bool):
        super().__init__()
        self.ops, self.ratio, self.head_dim, self.rotate = ops, ratio, head_dim, rotate
        self.overlap = ratio == CSA_RATIO
        width = (1 + self.overlap) * head_dim
        self.rope_dim = config.rope_head_dim
        self.ape = _param(ratio, width, dtype=torch.float32)
        self.wkv = Linear(ops, config.dim, width, "bf16")
        self.wgate = Linear(ops, config.dim, width, "bf16")
        self.norm = RMSNorm(ops, head_dim, config.norm_eps)

    def forward(self, x: torch.Tensor, step: Step, state: CompressorState, rope: tuple[torch.Tensor, torch.Tensor]):
        """Feed `x` [b, s, d] into each sequence's block state and store every block completed in this step.

        All sequences at once, with no host synchronisation. A block that is not complete yet is pooled and stored
        too, at its own future entry (or in the null block): no attention reads an entry before it is complete, and
        the block overwrites it once it is. Decode (one token each) takes a short path with the same bits: the new
        row goes into the state, and the state's block is pooled."""
        kv = self.wkv(x.float())                                              # [b, s, width] fp32
        score = self.wgate(x.float()) + self.ape[step.positions % self.ratio]   # the intra-block position bias
        if step.n_new == 1:
            pooled, blocks = self._decode_blocks(kv, score, step, state)
        else:
            pooled, blocks = self._timeline_blocks(kv, score, step, state)
        entries = self.norm(pooled.to(torch.bfloat16))
        at = (blocks.reshape(-1) * self.ratio).clamp(max=rope[0].shape[0] - 1)   # the block's start position
        entries = self.ops.rope(entries, rope[0][at], rope[1][at], False)
        if self.rotate:
            entries = self.ops.fake_quant(self.ops.hadamard(entries), "fp4", FP4_BLOCK)
        else:
            entries = _fake_quant_nope(self.ops, entries, self.rope_dim)
        store = state.entries
        store.write(store.entry_rows(step.block_table, blocks), entries, self.ops.encode_rows)

    def _decode_blocks(self, kv: torch.Tensor, score: torch.Tensor, step: Step,
                       state: CompressorState) -> tuple[torch.Tensor, torch.Tensor]:
        """One new row per sequence: written into the state's current block at its place, then that block (with the
        previous block's first c channels, ratio 4) is pooled. ([b, c] pooled fp32, [b, 1] entry ids.)"""
        m, c = self.ratio, self.head_dim
        off = m if self.overlap else 0
        held = step.start % m
        state.kv[step.slots, off + held] = kv[:, 0]
        state.score[step.slots, off + held] = score[:, 0]
        block_kv, block_score = state.kv[step.slots, off:], state.score[step.slots, off:]     # [b, m, width]
        if self.overlap:
            prev_kv, prev_score = state.kv[step.slots, :m], state.score[step.slots, :m]
            done = (held == m - 1)[:, None, None]                     # the completed block becomes "previous"
            state.kv[step.slots, :m] = torch.where(done, block_kv, prev_kv)
            state.score[step.slots, :m] = torch.where(done, block_score, prev_score)
            block_kv = torch.cat([prev_kv[..., :c], block_kv[..., c:]], dim=1)             # [b, 2m, c]
            block_score = torch.cat([prev_score[..., :c], block_score[..., c:]], dim=1)
        return self.ops.compress_pool(block_kv, block_score), (step.start // m)[:, None]

    def _timeline_blocks(self, kv: torch.Tensor, score: torch.Tensor, step: Step,
                         state: CompressorState) -> tuple[torch.Tensor, torch.Tensor]:
        """Any number of new rows: each sequence's timeline from the start of its first open block (the rows held
        in the state, then the s new rows) is cut into blocks, every one pooled. ([b*n, c], [b, n] entry ids.)"""
        m, c = self.ratio, self.head_dim
        off = m if self.overlap else 0                                 # state rows: [previous block,] current block
        b, s = kv.shape[:2]
        first = step.start // m                                        # [b] the block the state holds part of
        held = step.start - first * m                                  # [b] its tokens already in the state
        n_done = (step.start + s) // m - first                         # [b] blocks completed in this step
        span = -(-(m - 1 + s) // m) * m                                # the longest timeline, in whole blocks
        i = torch.arange(span, device=kv.device)
        from_state = (i < held[:, None])[..., None]                    # [b, span, 1]
        state_row = i.clamp(max=m - 1).expand(b, span)
        new_row = (i - held[:, None]).clamp(0, s - 1)

        def timeline(saved: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:   # -> [b, span/m, m, width]
            rows = saved[step.slots, off:off + m]
            picked = torch.where(from_state, _rows(rows, state_row), _rows(fresh, new_row))
            return picked.unflatten(1, (span // m, m))

        blocks_kv, blocks_score = timeline(state.kv, kv), timeline(state.score, score)
        self._keep_open_rows(state.kv, blocks_kv, step.slots, held + s, n_done, off)
        self._keep_open_rows(state.score, blocks_score, step.slots, held + s, n_done, off)
        if self.overlap:   # block j pools block j-1's first c channels and its own last c
            prev_kv = torch.cat([state.kv[step.slots, None, :m], blocks_kv[:, :-1]], dim=1)
            prev_score = torch.cat([state.score[step.slots, None, :m], blocks_score[:, :-1]], dim=1)
            last = (n_done - 1).clamp(min=0)
            closed = (n_done > 0)[:, None, None]                      # the last complete block becomes "previous"
            seq = torch.arange(b, device=kv.device)
            state.kv[step.slots, :m] = torch.where(closed, blocks_kv[seq, last], state.kv[step.slots, :m])
            state.score[step.slots, :m] = torch.where(closed, blocks_score[seq, last], state.score[step.slots, :m])
            blocks_kv = torch.cat([prev_kv[..., :c], blocks_kv[..., c:]], dim=2)
            blocks_score = torch.cat([prev_score[..., :c], blocks_score[..., c:]], dim=2)
        blocks = first[:, None] + torch.arange(span // m, device=kv.device)           # [b, span/m] entry ids
        return self.ops.compress_pool(blocks_kv.flatten(0, 1), blocks_score.flatten(0, 1)), blocks

    @staticmethod
    def _keep_open_rows(saved: torch.Tensor, blocks: torch.Tensor, slots: torch.Tensor, length: torch.Tensor,
                        n_done: torch.Tensor, off: int) -> None:
        """Write each sequence's rows after its last complete block (length - n_done*m of them) to the current-block
        rows of its state; the other state rows keep their values."""
        m = blocks.shape[2]
        k = torch.arange(m, device=blocks.device)
        tail = _rows(blocks.flatten(1, 2), (n_done[:, None] * m + k).clamp(max=blocks.shape[1] * m - 1))
        keep = (k < (length - n_done * m)[:, None])[..., None]
        saved[slots, off:off + m] = torch.where(keep, tail, saved[slots, off:off + m])


def _rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t [b, n, w] rows picked per sequence: out[r, i] = t[r, index[r, i]]."""
    return t.gather(1, index[..., None].expand(*index.shape, t.shape[-1]))


def _fake_quant_nope(ops: OpTable, kv: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """FP8 fake quantisation of the non-RoPE part of a KV vector (the reference's act_quant(..., 64, inplace))."""
    return torch.cat([ops.fake_quant(kv[..., :-rope_dim], "fp8", KV_FP8_BLOCK), kv[..., -rope_dim:]], dim=-1)


# -- lightning indexer ---------------------------------------------------------------------------------------------
class Indexer(nn.Module):
    """Selects, per query, the top-k compressed entries of a CSA layer (reference Indexer, L380-433). Its scores
    only select; they never enter the attention softmax."""

    def __init__(self, ops: OpTable, config: ModelConfig):
        super().__init__()
        self.ops, self.config = ops, config
        self.n_heads, self.head_dim, self.topk = config.index_n_heads, config.index_head_dim, config.index_topk
        self.wq_b = Linear(ops, config.q_lora_rank, self.n_heads * self.head_dim, config.dtype)
        self.weights_proj = Linear(ops, config.dim, self.n_heads, "bf16")
        self.compressor = Compressor(ops, config, CSA_RATIO, self.head_dim, rotate=True)

    def forward(self, x: torch.Tensor, qr: torch.Tensor, step: Step, cache: LayerCache,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, s, _ = x.shape
        cos, sin = (t[step.positions].unsqueeze(2) for t in rope)
        q = self.wq_b(qr).view(b, s, self.n_heads, self.head_dim)
        q = self.ops.rope(q, cos, sin, False)
        q = self.ops.fake_quant(self.ops.hadamard(q), "fp4", FP4_BLOCK)
        self.compressor(x, step, cache.indexer, rope)
        weights = self.weights_proj(x).float() * (self.head_dim ** -0.5 * self.n_heads ** -0.5)
        n_visible = (step.positions + 1) // CSA_RATIO
        return self.ops.indexer_topk(q, weights, cache.indexer.entries, step.block_table, n_visible, self.topk)


# -- attention -----------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Shared-KV multi-query attention over a sliding window plus compressed entries, with an attention sink, partial
    RoPE on the last rope_head_dim dims (undone on the output) and a grouped low-rank output projection."""

    def __init__(self, ops: OpTable, config: ModelConfig, layer_id: int):
        super().__init__()
        self.ops, self.config = ops, config
        self.ratio = config.layer_ratio(layer_id)
        c = config
        self.n_heads, self.head_dim, self.window = c.n_heads, c.head_dim, c.window_size
        self.softmax_scale = c.head_dim ** -0.5
        self.attn_sink = _param(c.n_heads, dtype=torch.float32)
        self.wq_a = Linear(ops, c.dim, c.q_lora_rank, c.dtype)
        self.q_norm = RMSNorm(ops, c.q_lora_rank, c.norm_eps)
        self.wq_b = Linear(ops, c.q_lora_rank, c.n_heads * c.head_dim, c.dtype)
        self.wkv = Linear(ops, c.dim, c.head_dim, c.dtype)
        self.kv_norm = RMSNorm(ops, c.head_dim, c.norm_eps)
        self.group_width = c.n_heads * c.head_dim // c.o_groups
        self.wo_a = Linear(ops, self.group_width, c.o_groups * c.o_lora_rank, "bf16")
        self.wo_b = Linear(ops, c.o_groups * c.o_lora_rank, c.dim, c.dtype)
        if self.ratio:
            self.compressor = Compressor(ops, c, self.ratio, c.head_dim, rotate=False)
        if self.ratio == CSA_RATIO:
            self.indexer = Indexer(ops, c)

    def forward(self, x: torch.Tensor, step: Step, cache: LayerCache,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, s, _ = x.shape
        ops, eps = self.ops, self.config.norm_eps
        cos, sin = (t[step.positions] for t in rope)                            # [b, s, r]
        qr = self.q_norm(self.wq_a(x))
        q = self.wq_b(qr).view(b, s, self.n_heads, self.head_dim)
        q = ops.rope(ops.rms_norm(q, None, eps), cos.unsqueeze(2), sin.unsqueeze(2), False)
        kv = ops.rope(self.kv_norm(self.wkv(x)), cos, sin, False)
        kv = _fake_quant_nope(ops, kv, self.config.rope_head_dim)               # [b, s, D]

        # Keys: the window (ring rows of earlier tokens, this step's fresh rows), then the compressed entries.
        store = cache.kv
        window = self._window_rows(step, store.rows)
        if self.ratio:
            self.compressor(x, step, cache.compressor, rope)
        if self.ratio == CSA_RATIO:
            selected = store.entry_rows(step.block_table, self.indexer(x, qr, step, cache, rope))
            o = ops.sparse_attention(q, store, kv, torch.cat([window, selected], -1), self.attn_sink,
                                     self.softmax_scale)
        elif self.ratio:
            n_comp = (step.positions + 1) // self.ratio
            o = ops.hca_attention(q, store, kv, window, step.block_table, n_comp, self.attn_sink, self.softmax_scale)
        else:
            o = ops.sparse_attention(q, store, kv, window, self.attn_sink, self.softmax_scale)
        self._write_window(kv, step, store)

        o = ops.rope(o, cos.unsqueeze(2), sin.unsqueeze(2), True)               # undo RoPE at the query position
        o = o.view(b, s, self.config.o_groups, self.group_width)
        wo_a = self.wo_a.weight.view(self.config.o_groups, self.config.o_lora_rank, self.group_width)
        o = ops.linear(o, wo_a)                                                 # [b, s, G, o_lora] bf16
        return self.wo_b(o.flatten(2))

    def _window_rows(self, step: Step, fresh_base: int) -> torch.Tensor:
        """[b, s, W] rows of each query's window, the W positions up to and including it, oldest first: ring row
        slot*W + q % W for a position before this step, fresh_base + q - start for one of this step; -1 before
        position 0."""
        W = self.window
        q = step.positions.unsqueeze(-1) - (W - 1) + torch.arange(W, device=step.start.device)
        start = step.start.view(-1, 1, 1)
        rows = torch.where(q >= start, fresh_base + q - start, step.slots.view(-1, 1, 1) * W + q % W)
        return torch.where(q < 0, -1, rows)

    def _write_window(self, kv: torch.Tensor, step: Step, store: PagedRows) -> None:
        keep = min(step.n_new, self.window)                                      # only the last W survive
        positions = step.positions[:, -keep:]
        store.write(step.slots[:, None] * self.window + positions % self.window, kv[:, -keep:], self.ops.encode_rows)


# -- MoE -----------------------------------------------------------------------------------------------------------
class Experts(nn.Module):
    """Routed experts stacked per layer: w1, w3 [E, inter, dim], w2 [E, dim, inter] in the expert format; E is this
    rank's share of the experts under expert parallelism."""

    def __init__(self, config: ModelConfig, n_experts: int):
        super().__init__()
        E, d, f = n_experts, config.dim, config.moe_inter_dim
        for name, (out_f, in_f) in {"w1": (f, d), "w2": (d, f), "w3": (f, d)}.items():
            if config.expert_dtype == "fp4":
                weight = _param(E, out_f, in_f // 2, dtype=torch.int8)
                scale = _param(E, out_f, in_f // FP4_BLOCK, dtype=torch.float32)
            else:
                weight = _param(E, out_f, in_f, dtype=torch.float8_e4m3fn)
                scale = _param(E, -(-out_f // 128), in_f // 128, dtype=torch.float32)
            self.register_module(name, _WeightPair(weight, scale))


class _WeightPair(nn.Module):
    def __init__(self, weight: nn.Parameter, scale: nn.Parameter):
        super().__init__()
        self.weight, self.scale = weight, scale


class Gate(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.weight = _param(config.n_routed_experts, config.dim, dtype=torch.bfloat16)
        if config.is_hash_layer(layer_id):
            self.tid2eid = _param(config.vocab_size, config.n_activated_experts, dtype=torch.int64)
            self.bias = None
        else:
            self.bias = _param(config.n_routed_experts, dtype=torch.float32)
            self.tid2eid = None


class SharedExpert(nn.Module):
    def __init__(self, ops: OpTable, config: ModelConfig):
        super().__init__()
        self.ops, self.limit = ops, config.swiglu_limit
        self.w1 = Linear(ops, config.dim, config.moe_inter_dim, config.dtype)
        self.w2 = Linear(ops, config.moe_inter_dim, config.dim, config.dtype)
        self.w3 = Linear(ops, config.dim, config.moe_inter_dim, config.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.ops.swiglu(self.w1(x), self.w3(x), self.limit, None))


class MoE(nn.Module):
    """DeepSeekMoE: one shared expert plus top-k routed experts (sqrt-softplus affinities; hash routing by token id
    in the first n_hash_layers layers). The routing weight scales the SwiGLU output before w2, as the reference.

    Under expert parallelism (`group`), every rank routes all tokens, runs its own experts on their rows of the
    dispatch order, and `ep_combine` brings the rows of all ranks together (docs/expert-parallel.md)."""

    def __init__(self, ops: OpTable, config: ModelConfig, layer_id: int, group: ExpertGroup | None = None):
        super().__init__()
        self.ops, self.config, self.group = ops, config, group
        self.gate = Gate(config, layer_id)
        self.own = group.experts(config.n_routed_experts) if group else range(config.n_routed_experts)
        self.experts = Experts(config, len(self.own))
        self.shared_experts = SharedExpert(ops, config)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        ops, c = self.ops, self.config
        shape = x.shape
        x = x.reshape(-1, c.dim)
        k = c.n_activated_experts
        hashed = self.gate.tid2eid[token_ids.reshape(-1)] if self.gate.tid2eid is not None else None
        weights, experts = ops.moe_gate(x, self.gate.weight, self.gate.bias, hashed, k, c.route_scale)
        order, counts = ops.moe_dispatch(experts, c.n_routed_experts)
        if self.group is None:
            out = self._routed(x[order // k], counts, weights.reshape(-1)[order])
            return ops.moe_combine(out, order, k, self.shared_experts(x)).view(shape)
        mine = order[self.group.own_rows(counts)]
        out = self._routed(x[mine // k], counts[self.own.start:self.own.stop], weights.reshape(-1)[mine])
        return ops.ep_combine(out, order, counts, k, self.shared_experts(x), self.group).view(shape)

    def _routed(self, rows: torch.Tensor, counts: torch.Tensor, route_weight: torch.Tensor) -> torch.Tensor:
        """The experts of this process on their rows (sorted by expert, counts[e] each)."""
        ops, e = self.ops, self.experts
        h = ops.swiglu(ops.grouped_quant_linear(rows, counts, e.w1.weight, e.w1.scale),
                       ops.grouped_quant_linear(rows, counts, e.w3.weight, e.w3.scale), self.config.swiglu_limit,
                       route_weight)
        return ops.grouped_quant_linear(h, counts, e.w2.weight, e.w2.scale)


# -- mHC block -----------------------------------------------------------------------------------------------------
class Block(nn.Module):
    """One layer: attention and MoE, each wrapped by mHC pre (collapse the streams) and post (expand and mix)."""

    def __init__(self, ops: OpTable, config: ModelConfig, layer_id: int, group: ExpertGroup | None = None):
        super().__init__()
        self.ops, self.config, self.layer_id = ops, config, layer_id
        self.attn_norm = RMSNorm(ops, config.dim, config.norm_eps)
        self.attn = Attention(ops, config, layer_id)
        self.ffn_norm = RMSNorm(ops, config.dim, config.norm_eps)
        self.ffn = MoE(ops, config, layer_id, group)
        for part in ("attn", "ffn"):   # mHC parameters around each sublayer, flat names as in the checkpoint
            setattr(self, f"hc_{part}_fn", _param(config.hc_mix_dim, config.hc_mult * config.dim, dtype=torch.float32))
            setattr(self, f"hc_{part}_base", _param(config.hc_mix_dim, dtype=torch.float32))
            setattr(self, f"hc_{part}_scale", _param(3, dtype=torch.float32))

    def forward(self, h: torch.Tensor, token_ids: torch.Tensor, step: Step,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        c, ops = self.config, self.ops
        cache = step.cache.layers[self.layer_id]
        x, post, comb = ops.mhc_pre(h, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base, c.norm_eps, c.hc_eps,
                                    c.hc_sinkhorn_iters)
        h = ops.mhc_post(self.attn(self.attn_norm(x), step, cache, rope), h, post, comb)
        x, post, comb = ops.mhc_pre(h, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base, c.norm_eps, c.hc_eps,
                                    c.hc_sinkhorn_iters)
        return ops.mhc_post(self.ffn(self.ffn_norm(x), token_ids), h, post, comb)


class StreamHead(nn.Module):
    """Owns the parameters that collapse the hc residual streams before the output head (mhc_head, no Sinkhorn) and
    the final norm. The main model and each MTP block have one, under the checkpoint's flat names."""

    def add_stream_head(self, ops: OpTable, config: ModelConfig) -> None:
        self.hc_head_fn = _param(config.hc_mult, config.hc_mult * config.dim, dtype=torch.float32)
        self.hc_head_base = _param(config.hc_mult, dtype=torch.float32)
        self.hc_head_scale = _param(1, dtype=torch.float32)
        self.norm = RMSNorm(ops, config.dim, config.norm_eps)

    def logits(self, h: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        c = self.config
        y = self.ops.mhc_head(h, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, c.norm_eps, c.hc_eps)
        return self.ops.linear(self.norm(y).float(), head)                     # fp32 logits


class MTPBlock(Block, StreamHead):
    """Multi-token prediction: predicts token t+2 from the main model's streams at t and the embedding of token t+1.
    A full block (window-only attention, score-routed MoE) plus e_proj/h_proj/enorm/hnorm and its own stream head;
    the embedding and the output head are shared with the main model."""

    def __init__(self, ops: OpTable, config: ModelConfig, layer_id: int, group: ExpertGroup | None = None):
        super().__init__(ops, config, layer_id, group)
        self.e_proj = Linear(ops, config.dim, config.dim, config.dtype)
        self.h_proj = Linear(ops, config.dim, config.dim, config.dtype)
        self.enorm = RMSNorm(ops, config.dim, config.norm_eps)
        self.hnorm = RMSNorm(ops, config.dim, config.norm_eps)
        self.add_stream_head(ops, config)

    def forward(self, h: torch.Tensor, embedded_next: torch.Tensor, next_ids: torch.Tensor, step: Step,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = self.e_proj(self.enorm(embedded_next)).unsqueeze(2) + self.h_proj(self.hnorm(h))
        return super().forward(x, next_ids, step, rope)


# -- the transformer -----------------------------------------------------------------------------------------------
class Transformer(StreamHead):
    """The whole model; with an expert-parallel `group`, this process holds only its share of the routed experts."""

    def __init__(self, config: ModelConfig, ops: OpTable, group: ExpertGroup | None = None):
        super().__init__()
        self.config, self.ops = config, ops
        self.embed = nn.Module()
        self.embed.weight = _param(config.vocab_size, config.dim, dtype=torch.bfloat16)
        self.layers = nn.ModuleList(Block(ops, config, i, group) for i in range(config.n_layers))
        self.mtp = nn.ModuleList(MTPBlock(ops, config, config.n_layers + i, group)
                                 for i in range(config.n_mtp_layers))
        self.add_stream_head(ops, config)
        self.head = nn.Module()
        self.head.weight = _param(config.vocab_size, config.dim, dtype=torch.bfloat16)
        self._rope: dict[tuple[str, bool], tuple[torch.Tensor, torch.Tensor]] = {}

    def rope_for(self, layer_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        compressed = self.config.layer_ratio(layer_id) > 0
        key = (str(device), compressed)
        if key not in self._rope:
            self._rope[key] = tuple(t.to(device) for t in rope_table(self.config, compressed))
        return self._rope[key]

    def forward(self, tokens: torch.Tensor, step: Step, all_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [b, s] -> (logits [b, s or 1, vocab] fp32, final streams [b, s, hc, d] bf16)."""
        h = self.embed.weight[tokens].unsqueeze(2).repeat(1, 1, self.config.hc_mult, 1)
        for layer in self.layers:
            h = layer(h, tokens, step, self.rope_for(layer.layer_id, tokens.device))
        last = h if all_logits else h[:, -1:]
        return self.logits(last, self.head.weight), h

    def mtp_logits(self, h: torch.Tensor, next_ids: torch.Tensor, step: Step) -> torch.Tensor:
        """Logits of the first MTP block for token t+2, from the streams at t and the ids of token t+1 (DeepSeek-V3
        convention; the reference generate.py never calls MTP)."""
        mtp = self.mtp[0]
        out = mtp(h, self.embed.weight[next_ids], next_ids, step, self.rope_for(mtp.layer_id, h.device))
        return mtp.logits(out, self.head.weight)
