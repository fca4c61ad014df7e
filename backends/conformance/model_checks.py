"""Whole-model checks on a small preset (random weights from the portable generator): prefill logits against the CPU
reference, repeat runs, a prompt alone against the same prompt prefilled in a batch, decoded among other requests
of other lengths and prefilled in chunks, and golden digests of logits and greedy tokens."""
from __future__ import annotations

import torch

from dsv4.backends.conformance.inputs import MODEL_PROMPTS
from dsv4.backends.conformance.report import Check, digest, golden_check, same_bits
from dsv4.backends.levels import Level
from dsv4.backends.registry import Registry

# Fast level, whole model: rms(logits - ref) <= this * rms(ref). Random weights amplify rounding: 0.3% noise on every
# quantised GEMM output moves the tiny preset's logits by 12-16% RMS (measured), while a wrong kernel (layout, scale,
# index) moves them by ~100% or more. So this catches broken kernels, not small numeric drift; the op checks bound that.
MODEL_LOGITS_TOLERANCE = 0.5
GOLDEN_KINDS = ("prefill", "generation")        # what a preset's golden digests cover


def golden_key(preset: str, kind: str) -> str:
    """The entry of the golden digests that holds the reference's `kind` (one of GOLDEN_KINDS) for `preset`."""
    return f"model/{preset}/{kind}"


def check_model(preset: str, backend: str, device: torch.device, level: Level, golden: dict[str, str],
                registry: Registry) -> list[Check]:
    from dsv4.api import load, preset_checkpoint
    from dsv4.engine import Request

    path = preset_checkpoint(preset)
    name = f"model/{preset}"
    pipe = load(path, device=str(device), determinism=level, backend=backend, registry=registry)
    ref = load(path, device="cpu", determinism=Level.EXACT, backend="cpu", registry=registry)
    prompts = [list(p) for p in MODEL_PROMPTS]
    checks = []

    def prefill(p, prompt, chunk=None):
        return p.engine(prefill_chunk=chunk).prefill(prompt, 0, all_logits=True)[0].cpu()

    out = [prefill(pipe, p) for p in prompts]
    want = [prefill(ref, p) for p in prompts]
    if level >= Level.EXACT:
        ok = same_bits(out, want)
        checks.append(Check(f"{name}/prefill-reference", "pass" if ok else "fail",
                            "logits bit-identical to the CPU reference" if ok else "logits differ from the CPU reference",
                            digest(out)))
    else:
        rms = lambda t: t.double().pow(2).mean().sqrt().item()
        err = max(rms(o - w) / rms(w) for o, w in zip(out, want))
        ok = err <= MODEL_LOGITS_TOLERANCE and all(torch.isfinite(o).all() for o in out)
        checks.append(Check(f"{name}/prefill-reference", "pass" if ok else "fail",
                            f"rms logit error {err:.3g} of rms logit (tolerance {MODEL_LOGITS_TOLERANCE})", digest(out)))

    requests = [Request(p, max_new_tokens=6, request_id=i) for i, p in enumerate(prompts)]
    alone = [pipe.engine(max_batch=1).generate([r], record_logits=True)[0] for r in requests]
    gen_digest = digest([torch.tensor(r.tokens) for r in alone], [torch.stack(r.logits) for r in alone])
    if level >= Level.DETERMINISTIC:
        again = [prefill(pipe, p) for p in prompts]
        ok = same_bits(out, again)
        checks.append(Check(f"{name}/repeat", "pass" if ok else "fail",
                            "same logits on a second run" if ok else "a second run gave other logits"))
    if level >= Level.BATCH_INVARIANT:
        checks += _batch_invariance(pipe, prompts, requests, alone, out, name)
    if level >= Level.EXACT:
        ref_tokens = [ref.engine(max_batch=1).generate([r])[0].tokens for r in requests]
        ok = [r.tokens for r in alone] == ref_tokens
        checks.append(Check(f"{name}/generation-reference", "pass" if ok else "fail",
                            "greedy tokens equal to the CPU reference" if ok else "greedy tokens differ", gen_digest))
        for kind, got in zip(GOLDEN_KINDS, (digest(out), gen_digest)):
            checks.append(golden_check(f"{name}/{kind}-golden", golden_key(preset, kind), golden, got))
    return checks


def _batch_invariance(pipe, prompts, requests, alone, prefills, name) -> list[Check]:
    checks = []
    # 1. the same prompt prefilled inside a batch of equal-length prompts
    target = prompts[0]
    others = [[(t * 7 + i) % 256 for t in target] for i in range(3)]
    engine = pipe.engine(max_batch=4)
    for slot in range(4):
        engine.cache.reset(slot)
    batch = torch.tensor([others[0], target, others[1], others[2]])
    logits = engine.forward(batch, [0] * 4, [0, 1, 2, 3], all_logits=True)[1].cpu()
    ok = same_bits(logits, prefills[0])
    checks.append(Check(f"{name}/batch-invariance-prefill", "pass" if ok else "fail",
                        "prefill logits identical alone and in a batch of 4" if ok else "prefill logits differ in a batch"))
    # 2. decoding among other requests of other lengths, batches of 2 and all 3, at every generated position
    bad = []
    for size in (2, len(requests)):
        together = pipe.engine(max_batch=size).generate(requests, record_logits=True)
        for r, a in zip(together, alone):
            if r.tokens != a.tokens or not same_bits(r.logits, a.logits):
                bad.append(f"request {r.request.request_id} in batches of {size}")
    checks.append(Check(f"{name}/batch-invariance-decode", "fail" if bad else "pass",
                        "; ".join(bad) or "every decode step identical alone and in batches of 2 and 3"))
    # 3. chunked prefill
    bad = [str(chunk) for chunk in (1, 5, 16)
           if not same_bits(pipe.engine(prefill_chunk=chunk).prefill(prompts[0], 0, all_logits=True)[0].cpu(),
                            prefills[0])]
    checks.append(Check(f"{name}/batch-invariance-chunked-prefill", "fail" if bad else "pass",
                        f"logits differ with chunks of {', '.join(bad)}" if bad else
                        "logits identical at every position with chunks of 1, 5 and 16"))
    return checks
