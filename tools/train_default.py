"""Train dsv4's embedded default model: the `default` preset of DeepSeek-V4 on the Python standard library.

    python tools/train_default.py --out OUT [--steps N | --budget SECONDS] [--device cuda]

The model is the real architecture at a small size (dsv4/config.py `default`): mHC residual streams with Sinkhorn
mixing, CSA layers (ratio-4 overlapping compressor + lightning indexer top-k) and HCA layers (ratio 128) next to a
sliding window, an attention sink, DeepSeekMoE with hash-routed first layers and bias-balanced routing elsewhere, and
the MTP block. dsv4's inference model is not differentiable (quantised weights, exact kernels), so this file holds a
compact training mirror in plain torch: the same computation, written densely, over a dict of parameters with exactly
the official checkpoint names and shapes (linears as full-precision [out, in]). Export is then 1:1:
`dsv4.checkpoint.write_checkpoint(..., weights=...)` quantises routed experts to FP4 and the other linears to FP8 with
e8m0 block scales, as DeepSeek ships them.

Training-time choices (the reference inference code does not say how DeepSeek trains):
- Attention is dense and masked: each query sees its window of keys plus the compressed entries visible to it
  (complete blocks only); CSA then keeps only the indexer's top-k entries, as at inference.
- The indexer learns by distillation, as in DeepSeek's sparse-attention training: a KL loss pulls its score
  distribution over the visible entries towards the main attention's (heads summed, renormalised over those entries,
  no gradient into it). Its inputs are detached, so the indexer never changes the language model. For the first
  `--dense-warmup` of the steps CSA attends to every visible entry while the indexer learns; then top-k is on.
- FP8 fake quantisation of cached KV and Hadamard + FP4 of the indexer's q and keys run in the forward pass with a
  straight-through gradient. Weights train in full precision and are quantised once, at export.
- Hash layers route by a frequency-balanced `tid2eid` table built from the training bytes (DeepSeek's construction
  is undisclosed). Score-routed layers balance with the auxiliary-loss-free bias update (bias += rate * sign(mean
  load - load)). MTP predicts token t+2 from the main streams at t and token t+1; its loss is weighted by
  `--mtp-weight`.

Data: dsv4.evaluation's file list and split (every 20th standard-library file held out) and its segments for held-out
numbers. A training sample is BOS followed by `--seq - 1` bytes from a uniformly random offset in the training files
joined with EOS after each file. Everything random comes from `--seed`; GPU kernels with atomic adds keep a rerun from
being bitwise identical.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dsv4.backends.contracts import FP4_BLOCK, KV_FP8_BLOCK
from dsv4.checkpoint import E4M3, official_layout, random_weights, write_checkpoint
from dsv4.config import CSA_RATIO, ModelConfig, preset
from dsv4.evaluation import SEGMENT_TOKENS, evenly_spaced, read_source, segments, split, stdlib_files
from dsv4.formats import fake_quant
from dsv4.model import rope_table

BF16 = torch.bfloat16
Params = dict[str, torch.Tensor]


# -- data ----------------------------------------------------------------------------------------------------------
def file_tokens(path: Path) -> np.ndarray:
    """The byte-level tokenizer's ids of a file: its text's UTF-8 bytes (as dsv4.evaluation reads it)."""
    return np.frombuffer(read_source(path).encode("utf-8"), dtype=np.uint8).astype(np.int64)


def training_stream(files: list[Path], eos_id: int) -> np.ndarray:
    return np.concatenate([np.append(file_tokens(f), eos_id) for f in files])


def sample_batch(stream: np.ndarray, batch: int, seq: int, bos_id: int, gen: torch.Generator) -> torch.Tensor:
    """[batch, seq + 1] tokens: BOS, then seq bytes from a random offset (inputs [:, :-1], targets [:, 1:])."""
    starts = torch.randint(0, len(stream) - seq, (batch,), generator=gen).numpy()
    windows = stream[starts[:, None] + np.arange(seq)]
    return torch.from_numpy(np.concatenate([np.full((batch, 1), bos_id), windows], axis=1))


def balanced_hash_table(stream: np.ndarray, config: ModelConfig) -> torch.Tensor:
    """tid2eid [vocab, k]: tokens by decreasing frequency each take the k least-loaded experts (ties: lower id)."""
    counts = np.bincount(stream, minlength=config.vocab_size).astype(np.float64)
    load = np.zeros(config.n_routed_experts)
    table = np.zeros((config.vocab_size, config.n_activated_experts), dtype=np.int64)
    for token in np.argsort(-counts, kind="stable"):
        chosen = np.argsort(load, kind="stable")[:config.n_activated_experts]
        table[token] = np.sort(chosen)
        load[chosen] += counts[token]
    return torch.from_numpy(table)


# -- the training mirror: pieces ---------------------------------------------------------------------------------
def lin(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """An FP8/FP4/bf16 linear of the inference model, trained as a bf16 matmul."""
    return F.linear(x.to(BF16), weight.to(BF16))


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return (y if weight is None else weight * y).to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the interleaved pairs of the last 2 * cos.shape[-1] dims (GPT-J style), as dsv4's rope op."""
    r = 2 * cos.shape[-1]
    pairs = x[..., -r:].float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    s = -sin if inverse else sin
    rotated = torch.stack((a * cos - b * s, a * s + b * cos), dim=-1).flatten(-2)
    return torch.cat((x[..., :-r], rotated.to(x.dtype)), dim=-1)


