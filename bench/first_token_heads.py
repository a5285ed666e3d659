"""Experiment: draft heads that also see the first token x_1, against the shipped CP heads.

What holds teacher-forced acceptance back on the shipped checkpoints (``bench/speculative.py``)?
CP heads see x_1 only through the posterior gate: rank 1 not at all, rank r through an r-way
choice of expert. This script trains, on each corpus's frozen backbone, rank-1 heads whose
positions 2..n also read x_1's token embedding (the backbone's own, tied), Hydra / EAGLE style:

    q_j(. | h, x_1) = softmax(U (h + silu(W_j [h; E x_1] + b_j))),   j = 2..n

initialised from the shipped rank-1 heads (W_j's h-half = their transforms, E-half = 0), trained
with ``cptoy.train.train`` on the cross-entropy of the true x_{t+j} given the true x_{t+1} for
``--minutes`` per corpus, and
measured with the same protocol as everything else (``cptoy.evaluate.teacher_forced_acceptance``
and ``verify_cost``). Every drafter drafts over the whole vocabulary here, so only the heads
differ. Decoding with such heads is still lossless (q is the factor the drafts came from).

    .venv/bin/python bench/first_token_heads.py [--minutes 6] [--quick] [--no-write]

Writes the section "## Heads that see the first token (experiment)" of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from _results import write_section  # bench/ is on sys.path when run as a script

from cptoy import checkpoints
from cptoy.cp import CPDist
from cptoy.data import encode_corpus, load_corpus
from cptoy.evaluate import format_table, heldout_ids, teacher_forced_acceptance, verify_cost
from cptoy.train import TrainConfig, train

SECTION = "## Heads that see the first token (experiment)"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


class FirstTokenHeads(nn.Module):
    """Rank-1 heads for positions 2..n that read [h, E x_1]; ``draft`` as ``CPHeads.draft``."""

    def __init__(self, cp_heads, embedding: torch.Tensor):
        super().__init__()
        n, d = cp_heads.n_future, cp_heads.d_model
        self.n_future, self.rank, self.vocab_size, self.d_model = n, 1, cp_heads.vocab_size, d
        self.__dict__["E"] = embedding  # (V, d) the backbone's tied embedding, not registered
        W = cp_heads.transform_weight.detach().view(n, d, d)[1:]  # (n-1, d, d)
        self.W = nn.Parameter(torch.cat([W, torch.zeros_like(W)], dim=-1))  # (n-1, d, 2d)
        self.b = nn.Parameter(cp_heads.transform_bias.detach().view(n, d)[1:].clone())

    def logits(self, h: torch.Tensor, x1: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """h (N, d), x1 (N,) -> logits (N, k, V) of positions 2..k+1 (default k = n - 1)."""
        k = self.n_future - 1 if k is None else k
        inp = torch.cat([h, self.E[x1]], dim=-1)  # (N, 2d)
        pre = torch.einsum("jdi,ni->njd", self.W[:k], inp) + self.b[:k]  # (N, k, d)
        return (h[:, None] + F.silu(pre)) @ self.E.t()  # (N, k, V)

    def draft(self, hidden, first_tokens, temperature, n_draft=None) -> CPDist:
        z = self.logits(hidden, first_tokens, n_draft).float()  # (B, k, V)
        if temperature > 0 and temperature != 1.0:
            z = z / temperature
        lf = torch.log_softmax(z, dim=-1).unsqueeze(2)  # (B, k, 1, V)
        return CPDist(lf.new_zeros(lf.shape[0], 1), lf)


class FirstTokenModel(nn.Module):
    """A backbone plus :class:`FirstTokenHeads`: what ``cptoy.evaluate`` needs of a model."""

    def __init__(self, backbone, heads: FirstTokenHeads):
        super().__init__()
        self.backbone, self.heads, self.n_future = backbone, heads, heads.n_future

    @property
    def config(self):
        return self.backbone.config

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout
        return self


def first_token_loss(model: FirstTokenModel, batch: torch.Tensor, positions: int = 32) -> dict:
    """``loss_fn`` for ``cptoy.train.train``: cross-entropy of x_{t+2..t+n} given h_t and the
    true x_{t+1}, at ``positions`` random contexts t per sequence of ``batch`` (B, T + n)."""
    n = model.n_future
    T = batch.shape[1] - n
    with torch.no_grad():
        H = model.backbone(batch[:, :T])  # (B, T, d) frozen backbone
    pos = torch.randint(0, T, (batch.shape[0], positions), device=batch.device)  # (B, P)
    h = H.gather(1, pos[..., None].expand(-1, -1, H.shape[-1])).reshape(-1, H.shape[-1])
    y = torch.stack([batch.gather(1, pos + j) for j in range(1, n + 1)], -1).reshape(-1, n)
    lg = model.heads.logits(h, y[:, 0])  # (N, n - 1, V)
    loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), y[:, 1:].reshape(-1))
    return dict(total=loss, first_token_heads_nll=loss)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=6.0, help="training minutes per corpus")
    ap.add_argument("--quick", action="store_true", help="smoke run; does not write RESULTS.md")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    minutes = 0.1 if args.quick else args.minutes
    positions = 128 if args.quick else 1024
    torch.set_num_threads(1)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    rows, costs, notes = [], [], []
    for corpus in ("code", "shakespeare"):
        m1, tok, _ = checkpoints.load(f"{corpus}_r1")
        m8, _, _ = checkpoints.load(f"{corpus}_r8")
        for m in (m1, m8):
            m.heads.set_draft_vocab(None)  # whole vocabulary for every drafter: heads alone differ
        for p in m1.backbone.parameters():
            p.requires_grad_(False)
        bb = copy.deepcopy(m1.backbone)
        ft = FirstTokenModel(bb, FirstTokenHeads(m1.heads, bb.wte.weight))
        train_ids = torch.as_tensor(encode_corpus(load_corpus(corpus), tok).train_ids).long()
        print(f"[{time.perf_counter() - t_start:4.0f}s] {corpus}: training first-token heads",
              file=sys.stderr)
        hist = train(ft, train_ids, None, TrainConfig(
            steps=None, minutes=minutes, batch_size=16, block_size=128, lr=2e-3, min_lr=2e-4,
            weight_decay=0.0, warmup=50, seed=0, device="cpu"), progress=False,
            loss_fn=first_token_loss)
        ft.eval()
        final = hist["train"][-1]["first_token_heads_nll"] if hist["train"] else float("nan")
        notes.append(f"{corpus}: {hist['steps']} steps in {hist['seconds']:.0f} s, final "
                     f"training cross-entropy {final:.3f} nats/token (positions 2..4)")
        ids = heldout_ids(corpus, tok)
        drafters = [("CP rank 1 (shipped)", m1), ("CP rank 8 (shipped)", m8),
                    ("rank 1 + x_1 embedding (this script)", ft)]
        for name, m in drafters:
            row = {"corpus": corpus, "drafter": name}
            for T in (0.0, 0.8, 1.0):
                res = teacher_forced_acceptance(m, ids, temperature=T, max_positions=positions)
                row[f"T={T:g}"] = res.spec_tokens_per_forward
                if T == 0.8:
                    row["acceptance by position (T=0.8)"] = res.spec_acceptance
            rows.append(row)
            c = verify_cost(m, (1, 4), repeats=5 if args.quick else 30, temperature=0.8)
            costs.append({"corpus": corpus, "drafter": name,
                          "drafting 3 tokens / t(1), T=0.8": c[1].draft_ratio})
    total = time.perf_counter() - t_start
    by = {(r["corpus"], r["drafter"]): r for r in rows}
    findings = []
    for corpus in ("code", "shakespeare"):
        a = by[(corpus, "CP rank 1 (shipped)")]
        b = by[(corpus, "CP rank 8 (shipped)")]
        c = by[(corpus, "rank 1 + x_1 embedding (this script)")]
        findings.append(
            f"- {corpus}: teacher-forced tokens/forward at n = 4 (T = 0 / 0.8 / 1): CP rank 1 "
            + " / ".join(f"{a[k]:.2f}" for k in ("T=0", "T=0.8", "T=1")) + ", CP rank 8 "
            + " / ".join(f"{b[k]:.2f}" for k in ("T=0", "T=0.8", "T=1"))
            + ", rank 1 + x_1 embedding "
            + " / ".join(f"{c[k]:.2f}" for k in ("T=0", "T=0.8", "T=1"))
            + f" (ratio to CP rank 1 at T = 0.8: {c['T=0.8'] / a['T=0.8']:.2f}; still "
            f"{3.0 - max(c['T=0'], c['T=0.8'], c['T=1']):.2f} short of 3.0)")
    text = "\n".join([
        SECTION,
        "",
        "Generated by `bench/first_token_heads.py`; do not edit by hand.",
        f"Machine: {platform.machine()}, 2 cores (shared), torch threads 1, torch "
        f"{torch.__version__}, Python {platform.python_version()}. Whole run {total:.0f} s"
        + (" (QUICK smoke run)." if args.quick else "."),
        "",
        "CP heads see x_1, the backbone's token that the drafts continue, only through the "
        "posterior gate (rank 1: not at all). Rank-1 heads whose positions 2..4 also read x_1's embedding "
        "([h; E x_1] into each position's transform, initialised from the shipped rank-1 heads), "
        f"trained {minutes:g} min per corpus on the same frozen backbone with cross-entropy, "
        "measured with `cptoy.evaluate` (teacher forcing on "
        f"{positions} held-out positions, whole vocabulary for every drafter). Not shipped, "
        "not a cptoy head type: a measurement of what holds CP-head acceptance back.",
        "",
        *findings,
        "- Training: " + "; ".join(notes) + ".",
        "",
        format_table(rows, columns=["corpus", "drafter", "T=0", "T=0.8", "T=1",
                                    "acceptance by position (T=0.8)"]),
        "",
        "Drafting cost (`verify_cost`, what the decoder spends drafting a step; the CP heads use "
        "the lean `CPHeads.draft_step`, the experimental heads the generic `draft` path, so "
        "their figure is an upper bound):",
        "",
        format_table(costs),
        "",
    ])
    print(text)
    if not args.quick and not args.no_write:
        write_section(RESULTS, SECTION, text)
        print(f"wrote {RESULTS}", file=sys.stderr)
    return text


if __name__ == "__main__":
    main()
