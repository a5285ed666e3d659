"""The speed-tuned drafting path of CP heads: weights laid out per expert, few tensor operations.

One self-speculative step needs the posterior gate after x_1 (position 1 of every expert) and
the factors of positions 2..k+1: r (k + 1) transforms and unembeddings over V. Two lossless
cuts make it cheaper: a drafting shortlist (``set_draft_vocab``: every drafted factor is a
softmax over K frequent tokens) and one-expert routing (one expert drawn from the posterior
drafts every position and is the q of the test). At toy size a decode step is bound by
per-operation overhead and by reading weights the backbone's forward pushed out of the cache,
so :class:`CPDraftTables` keeps the weights laid out for it (:meth:`~CPDraftTables._step_tables`,
cached until a parameter or the shortlist changes) and computes a step in few operations.
``CPHeads.draft_step`` (here) equals ``CPHeads.draft`` (tested). Measured in
``bench/speculative.py``.

A mixin of :class:`cptoy.heads.CPHeads`: it reads the heads' parameters and ``_features``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cptoy.cp import CPDist
from cptoy.heads.drafting import DraftStep
from cptoy.speculative import sample_index

__all__ = ["CPDraftTables"]


class CPDraftTables:
    """Drafting of :class:`cptoy.heads.CPHeads` on weight tables laid out per expert."""

    def _step_tables(self) -> dict:
        """Weights laid out for :meth:`draft_step`, cached until a parameter changes.

        ``UT`` (d, K) = the shortlist's (or all) unembedding rows, transposed and contiguous;
        full heads: ``W``/``b`` = the transforms grouped by expert, (r, n*d, d) / (r, n*d), so
        that one expert's positions 2..k+1 are one contiguous slice; structured heads: ``BT``
        (e, K) and the expert codes grouped the same way, ``A``/``c`` (r, n*e, d) / (r, n*e).
        """
        params = [self.unembedding, self.transform_weight, self.transform_bias]
        if self.gate is not None:
            params += [self.gate.weight, self.gate.bias]
        if self.expert_dim is not None:
            params += [self.expert_in_weight, self.expert_in_bias, self.expert_out]
        S = self._draft_vocab
        key = tuple((t.data_ptr(), t._version) for t in params) + (
            None if S is None else (S.data_ptr(), S._version),)
        cached = getattr(self, "_tables", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        n, r, d = self.n_future, self.rank, self.d_model
        with torch.no_grad():
            U = self.unembedding.detach()
            t = dict(UT=(U if S is None else U.index_select(0, S)).t().contiguous())
            Wt, bt = self.transform_weight.detach(), self.transform_bias.detach()
            if self.expert_dim is None:
                t["W"] = Wt.view(n, r, d, d).transpose(0, 1).reshape(r, n * d, d).contiguous()
                t["b"] = bt.view(n, r, d).transpose(0, 1).reshape(r, n * d).contiguous()
            else:
                e = self.expert_dim
                B = self.expert_out.detach()
                t["BT"] = (B if S is None else B.index_select(0, S)).t().contiguous()
                A, c = self.expert_in_weight.detach(), self.expert_in_bias.detach()
                t["A"] = A.view(n, r, e, d).transpose(0, 1).reshape(r, n * e, d).contiguous()
                t["c"] = c.view(n, r, e).transpose(0, 1).reshape(r, n * e).contiguous()
        self._tables = (key, t)
        return t

    def _draft_logits(self, X: torch.Tensor, C: torch.Tensor | None) -> torch.Tensor:
        """Like :meth:`_logits` (without gradients), over the shortlist when one is set:
        (..., K or V)."""
        tb = self._step_tables()  # U's (shortlist) rows, transposed, cached: one copy for all
        z = X @ tb["UT"].to(X.dtype)
        if C is not None:
            z = z + C @ tb["BT"].to(C.dtype)
        return z.float()

    def _posterior(self, h: torch.Tensor, first, t: float) -> torch.Tensor:
        """log posterior gate (B, r) after x_1 = ``first`` for h (B, d), tempered by t.

        ``first``: (B,) int64, or an int for every row (one decode step: fewer operations).

        ``log w_a(h) + z_{1,a}(x_1) / t - logsumexp(z_{1,a} / t)``, normalised over experts: the
        position-1 transform of every expert, the normaliser over the shortlist when one is set,
        and x_1's own logit as one dot product per expert (x_1 may lie outside the shortlist).
        """
        B, d = h.shape
        if self.rank == 1:
            return h.new_zeros(B, 1).float()
        tb = self._step_tables()
        w = tb.get("pos1")
        if w is None:  # position 1's weights and the gate, as views (cached: indexing is slow)
            r, e = self.rank, self.expert_dim
            m = r if e is None else 1
            w = (self.transform_weight.detach()[: m * d], self.transform_bias.detach()[: m * d],
                 self.gate.weight.detach(), self.gate.bias.detach())
            if e is not None:
                w += (self.expert_in_weight.detach()[: r * e],
                      self.expert_in_bias.detach()[: r * e], self.expert_out.detach())
            tb["pos1"] = w
        def at_first(X, table):  # X (B, m, c) times row x_1 of table (V, c): (B, m)
            if isinstance(first, int):
                return X @ table[first]
            return (X @ table[first][:, :, None]).squeeze(-1)

        X1 = h[:, None] + F.silu(F.linear(h, w[0], w[1])).view(B, -1, d)  # (B, r or 1, d)
        z1 = X1 @ tb["UT"]  # (B, r or 1, K)
        zx = at_first(X1, self.unembedding.detach())  # (B, r or 1)
        if self.expert_dim is not None:
            C1 = F.silu(F.linear(h, w[4], w[5])).view(B, self.rank, -1)  # (B, r, e)
            z1 = z1 + C1 @ tb["BT"]  # (B, r, K)
            zx = zx + at_first(C1, w[6])  # (B, r)
        if t != 1.0:
            z1, zx = z1 / t, zx / t
        lq1 = zx - torch.logsumexp(z1, dim=-1)  # (B, r)
        return torch.log_softmax(F.linear(h, w[2], w[3]) + lq1, dim=-1)

    def _expert_logits(self, h: torch.Tensor, experts, start: int, stop: int) -> torch.Tensor:
        """Logits (B, k, K) of ONE expert per row at positions start..stop-1, for h (B, d).

        ``experts``: an int (every row, e.g. one decode step: cached weight views, one matmul
        per weight) or a (B,) int64 tensor (a weight slice gathered per row). Over the
        shortlist when one is set; rank 1 drafts through here with expert 0.
        """
        tb = self._step_tables()
        d, e, k = self.d_model, self.expert_dim, stop - start
        B = h.shape[0]
        if isinstance(experts, int):
            w = tb.get((experts, start, stop))
            if w is None:  # the weight slices this step reads, as views (cached)
                if e is None:
                    w = (tb["W"][experts, start * d : stop * d],
                         tb["b"][experts, start * d : stop * d])
                else:
                    w = (self.transform_weight.detach()[start * d : stop * d],
                         self.transform_bias.detach()[start * d : stop * d],
                         tb["A"][experts, start * e : stop * e],
                         tb["c"][experts, start * e : stop * e])
                tb[(experts, start, stop)] = w
            X = F.silu(F.linear(h, w[0], w[1])).view(B, k, d) + h.unsqueeze(1)  # (B, k, d)
            C = None if e is None else F.silu(F.linear(h, w[2], w[3])).view(B, k, e)
        elif e is None:
            W, b = tb["W"][experts, start * d : stop * d], tb["b"][experts, start * d : stop * d]
            pre = (W @ h[:, :, None]).squeeze(-1) + b  # (B, k d)
            X, C = h[:, None] + F.silu(pre).view(B, k, d), None
        else:
            W = self.transform_weight.detach()[start * d : stop * d]
            X = h[:, None] + F.silu(F.linear(h, W, self.transform_bias.detach()[
                start * d : stop * d])).view(B, k, d)
            A, c = tb["A"][experts, start * e : stop * e], tb["c"][experts, start * e : stop * e]
            C = F.silu((A @ h[:, :, None]).squeeze(-1) + c).view(B, k, e)
        z = X @ tb["UT"]  # (B, k, K)
        return z if C is None else z + C @ tb["BT"]

    def draft_step(self, hidden: torch.Tensor, x1: int, k: int, temperature: float,
                   generator: torch.Generator | None = None,
                   routing: str = "mixture") -> DraftStep:
        """Everything one self-speculative decode step needs from the heads, for ONE sequence.

        hidden (1, d) at the last accepted position, x1 the backbone's token, k drafts,
        ``temperature`` (0: greedy drafts), ``generator`` for the draws, ``routing`` "mixture"
        or "expert" (see ``cptoy.decoding``). The same distribution as :meth:`draft` (the tests
        check it), computed with few tensor operations on weights laid out for it
        (:meth:`_step_tables`): at toy size a decode step is bound by per-operation overhead and
        by reading weights the backbone's forward pushed out of the cache, not by multiply-adds.

        Sampling (T > 0) is ancestral: an expert from the posterior gate, then each drafted
        position from that expert's tempered factor. Greedy (T = 0): the mixture's sequential
        mode (``CPDist.mode``), or with one-expert routing the argmax expert's argmaxes.
        Returns a :class:`DraftStep` in the drafting space (the shortlist, when one is set).
        """
        if torch.is_grad_enabled():  # (not a decorator: this runs every decode step)
            with torch.no_grad():
                return self.draft_step(hidden, x1, k, temperature, generator, routing)
        t = temperature if temperature > 0 else 1.0
        log_post, expert = None, None
        if self.rank > 1:
            log_post = self._posterior(hidden, x1, t)[0].double()  # (r,)
            if routing == "expert" or temperature > 0:
                expert = (int(log_post.argmax()) if temperature == 0 else
                          sample_index(torch.softmax(log_post, -1)[None], generator)[1][0])
        if self.rank == 1 or routing == "expert":
            z = self._expert_logits(hidden, expert or 0, 1, k + 1)[0]  # (k, K)
            return self._factor_step(z, temperature, generator, expert, log_post)
        # mixture routing, rank > 1: every expert's factors at positions 2..k+1
        z = self._draft_logits(*self._features(hidden, k + 1, start=1))[0].double()  # (k,r,K)
        lf = torch.log_softmax(z / t if t != 1.0 else z, dim=-1)
        if temperature == 0:
            drafts = CPDist(log_post, lf).mode().tolist()
            expert = int(log_post.argmax())
        else:
            drafts = sample_index(lf[:, expert].exp(), generator)[1]
        return DraftStep(drafts, expert, self._draft_vocab, log_post,
                         mixture=CPDist(log_post, lf), vocab_list=self._draft_vocab_list)
