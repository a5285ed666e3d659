"""What could drafting heads reach on SmolLM2 if they represented its true joint at rank r?

For held-out code contexts, the exact joint P of SmolLM2's next 3 tokens over an alphabet of 8
tokens + OTHER (``cptoy.joint.lm_joint``, temperature 1), CP fits Q of rank 1, 2, 4, 8 (EM,
KL(P||Q)) and the product of P's marginals (what independent heads converge to). For each Q:
KL(P||Q) and the exact expected tokens per forward of self-speculative decoding (x_1 from the
backbone, 2 drafts from Q given x_1; at most 3), from ``cptoy.theory``.

    .venv/bin/python bench/smollm2_exact_joint.py [--num 20] [--top-k 8] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _results import write_section  # noqa: E402

from cptoy import pretrained  # noqa: E402
from cptoy.cp import fit_cp  # noqa: E402
from cptoy.evaluate import heldout_prompts  # noqa: E402
from cptoy.joint import OTHER, kl, lm_joint, product_of_marginals  # noqa: E402
from cptoy.theory import expected_tokens_per_forward, greedy_tokens_per_forward  # noqa: E402

HEADING = "## Exact joint of SmolLM2's next tokens (bench/smollm2_exact_joint.py)"
RANKS = (1, 2, 4, 8)


def conditionals(P: torch.Tensor) -> list[torch.Tensor]:
    """[P(x_1) (V,), P(x_2 | x_1) (V, V), ...]; 0 where the prefix has probability 0."""
    m = [P]
    for _ in range(P.dim() - 1):
        m.append(m[-1].sum(-1))
    m = m[::-1]
    out = [m[0]]
    for j in range(1, len(m)):
        den = m[j - 1].unsqueeze(-1)
        out.append(torch.where(den > 0, m[j] / den.clamp_min(1e-300), torch.zeros_like(m[j])))
    return out


def strict_expected_tokens(P: torch.Tensor, Q: torch.Tensor, other: int) -> float:
    """Like ``expected_tokens_per_forward`` but a draft of the OTHER bucket is never accepted
    (it names no token): 1 + sum_k Pr(drafts 2..k+1 all accepted), accepting at position j
    with probability sum over alphabet tokens a of min(P(a | x_<j), Q(a | x_<j))."""
    Pc, Qc = conditionals(P), conditionals(Q)
    A, E = Pc[0], 1.0
    for j in range(1, P.dim()):
        M = torch.minimum(Pc[j], Qc[j])
        M[..., other] = 0.0
        A = A.unsqueeze(-1) * M
        E += float(A.sum())
    return E


def model_greedy_tokens(Q: torch.Tensor, path: list[int], other: int) -> int:
    """Greedy (T = 0) tokens per forward against the *model's* greedy continuation, given as
    axis indices ``path`` (OTHER where the greedy token is outside the alphabet: P's
    conditionals there are exact, OTHER's stand-in is the most probable outside token). Drafts
    are Q's sequential argmax over the alphabet tokens (OTHER names no token to draft) given
    the accepted tokens, accepted iff equal to the model's greedy token."""
    Qc = conditionals(Q)
    k = 1
    for j in range(1, Q.dim()):
        row = Qc[j][tuple(path[:j])].clone()
        row[other] = -1.0
        d = int(row.argmax())
        if d != path[j]:
            break
        k += 1
    return k


def trained_heads_reference() -> list[str]:
    """The first two drafts' part of the trained heads' tokens/forward, 1 + a2 + a2 a3 with the
    conditional acceptances of the head-objective section of RESULTS.md (if present)."""
    path = ROOT / "bench" / "RESULTS.md"
    text = path.read_text() if path.exists() else ""
    sec = text.split("## Head objective on the frozen SmolLM2", 1)
    if len(sec) < 2:
        return []
    sec = sec[1].split("\n## ", 1)[0]
    out = []
    for line in sec.splitlines():
        m = re.match(r"\|\s*(\w+)\s*\|\s*(\w+)\s*\|.*\|\s*([\d.]+) / ([\d.]+) / ([\d.]+)\s*\|$",
                     line)
        if m:
            a2, a3 = float(m.group(3)), float(m.group(4))
            out.append(f"{m.group(1)}/{m.group(2)} {1 + a2 + a2 * a3:.3f}")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num", type=int, default=20, help="held-out code contexts")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--restarts", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-write", action="store_true", help="print, do not touch RESULTS.md")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    model, tok = pretrained.load("smollm2-135m")
    prompts = heldout_prompts("code", tok, num=a.num, prompt_tokens=a.prompt_tokens, seed=0)

    names = ["product of marginals"] + [f"EM rank {r}" for r in RANKS] + ["exact joint (Q = P)"]
    acc = {k: {"kl": [], "E": [], "E_strict": [], "greedy": [], "greedy_model": []}
           for k in names}
    cover1, cover, greedy_in_A, t_joint, t_fit = [], [], 0, 0.0, 0.0
    for i, ids in enumerate(prompts):
        t0 = time.perf_counter()
        J = lm_joint(model, ids, n=a.n, top_k=a.top_k, temperature=1.0)
        with torch.no_grad():  # the model's greedy continuation, as axis indices
            g = model.generate_greedy(torch.tensor([ids]), a.n)[0, len(ids):].tolist()
        t_joint += time.perf_counter() - t0
        P = J.P
        other = J.vocab.index(OTHER)
        path = [J.vocab.index(t) if t in J.vocab else other for t in g]
        greedy_in_A += all(x != other for x in path)
        cover1.append(float(P.sum(dim=tuple(range(1, P.dim())))[:other].sum()))
        cover.append(J.coverage)
        t0 = time.perf_counter()
        Qs = {"product of marginals": product_of_marginals(P)}
        for r in RANKS:
            Qs[f"EM rank {r}"] = fit_cp(P, r, method="em", restarts=a.restarts,
                                        seed=0).dist.to_tensor()
        Qs["exact joint (Q = P)"] = P
        t_fit += time.perf_counter() - t0
        for k, Q in Qs.items():
            acc[k]["kl"].append(kl(P, Q))
            acc[k]["E"].append(expected_tokens_per_forward(P, Q))
            acc[k]["E_strict"].append(strict_expected_tokens(P, Q, other))
            acc[k]["greedy"].append(greedy_tokens_per_forward(P, Q))
            acc[k]["greedy_model"].append(model_greedy_tokens(Q, path, other))
        print(f"[{i + 1}/{len(prompts)}] coverage {J.coverage:.3f}  "
              f"E rank1/8/P {acc['EM rank 1']['E'][-1]:.3f} / {acc['EM rank 8']['E'][-1]:.3f} / "
              f"{acc['exact joint (Q = P)']['E'][-1]:.3f}", flush=True)

    def mean(xs):
        return sum(xs) / len(xs)

    N = len(prompts)
    whole = time.perf_counter() - t_start
    cmd = ".venv/bin/python " + " ".join(["bench/smollm2_exact_joint.py"] + sys.argv[1:])
    ref = trained_heads_reference()
    lines = [
        HEADING,
        "",
        f"{datetime.date.today().isoformat()}, `{cmd}`, {a.threads} thread(s); whole run "
        f"{whole:.0f} s (joints {t_joint:.0f} s, CP fits {t_fit:.0f} s).",
        "",
        f"{N} held-out code contexts (`heldout_prompts(\"code\", tok, num={N}, "
        f"prompt_tokens={a.prompt_tokens}, seed=0)`). P = `lm_joint(model, ctx, n={a.n}, "
        f"top_k={a.top_k}, temperature=1)`: SmolLM2's exact joint of its next {a.n} tokens over "
        f"an alphabet A of {a.top_k} tokens (the best by summed probability along the greedy "
        f"continuation) + OTHER; after an OTHER the continuation is that of the most probable "
        f"token outside A. Q: the product of P's marginals, `fit_cp(P, r, method=\"em\", "
        f"restarts={a.restarts}, seed=0)`, and P itself. Means over the contexts.",
        "",
        f"- Mass of A: x_1 in A {mean(cover1):.3f}; all {a.n} tokens in A (`coverage`) "
        f"{mean(cover):.3f}. The model's greedy {a.n} tokens all in A: {greedy_in_A} of {N}.",
        "- `E`: `theory.expected_tokens_per_forward(P, Q)` (x_1 from the backbone, "
        f"{a.n - 1} drafts from Q given x_1, at most {a.n}); OTHER is a symbol like any token, "
        "so a drafted OTHER that meets an OTHER counts as accepted.",
        "- `E strict`: the same with a drafted OTHER never accepted (it names no token): the "
        "acceptance of a drafter equal to Q on A.",
        "- `greedy (P)`: `theory.greedy_tokens_per_forward(P, Q)` on the bucketed joint (OTHER "
        "as a symbol; its argmax can be the OTHER bucket). `greedy (model)`: against the "
        "model's own greedy tokens (exact, T = 0), drafts = Q's sequential argmax over the "
        "alphabet tokens.",
        "",
        "| Q | mean KL(P‖Q) nats | E | E strict | greedy (P) | greedy (model) |",
        "|---|---|---|---|---|---|",
    ]
    for k in names:
        d = acc[k]
        lines.append(f"| {k} | {mean(d['kl']):.4f} | {mean(d['E']):.3f} | "
                     f"{mean(d['E_strict']):.3f} | {mean(d['greedy']):.2f} | "
                     f"{mean(d['greedy_model']):.2f} |")
    lines.append("")
    if ref:
        lines.append("Trained heads for comparison (section \"Head objective on the frozen "
                     "SmolLM2\": n = 4, teacher-forced greedy acceptance on held-out code), the "
                     "first two drafts' part 1 + a2 + a2·a3: " + "; ".join(ref) + ".")
    text = "\n".join(lines)
    print(text)
    if not a.no_write:
        write_section(ROOT / "bench" / "RESULTS.md", HEADING, text)


if __name__ == "__main__":
    main()