def straight_through(x: torch.Tensor, fmt: str, block: int) -> torch.Tensor:
    """dsv4's fake quantisation in the forward pass, identity in the backward pass."""
    return x + (fake_quant(x.detach(), fmt, block) - x).detach()


def fake_quant_nope(kv: torch.Tensor, rope_dim: int) -> torch.Tensor:
    return torch.cat((straight_through(kv[..., :-rope_dim], "fp8", KV_FP8_BLOCK), kv[..., -rope_dim:]), dim=-1)


def hadamard_matrix(n: int, device: torch.device) -> torch.Tensor:
    """Sylvester-order Walsh-Hadamard matrix times n^-1/2 (symmetric): x @ H is dsv4's hadamard op."""
    i = torch.arange(n)
    parity = torch.zeros(n, n, dtype=torch.int64)
    for bit in range(n.bit_length()):
        parity ^= ((i[:, None] & i[None, :]) >> bit) & 1
    return ((1 - 2 * parity).float() * n ** -0.5).to(device)


class Mirror:
    """The differentiable DeepSeek-V4 over a dict of official-named parameters `P` (see the module docstring)."""

    def __init__(self, config: ModelConfig, P: Params, device: torch.device):
        self.c, self.P, self.device = config, P, device
        self.ropes = {kind: tuple(t.to(device) for t in rope_table(config, kind)) for kind in (False, True)}
        self.hadamard = hadamard_matrix(config.index_head_dim, device)
        self.sparse = True          # CSA keeps the indexer's top-k; off during the dense warm-up
        self.loads: dict[str, torch.Tensor] = {}    # gate prefix -> tokens per expert in the last forward
        self.indexer_kl: list[torch.Tensor] = []

    # mHC -------------------------------------------------------------------------------------------------------
    def mhc_pre(self, h: torch.Tensor, p: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c, hc = self.c, self.c.hc_mult
        fn, scale, base = self.P[f"{p}_fn"], self.P[f"{p}_scale"], self.P[f"{p}_base"]
        xf = h.flatten(2).float()
        m = F.linear(xf, fn) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + c.norm_eps)
        pre = torch.sigmoid(m[..., :hc] * scale[0] + base[:hc]) + c.hc_eps
        post = 2 * torch.sigmoid(m[..., hc:2 * hc] * scale[1] + base[hc:2 * hc])
        comb = (m[..., 2 * hc:] * scale[2] + base[2 * hc:]).unflatten(-1, (hc, hc))
        comb = comb.softmax(-1) + c.hc_eps
        comb = comb / (comb.sum(-2, keepdim=True) + c.hc_eps)
        for _ in range(c.hc_sinkhorn_iters - 1):
            comb = comb / (comb.sum(-1, keepdim=True) + c.hc_eps)
            comb = comb / (comb.sum(-2, keepdim=True) + c.hc_eps)
        y = (pre.unsqueeze(-1) * h.float()).sum(2)
        return y.to(BF16), post, comb

    @staticmethod
    def mhc_post(f: torch.Tensor, h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """out_k = post_k * f + sum_j comb[j, k] * h_j (the transposed comb)."""
        mixed = torch.einsum("btjk,btjd->btkd", comb, h.float())
        return (post.unsqueeze(-1) * f.float().unsqueeze(2) + mixed).to(BF16)

    def logits(self, h: torch.Tensor, p: str) -> torch.Tensor:
        """Collapse the streams (sigmoid weights, no Sinkhorn), final norm, fp32 head."""
        c = self.c
        xf = h.flatten(2).float()
        m = F.linear(xf, self.P[f"{p}hc_head_fn"]) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + c.norm_eps)
        pre = torch.sigmoid(m * self.P[f"{p}hc_head_scale"] + self.P[f"{p}hc_head_base"]) + c.hc_eps
        y = (pre.unsqueeze(-1) * h.float()).sum(2).to(BF16)
        return F.linear(rms_norm(y, self.P[f"{p}norm.weight"], c.norm_eps).float(), self.P["head.weight"])

    # attention -------------------------------------------------------------------------------------------------
    def compress(self, x: torch.Tensor, p: str, ratio: int, width: int, rotate: bool,
                 rope_t: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Entries of every complete block [B, T // ratio, width]: per-channel softmax pooling (CSA: the previous
        block on the first `width` channels, its own on the last), norm, RoPE at the block start, fake quant."""
        B, T, _ = x.shape
        n = T // ratio
        if n == 0:
            return x.new_zeros(B, 0, width, dtype=BF16)
        kv = F.linear(x.float(), self.P[f"{p}wkv.weight"])[:, :n * ratio].unflatten(1, (n, ratio))
        score = F.linear(x.float(), self.P[f"{p}wgate.weight"])[:, :n * ratio].unflatten(1, (n, ratio))
        score = score + self.P[f"{p}ape"]
        if ratio == CSA_RATIO:
            prev_kv = F.pad(kv[:, :-1, :, :width], (0, 0, 0, 0, 1, 0))
            prev_score = F.pad(score[:, :-1, :, :width], (0, 0, 0, 0, 1, 0), value=float("-inf"))
            kv = torch.cat((prev_kv, kv[..., width:]), dim=2)
            score = torch.cat((prev_score, score[..., width:]), dim=2)
        pooled = (score.softmax(dim=2) * kv).sum(2)
        entries = rms_norm(pooled.to(BF16), self.P[f"{p}norm.weight"], self.c.norm_eps)
        starts = torch.arange(n, device=x.device) * ratio
        entries = rope(entries, rope_t[0][starts], rope_t[1][starts])
        if rotate:
            return straight_through((entries.float() @ self.hadamard).to(BF16), "fp4", FP4_BLOCK)
        return fake_quant_nope(entries, self.c.rope_head_dim)

    def indexer_scores(self, x: torch.Tensor, qr: torch.Tensor, p: str,
                       rope_t: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """S[b, t, j] = sum_h relu(<q_h, key_j>) * w_h over the indexer's keys, [B, T, T // CSA_RATIO] fp32."""
        c = self.c
        B, T, _ = x.shape
        cos, sin = rope_t[0][:T, None], rope_t[1][:T, None]
        q = rope(lin(qr, self.P[f"{p}wq_b.weight"]).unflatten(-1, (c.index_n_heads, c.index_head_dim)), cos, sin)
        q = straight_through((q.float() @ self.hadamard).to(BF16), "fp4", FP4_BLOCK)
        keys = self.compress(x, f"{p}compressor.", CSA_RATIO, c.index_head_dim, True, rope_t)
        w = lin(x, self.P[f"{p}weights_proj.weight"]).float() * (c.index_head_dim ** -0.5 * c.index_n_heads ** -0.5)
        dots = torch.einsum("bthd,bjd->bthj", q.float(), keys.float()).relu()    # fp32, as dsv4 selects
        return (dots * w.unsqueeze(-1)).sum(2)

    def attention(self, x: torch.Tensor, p: str, layer_id: int) -> torch.Tensor:
        c, P = self.c, self.P
        B, T, _ = x.shape
        H, D, W, ratio = c.n_heads, c.head_dim, c.window_size, c.layer_ratio(layer_id)
        rope_t = self.ropes[ratio > 0]
        cos, sin = rope_t[0][:T], rope_t[1][:T]
        qr = rms_norm(lin(x, P[f"{p}wq_a.weight"]), P[f"{p}q_norm.weight"], c.norm_eps)
        q = rms_norm(lin(qr, P[f"{p}wq_b.weight"]).unflatten(-1, (H, D)), None, c.norm_eps)
        q = rope(q, cos[:, None], sin[:, None])
        kv = rope(rms_norm(lin(x, P[f"{p}wkv.weight"]), P[f"{p}kv_norm.weight"], c.norm_eps), cos, sin)
        kv = fake_quant_nope(kv, c.rope_head_dim)
        scale = D ** -0.5

        t = torch.arange(T, device=x.device)
        back = t[:, None] - t[None, :]
        scores = [(torch.einsum("bthd,bsd->bhts", q, kv).float() * scale).masked_fill(~((back >= 0) & (back < W)),
                                                                                        float("-inf"))]
        values = [kv]
        if ratio:
            entries = self.compress(x, f"{p}compressor.", ratio, D, False, rope_t)
            n = entries.shape[1]
            visible = torch.arange(n, device=x.device)[None, :] < ((t + 1) // ratio)[:, None]       # [T, n]
            comp = torch.einsum("bthd,bjd->bhtj", q, entries).float() * scale
            allowed = visible
            if ratio == CSA_RATIO:
                allowed = self.select(comp, x, qr, p, rope_t, visible)
            scores.append(comp.masked_fill(~allowed, float("-inf")))
            values.append(entries)
        sink = P[f"{p}attn_sink"].view(1, H, 1, 1).expand(B, H, T, 1)
        probs = torch.cat(scores + [sink], dim=-1).softmax(-1)[..., :-1].to(BF16)
        o = torch.einsum("bhts,bsd->bthd", probs[..., :T], kv)
        if ratio:
            o = o + torch.einsum("bhtj,bjd->bthd", probs[..., T:], values[1])
        o = rope(o, cos[:, None], sin[:, None], inverse=True).flatten(2).unflatten(-1, (c.o_groups, -1))
        wo_a = P[f"{p}wo_a.weight"].to(BF16).unflatten(0, (c.o_groups, c.o_lora_rank))
        return lin(torch.einsum("btgi,goi->btgo", o, wo_a).flatten(2), P[f"{p}wo_b.weight"])

    def select(self, comp: torch.Tensor, x: torch.Tensor, qr: torch.Tensor, p: str,
               rope_t: tuple[torch.Tensor, torch.Tensor], visible: torch.Tensor) -> torch.Tensor:
        """CSA: the entries the main attention may use ([B, 1, T, n]), and the indexer's distillation loss."""
        c = self.c
        scores = self.indexer_scores(x.detach(), qr.detach(), f"{p}indexer.", rope_t).masked_fill(~visible,
                                                                                                   float("-inf"))
        rows = slice(3, None)                       # queries 0..2 see no complete block
        target = comp.detach()[:, :, rows].masked_fill(~visible[rows], float("-inf")).softmax(-1).mean(1)
        log_q = scores[:, rows].log_softmax(-1).masked_fill(~visible[rows], 0)
        kl = (target * (target.clamp_min(1e-30).log() - log_q)).sum(-1)
        self.indexer_kl.append(kl.mean())
        if not self.sparse:
            return visible
        k = min(c.index_topk, comp.shape[-1])
        top = scores.topk(k, dim=-1).indices
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
        return (chosen & visible).unsqueeze(1)

    # MoE -------------------------------------------------------------------------------------------------------
    def swiglu(self, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
        """The shared expert: SwiGLU with the gate clamped above and the up projection both ways."""
        limit = self.c.swiglu_limit
        g, u = lin(x, w1).float().clamp(max=limit), lin(x, w3).float().clamp(-limit, limit)
        return lin((F.silu(g) * u).to(BF16), w2)

    def moe(self, x: torch.Tensor, token_ids: torch.Tensor, p: str, layer_id: int) -> torch.Tensor:
        """Shared expert plus the routed experts, computed densely: every expert on every token, weighted by its
        routing weight (0 where not chosen), which equals the sparse sum without a host sync per layer."""
        c, P = self.c, self.P
        k, E = c.n_activated_experts, c.n_routed_experts
        flat = x.reshape(-1, c.dim)
        affinity = F.softplus(F.linear(flat.float(), P[f"{p}gate.weight"])).clamp_min(1e-30).sqrt()
        if c.is_hash_layer(layer_id):
            experts = P[f"{p}gate.tid2eid"][token_ids.reshape(-1)]
        else:
            experts = (affinity.detach() + P[f"{p}gate.bias"]).topk(k, dim=-1).indices
            self.loads[p] = torch.bincount(experts.flatten(), minlength=E)
        weights = affinity.gather(1, experts)
        weights = weights / weights.sum(-1, keepdim=True) * c.route_scale
        route = torch.zeros_like(affinity).scatter_add(1, experts, weights)         # [tokens, E]
        w1, w2, w3 = (torch.stack([P[f"{p}experts.{e}.{w}.weight"] for e in range(E)]).to(BF16)
                      for w in ("w1", "w2", "w3"))
        limit, xb = c.swiglu_limit, flat.to(BF16)
        g = torch.einsum("nd,efd->nef", xb, w1).float().clamp(max=limit)
        u = torch.einsum("nd,efd->nef", xb, w3).float().clamp(-limit, limit)
        routed = torch.einsum("nef,edf->nd", (F.silu(g) * u * route.unsqueeze(-1)).to(BF16), w2)
        shared = self.swiglu(flat, *(P[f"{p}shared_experts.{w}.weight"] for w in ("w1", "w2", "w3")))
        return (routed.float() + shared.float()).to(BF16).view(x.shape)

    # blocks and the model ---------------------------------------------------------------------------------------
    def block(self, h: torch.Tensor, token_ids: torch.Tensor, p: str, layer_id: int) -> torch.Tensor:
        eps = self.c.norm_eps
        x, post, comb = self.mhc_pre(h, f"{p}hc_attn")
        h = self.mhc_post(self.attention(rms_norm(x, self.P[f"{p}attn_norm.weight"], eps), f"{p}attn.", layer_id),
                          h, post, comb)
        x, post, comb = self.mhc_pre(h, f"{p}hc_ffn")
        return self.mhc_post(self.moe(rms_norm(x, self.P[f"{p}ffn_norm.weight"], eps), token_ids, f"{p}ffn.",
                                      layer_id), h, post, comb)

    def forward(self, tokens: torch.Tensor, mtp: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tokens [B, T] -> (logits [B, T, V] fp32, MTP logits [B, T-1, V] for token t+2, or None)."""
        c, P = self.c, self.P
        self.indexer_kl = []
        embed = P["embed.weight"].to(BF16)
        h = embed[tokens].unsqueeze(2).expand(-1, -1, c.hc_mult, -1)
        for i in range(c.n_layers):
            h = self.block(h, tokens, f"layers.{i}.", i)
        if not mtp:
            return self.logits(h, ""), None
        nxt = tokens[:, 1:]
        e = rms_norm(embed[nxt], P["mtp.0.enorm.weight"], c.norm_eps)
        x = lin(e, P["mtp.0.e_proj.weight"]).unsqueeze(2) + lin(rms_norm(h[:, :-1], P["mtp.0.hnorm.weight"],
                                                                         c.norm_eps), P["mtp.0.h_proj.weight"])
        x = self.block(x, nxt, "mtp.0.", c.n_layers)
        return self.logits(h, ""), self.logits(x, "mtp.0.")


# -- parameters, export, evaluation -----------------------------------------------------------------------------------
def initial_params(config: ModelConfig, seed: int, hash_table: torch.Tensor, device: torch.device) -> Params:
    """dsv4's seeded random model as trainable fp32 leaves (gate biases and hash tables are not trained by SGD)."""
    P: Params = {}
    for name, value in random_weights(config, seed):
        if name.endswith("gate.tid2eid"):
            P[name] = hash_table.to(device)
        elif name.endswith("gate.bias"):
            P[name] = value.float().to(device)
        else:
            P[name] = value.float().to(device).requires_grad_(True)
    return P


def export_weights(P: Params, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, value) in official order for write_checkpoint: FP8/FP4 linears as fp32, the rest in checkpoint dtype."""
    for name, spec in official_layout(config).items():
        if name.endswith(".scale"):
            continue
        value = P[name].detach().to("cpu", copy=True)   # tensors shared between layers are written once each
        yield name, value.float() if spec.dtype in (E4M3, torch.int8) else value.to(spec.dtype)


@torch.no_grad()
def mirror_nll(mirror: Mirror, segs: list[list[int]], batch: int) -> tuple[float, int]:
    """(sum of -log p, scored tokens) over BOS-prefixed segments, as dsv4.evaluation scores them."""
    c, sparse = mirror.c, mirror.sparse
    mirror.sparse = True
    total, count = 0.0, 0
    for first in range(0, len(segs), batch):
        group = segs[first:first + batch]
        width = max(len(s) for s in group)
        tokens = torch.tensor([s + [c.eos_token_id] * (width - len(s)) for s in group], device=mirror.device)
        logits, _ = mirror.forward(tokens)
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
        mask = torch.tensor([[i < len(s) - 1 for i in range(width - 1)] for s in group], device=mirror.device)
        total += float(nll.view(mask.shape)[mask].double().sum())
        count += int(mask.sum())
    mirror.sparse = sparse
    return total, count


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# -- main ------------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--stdlib", type=Path, default=None, help="standard-library root (default: this Python's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps (0: as many as --budget allows)")
    ap.add_argument("--budget", type=float, default=240.0, help="training seconds, when --steps is 0")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=SEGMENT_TOKENS, help="tokens per sample, BOS included")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--dense-warmup", type=float, default=0.1, help="fraction of steps with dense CSA")
    ap.add_argument("--mtp-weight", type=float, default=0.3)
    ap.add_argument("--bias-rate", type=float, default=1e-3, help="gate-bias balancing step")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--eval-segments", type=int, default=64, help="held-out segments for the curve")
    ap.add_argument("--card-segments", type=int, default=128, help="held-out subset `dsv4 eval` scores by default")
    ap.add_argument("--full-eval", action=argparse.BooleanOptionalAction, default=True,
                    help="also score every held-out segment with the mirror")
    ap.add_argument("--slice", type=Path, default=Path("tests/data/heldout_slice.txt"),
                    help="the held-out slice tests/test_default_model.py scores")
    args = ap.parse_args()
    t_start = time.monotonic()

    config, device = preset("default"), torch.device(args.device)
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    log = (args.out / "train_log.jsonl").open("w")

    def record(**entry) -> None:
        log.write(json.dumps(entry) + "\n")
        log.flush()
        print(json.dumps(entry), flush=True)

    train_files, held_files = split(stdlib_files(args.stdlib))
    stream = training_stream(train_files, config.eos_token_id)
    held = segments([file_tokens(f).tolist() for f in held_files], config.bos_token_id)
    curve_segs = evenly_spaced(held, args.eval_segments)
    record(event="data", train_files=len(train_files), train_tokens=len(stream), held_out_files=len(held_files),
           held_out_segments=len(held), held_out_tokens=sum(len(s) - 1 for s in held), python=platform.python_version())

    P = initial_params(config, args.seed, balanced_hash_table(stream, config), device)
    mirror = Mirror(config, P, device)
    trainable = {n: t for n, t in P.items() if t.requires_grad}
    decay = [t for n, t in trainable.items() if n.endswith(".weight") and t.dim() == 2]
    no_decay = [t for n, t in trainable.items() if not (n.endswith(".weight") and t.dim() == 2)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    total = args.steps or 10 ** 9
    record(event="model", params=sum(t.numel() for t in trainable.values()), steps=args.steps or None,
           batch=args.batch, seq=args.seq)

    step, t_train, tokens_seen = 0, time.monotonic(), 0
    while step < total:
        mirror.sparse = step >= args.dense_warmup * total
        lr = lr_at(step, total, args.lr, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = sample_batch(stream, args.batch, args.seq, config.bos_token_id, gen).to(device)
        logits, mtp_logits = mirror.forward(batch[:, :-1], mtp=True)
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        mtp_loss = F.cross_entropy(mtp_logits.flatten(0, 1), batch[:, 2:].flatten())
        kl = torch.stack(mirror.indexer_kl).mean()
        opt.zero_grad(set_to_none=True)
        (loss + args.mtp_weight * mtp_loss + kl).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(list(trainable.values()), 1.0)
        opt.step()
        with torch.no_grad():                       # auxiliary-loss-free balancing of score-routed layers
            for p, load in mirror.loads.items():
                P[f"{p}gate.bias"] += args.bias_rate * torch.sign(load.float().mean() - load.float())
        step += 1
        tokens_seen += batch[:, 1:].numel()
        if not args.steps and step == 10:
            t_10 = time.monotonic()
        if not args.steps and step == 30:           # fit the schedule's length to the time budget
            per_step = (time.monotonic() - t_10) / 20
            total = max(args.warmup * 2, step + int((args.budget - (time.monotonic() - t_train)) / per_step))
            record(event="calibrated", steps=total, seconds_per_step=per_step)
        if step % 10 == 0 or step == total:
            record(event="train", step=step, tokens=tokens_seen, loss=loss.item(), mtp_loss=mtp_loss.item(),
                   indexer_kl=kl.item(), grad_norm=grad_norm.item(), lr=lr, sparse=mirror.sparse,
                   seconds=time.monotonic() - t_train)
        if step % args.eval_every == 0 or step == total:
            nll, n = mirror_nll(mirror, curve_segs, args.batch)
            record(event="held_out", step=step, tokens=tokens_seen, loss=nll / n, segments=len(curve_segs))
    train_seconds = time.monotonic() - t_train
    write_checkpoint(config, args.out / "default", weights=export_weights(P, config))
    record(event="exported", path=str(args.out / "default"), seconds=time.monotonic() - t_start)

    results = {"steps": step, "tokens": tokens_seen, "train_seconds": train_seconds, "seed": args.seed,
               "batch": args.batch, "seq": args.seq, "device": torch.cuda.get_device_name() if device.type == "cuda"
               else platform.processor() or "cpu", "torch": torch.__version__, "python": platform.python_version()}
    subsets = {"card_subset": evenly_spaced(held, args.card_segments),
               "slice": segments([file_tokens(args.slice).tolist()], config.bos_token_id)}
    if args.full_eval:
        subsets["all_held_out"] = held
    for label, segs in subsets.items():
        nll, n = mirror_nll(mirror, segs, args.batch)
        results[f"mirror_{label}"] = {"segments": len(segs), "tokens": n, "nll_sum": nll, "ppl": math.exp(nll / n)}
        record(event="mirror_eval", subset=label, segments=len(segs), tokens=n, ppl=math.exp(nll / n))

    results["total_seconds"] = time.monotonic() - t_start
    (args.out / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(args.out / "train_log.jsonl", args.out / "loss.png")


def plot(log_path: Path, png: Path) -> None:
    """Training loss (main and MTP) and held-out loss against tokens seen, in bits per byte."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss curve", file=sys.stderr)
        return
    entries = [json.loads(line) for line in log_path.read_text().splitlines()]
    train = [e for e in entries if e["event"] == "train"]
    held = [e for e in entries if e["event"] == "held_out"]
    bits = 1 / math.log(2)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot([e["tokens"] / 1e6 for e in train], [e["loss"] * bits for e in train], lw=0.8, label="training (main)")
    ax.plot([e["tokens"] / 1e6 for e in train], [e["mtp_loss"] * bits for e in train], lw=0.8, alpha=0.6,
            label="training (MTP, token t+2)")
    ax.plot([e["tokens"] / 1e6 for e in held], [e["loss"] * bits for e in held], "o-", label="held-out files")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("bits per byte")
    ax.set_ylim(0, 8.2)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("dsv4 default model on the Python standard library")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
