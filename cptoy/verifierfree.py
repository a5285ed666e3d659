"""Verifier-free multi-token decoding: one loop, a pluggable rule for how many tokens to keep.

Every verifier-free decoder in cptoy runs the same loop: one forward of the backbone over the
tokens the previous step emitted (the prompt at first; KV cache), then a *rule* turns that
forward into the next tokens, ``x_1`` followed by drafts that nothing checks. The output is
*lossy*: it need not have the backbone's law. The rules:

* heads-only (:func:`heads_only_generate`): keep x_1 and every draft;
* CLP / gate network / all / none (``cptoy.clp.verifier_free_generate``): a controller
  decides how many of the drafts to keep;
* ConfAdapt (``cptoy.selfdistill.confadapt_generate``): keep the longest prefix whose top-1
  probabilities exceed a threshold.

A rule has two methods: ``forward(chunk, cache, room) -> state`` (the backbone's forward over
the new tokens, timed as ``prefill_time`` / ``verify_time``) and ``choose(state, room) ->
(tokens, offered)`` (at most ``room`` tokens, x_1 first, and how many drafts it decided on;
timed as ``draft_time``); ``room`` is how many tokens the output may still take. Stats are :class:`cptoy.decoding.GenerationStats` with arrival "first" for
x_1 and "draft" for every unchecked token; steps where ``offered > 0`` count drafts offered
(``drafted_per_step``) and kept (``accepted_per_step``), by position.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch

from cptoy._checks import check_positive_int, check_prompt_ids, check_temperature
from cptoy.decoding import Generation, GenerationStats, check_n_draft
from cptoy.speculative import propose_from_cp, sample_rows

__all__ = ["KeepRule", "decode_unverified", "heads_only_generate"]


class KeepRule(Protocol):
    def forward(self, chunk: list[int], cache, room: int) -> object: ...

    def choose(self, state, room: int) -> tuple[list[int], int]: ...


def decode_unverified(module, backbone, prompt: list[int], max_new_tokens: int, rule: KeepRule,
                      strategy: str, temperature: float = 0.0, n_draft: int = 0,
                      eos_id: int | None = None) -> Generation:
    """Decode up to ``max_new_tokens`` after ``prompt`` (validated by the caller) with ``rule``.

    ``module`` is put in eval mode for the call (its mode is restored); ``backbone`` gives the
    cache (``new_cache(1)``); ``n_draft`` sizes the by-position counters; the output stops
    right after ``eos_id``. Returns a :class:`cptoy.decoding.Generation` (tokens and stats)."""
    stats = GenerationStats(strategy=strategy, temperature=temperature,
                            attempted_by_position=[0] * n_draft,
                            accepted_by_position=[0] * n_draft)
    was = module.training
    module.eval()
    t_start = time.perf_counter()
    try:
        cache = backbone.new_cache(1)
        chunk, tokens = list(prompt), []
        while len(tokens) < max_new_tokens and (eos_id is None or not tokens
                                                or tokens[-1] != eos_id):
            t0 = time.perf_counter()
            room = max_new_tokens - len(tokens)
            state = rule.forward(chunk, cache, room)
            t1 = time.perf_counter()
            emitted, offered = rule.choose(state, room)
            if eos_id is not None and eos_id in emitted:
                emitted = emitted[: emitted.index(eos_id) + 1]
            t2 = time.perf_counter()
            if tokens:
                stats.verify_time += t1 - t0
            else:
                stats.prefill_time += t1 - t0
            stats.draft_time += t2 - t1
            tokens.extend(emitted)
            stats.arrival.extend(["first"] + ["draft"] * (len(emitted) - 1))
            stats.forward_passes += 1
            stats.gained_per_forward.append(len(emitted))
            if offered:
                stats.drafted_per_step.append(offered)
                stats.accepted_per_step.append(len(emitted) - 1)
                for j in range(offered):
                    stats.attempted_by_position[j] += 1
                    stats.accepted_by_position[j] += int(j < len(emitted) - 1)
            chunk = emitted
    finally:
        module.train(was)
    stats.wall_time = time.perf_counter() - t_start
    return Generation(tokens=tokens, stats=stats)


# ====================================================================== heads-only
class _HeadsOnly:
    """The heads-only rule of :func:`cptoy.verifierfree.decode_unverified`: x_1 from the
    backbone (sampled at T, argmax at 0), then every draft of the heads after it, kept."""

    def __init__(self, model, k: int, T: float, gen: torch.Generator):
        self.model, self.bb, self.k, self.T, self.gen = model, model.backbone, k, T, gen

    def forward(self, chunk: list[int], cache, room: int):
        h = self.bb(torch.tensor([chunk], dtype=torch.long), cache)[:, -1]  # (1, d)
        return h, self.bb.logits(h)[0].double()  # (V,)

    def choose(self, state, room: int) -> tuple[list[int], int]:
        h, lg = state
        T, gen = self.T, self.gen
        x1 = int(lg.argmax()) if T == 0 else int(sample_rows(torch.softmax(lg / T, -1), gen))
        if room < 2:
            return [x1], 0
        kk = min(self.k, room - 1)
        dist = self.model.heads.draft(h, torch.tensor([x1]), T if T > 0 else 1.0, n_draft=kk)
        drafts = propose_from_cp(dist[0].detach().to("cpu", torch.float64), kk, T, gen).tokens
        return [x1] + drafts, 0


@torch.no_grad()
def heads_only_generate(model, prompt_ids, max_new_tokens: int, temperature: float = 1.0,
                        seed: int | None = 0, n_draft: int | None = None):
    """Verifier-free multi-token decoding (lossy): keep every draft without checking it.

    Each forward over ``[x_1, d_2..d_{k+1}]`` (KV cache) yields, at its last position, the
    backbone's next token x_1' (sampled at ``temperature``, argmax at 0) and the heads' drafts
    after it (sampled from the tempered CP conditioned on x_1', its mode at 0). All k + 1 tokens
    are kept, so tokens per forward is k + 1 by construction, but the output no longer has the
    backbone's distribution. Returns a ``cptoy.decoding.Generation`` (arrivals "first" for the
    backbone's tokens, "draft" for the unchecked ones).
    """
    k = check_n_draft(model, n_draft)
    T = check_temperature(temperature)
    check_positive_int(max_new_tokens, "max_new_tokens")
    bb = model.backbone
    prompt = check_prompt_ids(prompt_ids, bb.config.vocab_size)
    if len(prompt) + max_new_tokens > bb.config.block_size:
        raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"block_size {bb.config.block_size}")
    gen = torch.Generator()
    gen.manual_seed(seed) if seed is not None else gen.seed()
    return decode_unverified(model, bb, prompt, max_new_tokens, _HeadsOnly(model, k, T, gen),
                             "heads-only", T)
