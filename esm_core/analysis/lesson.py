"""The guided lesson's questions and their answers, computed from a live result (the app's Learn page).

Each step of "Learn ES-Merging in 10 steps" asks one question that a learner answers by moving one
control; :func:`answer` computes the reply from the current :class:`ESResult` (and, for the probes, the
batcher), so the lesson explains the run on screen, not a canned example. Steps that vary a setting
re-derive from the stored signals (no new pass): temperatures, mode.

    a = answer(res, "tau_elem", 1.0)        # Answer(text, value, detail)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from esm_core.coefficients import combine, element_coefficients, layer_coefficients


@dataclass
class Answer:
    text: str  # the reveal, in words, with the live numbers
    value: object  # the number or label the question asks for (tests read it)
    detail: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------ measures
def block_token_counts(batcher, n: int = 32) -> dict[str, float]:
    """Mean tokens per modality block over the first n probes."""
    tot: dict[str, int] = {}
    seen: dict[str, int] = {}
    for i in range(min(n, batcher.probes.n_probes)):
        per: dict[str, int] = {}
        for _, m in batcher.tokens(i):
            if m is not None:
                per[m] = per.get(m, 0) + 1
        for m, c in per.items():
            tot[m] = tot.get(m, 0) + c
            seen[m] = seen.get(m, 0) + 1
    return {m: tot[m] / seen[m] for m in tot}


def sharpness(coef: torch.Tensor) -> float:
    """Mean over positions of the largest share any specialist gets (1/K = even, 1 = winner takes all)."""
    return float(coef.double().max(dim=0).values.mean())


def element_sharpness(beta: dict) -> float:
    num = sum(float(v.double().max(dim=0).values.sum()) for v in beta.values())
    den = sum(v[0].numel() for v in beta.values())
    return num / den


def top_change_share(a: dict, b: dict) -> float:
    """Share of elements whose top specialist differs between two coefficient maps."""
    changed = sum(int((a[k].argmax(0) != b[k].argmax(0)).sum()) for k in a)
    return changed / sum(a[k][0].numel() for k in a)


# ------------------------------------------------------------------------------------ questions
def answer(res, step: str, choice, *, batcher=None, specialist: str | None = None) -> Answer:
    """The live answer to a step's question for the learner's ``choice`` (see STEPS in the Learn page)."""
    names, mods = res.specialists, res.modalities
    D = res.layer.D  # [K, M, L+1]
    cfg = res.config
    if step == "probes":
        counts = block_token_counts(batcher)
        longest = max(counts, key=counts.get)
        txt = ", ".join(f"{m} {c:.1f}" for m, c in counts.items())
        return Answer(f"Mean tokens per block: {txt}. The longest block is **{longest}**; you chose "
                      f"**{choice}**: {'right' if choice == longest else 'not this one'}.", longest, counts)
    if step == "d0":
        d0 = float(D[:, :, 0].abs().max())
        right = (choice == "0") == (d0 < 1e-6)
        return Answer(f"The largest distance at block 0 (the input embeddings) is {d0:.3g}: the base and every "
                      "specialist read the same embeddings (one encoder per modality), so all differences come from "
                      f"the adapters. Your answer is {'right' if right else 'not right'}.", d0)
    if step == "farthest":
        k = names.index(specialist)
        last = D[k, :, -1]
        m = mods[int(last.argmax())]
        txt = ", ".join(f"{mods[j]} {float(last[j]):.3g}" for j in range(len(mods)))
        return Answer(f"At the last block, {specialist}'s distance from the base per modality: {txt}. The largest is "
                      f"on **{m}**; you chose **{choice}**.", m, {"last": last.tolist()})
    if step == "increment":
        k = names.index(specialist)
        own = res.own_modalities[k] or mods[0]
        delta = res.layer.delta[k, mods.index(own)]
        best = int(delta.argmax()) + 1
        return Answer(f"{specialist}'s distance on its own modality ({own}) grows most in block **{best}** "
                      f"(Δ = {float(delta[best - 1]):.3g}); you chose block {choice}. The z-score of these "
                      "increments over the blocks is the layer signal.", best, {"delta": delta.tolist()})
    if step == "tau_layer":
        cur = sharpness(res.layer.alpha)
        new = sharpness(layer_coefficients(D, cfg.replace(tau_layer=float(choice)), res.layer.weights).alpha)
        way = "sharper (one specialist takes more of each block)" if new > cur + 1e-9 else \
            "flatter (closer to an even split)" if new < cur - 1e-9 else "unchanged"
        return Answer(f"With τ_layer = {float(choice):g}, the largest α per block averages {new:.3f} (now "
                      f"{cur:.3f} at τ_layer = {cfg.tau_layer:g}; an even split is {1 / len(names):.3f}): α gets "
                      f"{way}.", new, {"current": cur})
    if res.element is None:
        return Answer("This result has no element signals (mode 'layer'); run with mode combined or element.", None)
    if step == "g":
        layer = int(choice)
        keys = [k for k in res.element.g if k.layer == layer]
        tot = torch.stack([res.element.g[k].double().reshape(len(names), -1).sum(1) for k in keys]).sum(0)
        top = names[int(tot.argmax())]
        txt = ", ".join(f"{n} {float(t):.3g}" for n, t in zip(names, tot))
        return Answer(f"Summed raw gradient scores g in block {layer + 1}: {txt}. **{top}**'s parameters move its "
                      "hidden states most there, before any z-scoring.", top, {"totals": tot.tolist()})
    if step == "tau_elem":
        cur = element_sharpness(res.element.beta)
        new_el = element_coefficients(res.element.g, cfg.replace(tau_elem=float(choice)))
        new = element_sharpness(new_el.beta)
        lam_new = combine(res.layer.alpha, new_el.beta, cfg.mode)
        lam_sharp = element_sharpness(lam_new)
        way = "sharper" if new > cur + 1e-9 else "flatter" if new < cur - 1e-9 else "unchanged"
        return Answer(f"With τ_elem = {float(choice):g}, the top specialist's β per element averages {new:.3f} (now "
                      f"{cur:.3f} at τ_elem = {cfg.tau_elem:g}): β gets {way}, and λ follows: its top share averages "
                      f"{lam_sharp:.3f} (now {element_sharpness(res.lam):.3f}). A higher temperature spreads each "
                      "element's weight over more specialists.", new, {"current": cur, "lambda": lam_sharp})
    if step == "mode":
        other = combine(res.layer.alpha, res.element.beta, str(choice))
        share = top_change_share(res.lam, other)
        return Answer(f"In mode **{choice}**, {100 * share:.1f} % of the adapter elements get another top specialist "
                      f"than in the current mode ({cfg.mode}).", share)
    raise ValueError(f"unknown lesson step {step!r}")
