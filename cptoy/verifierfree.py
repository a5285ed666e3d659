"""Verifier-free multi-token decoding: one loop, a pluggable rule for how many tokens to keep.

Every verifier-free decoder in cptoy runs the same loop: one forward of the backbone over the
tokens the previous step emitted (the prompt at first; KV cache), then a *rule* turns that
forward into the next tokens, ``x_1`` followed by drafts that nothing checks. The output is
*lossy*: it need not have the backbone's law. The rules:

* heads-only (``cptoy.evaluate.heads_only_generate``): keep x_1 and every draft;
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

from cptoy.decoding import Generation, GenerationStats

__all__ = ["KeepRule", "decode_unverified"]


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
