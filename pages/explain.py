"""Explain: follow one merge coefficient from the raw numbers to the final lambda, every step with
its formula and the live values (for teaching). Values come from esm_core.analysis.explain.trace."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from esm_core.analysis.explain import trace
from ui import links
from ui.routes import through_app
from ui.widgets import guard, method_controls, need_result, preset_badge

through_app()  # a deep link on a fresh server goes through app.py (ui/routes.py)

st.title("Explain one coefficient")
st.caption("Pick a specialist and one element of one LoRA factor; every step of ES-Merging is shown with "
           "its formula and the numbers of this run. Change a temperature and watch the values move.")


def num(x: float) -> str:
    return f"{x:.4g}"


with guard():
    method_controls("explain", ("preset", "tau_layer", "tau_elem", "zscore_scope", "mode"))
    res = need_result("explain")
    if res is not None:
        preset_badge(res)
        keys = sorted(res.lam)
        c1, c2, c3, c4 = st.columns([1, 1, 2, 1])
        links.seed("ex_spec", res.specialists)
        links.seed("ex_layer", sorted({k.layer for k in keys}))
        links.seed("ex_ab", ["A", "B"])
        name = c1.selectbox("specialist", res.specialists, key="ex_spec")
        layer = c2.selectbox("block", sorted({k.layer for k in keys}), format_func=lambda l: str(l + 1), key="ex_layer")
        links.seed("ex_module", sorted({k.module for k in keys if k.layer == layer}))
        module = c3.selectbox("module", sorted({k.module for k in keys if k.layer == layer}), key="ex_module")
        ab = c4.radio("factor", ["A", "B"], horizontal=True, key="ex_ab")
        key = next(k for k in keys if k.layer == layer and k.module == module and k.ab == ab)
        R, C = res.lam[key].shape[1:]
        d1, d2 = st.columns(2)
        links.seed("ex_row", range(R))
        links.seed("ex_col", range(C))
        row = int(d1.number_input(f"row (0..{R - 1})", 0, R - 1, 0, key="ex_row"))
        col = int(d2.number_input(f"column (0..{C - 1})", 0, C - 1, 0, key="ex_col"))
        t = trace(res, name, key, (row, col))
        k = res.specialists.index(name)
        cfg = res.config

        st.header(f"λ = {num(t['lambda'])}", divider="gray")
        st.caption(f"{name} · `{key}` [{row}, {col}] · block {t['block']} · preset {cfg.preset} · mode {cfg.mode}")

        st.subheader("1. Layer-wise coefficient α (coarse signal, docs/METHOD.md section 2)")
        st.markdown("Mean-pool each modality's tokens, measure the sliced Wasserstein distance between the "
                    "base's and the specialist's points at every block:")
        st.latex(r"D^k_{m,l} = \mathrm{SWD}_p\big(\{h^B_{m,l}(i)\}_i,\ \{h^k_{m,l}(i)\}_i\big)")
        if cfg.first_delta == "raw" and layer == 0:
            st.latex(r"\Delta^k_{m,1} = D^k_{m,1}\quad\text{(reference preset: the first block's distance itself)}")
        else:
            st.latex(r"\Delta^k_{m,l} = D^k_{m,l} - D^k_{m,l-1}")
        st.latex(r"z^k_{m,l} = \frac{\Delta^k_{m,l} - \operatorname{mean}_l \Delta^k_{m,\cdot}}{\operatorname{std}_l \Delta^k_{m,\cdot}}"
                 r"\qquad s^k_l = \sum_m w_{k,m}\, z^k_{m,l}")
        st.dataframe(pd.DataFrame([{
            "modality": p["modality"], f"D (block {t['block']})": num(p["D"]), f"D (block {t['block'] - 1})": num(p["D_prev"]),
            "Δ": num(p["delta"]), "mean Δ over blocks": num(p["mean"]), "std Δ": num(p["std"]), "z": num(p["z"]),
            "weight w": num(p["weight"])} for p in t["layer"]["modalities"]]), hide_index=True, width="stretch")
        lay = t["layer"]
        st.latex(rf"s^{{{name}}}_{{{t['block']}}} = " + " + ".join(
            rf"{num(p['weight'])}\cdot({num(p['z'])})" for p in lay["modalities"]) + rf" = {num(lay['s'])}")
        st.latex(r"\alpha^k_l = \frac{\exp(s^k_l/\tau_{layer})}{\sum_{k'} \exp(s^{k'}_l/\tau_{layer})}"
                 rf"\quad \tau_{{layer}} = {num(lay['tau'])}")
        st.dataframe(pd.DataFrame({"specialist": res.specialists, "s": [num(v) for v in lay["s_all"]],
                                   "α": [num(v) for v in lay["alpha_all"]]}), hide_index=True)
        st.success(f"α = {num(lay['alpha'])}  (stored by the estimation: {num(lay['stored_alpha'])})")

        st.subheader("2. Element-wise coefficient β (fine signal, docs/METHOD.md section 3)")
        if "element" not in t:
            st.info("This result has no element signals (layer mode).")
        else:
            el = t["element"]
            if cfg.element_signal == "frobenius":
                st.latex(r"g^k_{l,j} = \sum_m \sum_i \left| \frac{\partial\, \lVert H^B_{m,l}(i) - H^k_{m,l}(i)\rVert_F}"
                         r"{\partial \theta^k_{l,j}} \right|")
            else:
                st.latex(r"g^k_{l,j} = \sum_{\text{mini-batches } u} \left| \frac{\partial\, \operatorname{mean}_{t \in u,\ "
                         r"\text{own modality}} (H^B_l - H^k_l)^2}{\partial \theta^k_{l,j}} \right|")
            st.caption(f"Units: {'each (modality, probe)' if cfg.element_group == 1 else f'mini-batches of {cfg.element_group} probes'}; "
                       f"modalities: {cfg.element_modalities}. The absolute value is taken per unit, then summed.")
            st.latex(rf"g = {num(el['g'])}\qquad gz = \frac{{g - \mu}}{{\sigma}} = \frac{{{num(el['g'])} - {num(el['mean'])}}}"
                     rf"{{{num(el['std'])}}} = {num(el['gz'])}")
            st.caption(f"μ and σ over {el['scope']} ({el['scope_size']} elements) of {name}.")
            st.latex(r"\beta^k_{l,j} = \frac{\exp(gz^k_{l,j}/\tau_{elem})}{\sum_{k'} \exp(gz^{k'}_{l,j}/\tau_{elem})}"
                     rf"\quad \tau_{{elem}} = {num(el['tau'])}")
            st.dataframe(pd.DataFrame({"specialist": res.specialists, "g": [num(v) for v in el["g_all"]],
                                       "gz": [num(v) for v in el["gz_all"]], "β": [num(v) for v in el["beta_all"]]}),
                         hide_index=True)
            st.success(f"β = {num(el['beta'])}  (stored: {num(el['stored_beta'])})")

        st.subheader("3. Combination (Eq. 4) and the merge (Eq. 1)")
        if t["mode"] == "combined":
            st.latex(r"\lambda^k_{l,j} = \frac{\alpha^k_l\, \beta^k_{l,j}}{\sum_{k'} \alpha^{k'}_l\, \beta^{k'}_{l,j}}")
        elif t["mode"] == "layer":
            st.latex(r"\lambda^k_{l,j} = \alpha^k_l \quad\text{(layer mode)}")
        else:
            st.latex(r"\lambda^k_{l,j} = \beta^k_{l,j} \quad\text{(element mode)}")
        st.dataframe(pd.DataFrame({"specialist": res.specialists, "λ": [num(v) for v in t["lambda_all"]]}),
                     hide_index=True)
        st.latex(r"\theta_{l,j} = \sum_k \lambda^k_{l,j}\, \theta^k_{l,j}")
        st.success(f"λ = {num(t['lambda'])}  (stored: {num(t['stored_lambda'])})")
