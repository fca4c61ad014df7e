"""The vendor's own kernels. In a real backend these call fused device kernels; here they are plain torch.

Each must match its contract in dsv4.backends.contracts. A kernel declared `exact` must perform exactly the
contract's canonical order of fp32 operations (so `dsv4 verify --level exact` finds it bit-identical to the CPU
reference); anything else declares at most `batch-invariant`, `deterministic` or `fast`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv4.backends.canonical.primitives import lane_sum, rsqrt


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Canonical order: s = lanesum(x*x); inv = 1/sqrt(s/n + eps); y = x*inv; y = weight*y; one cast. Exact."""
    xf = x.float()
    s = lane_sum(xf * xf)                       # the contract's 16-lane order, not torch.sum's
    n = torch.tensor(float(x.shape[-1]), dtype=torch.float32, device=x.device)
    inv = rsqrt(s / n + eps)                    # divide by a tensor: a scalar divisor may become a reciprocal multiply
    y = xf * inv[..., None]
    if weight is not None:
        y = weight.float() * y
    return y.to(x.dtype)


def swiglu(g: torch.Tensor, u: torch.Tensor, limit: float, route_weight: torch.Tensor | None) -> torch.Tensor:
    """Clamped SwiGLU with torch's silu: within the contract's tolerance, but not the canonical silu's bits. Fast."""
    gf, uf = g.float(), u.float()
    if limit > 0:
        gf, uf = gf.clamp_max(limit), uf.clamp(-limit, limit)
    h = F.silu(gf) * uf
    if route_weight is not None:
        h = h * route_weight.float()[:, None]
    return h.to(torch.bfloat16)
