"""Specialists: the base and the K LoRA specialists, what each adapter holds, whether they merge.

docs/METHOD.md section 0. Shows the current run (the demo zoo by default), one table per adapter (rank,
alpha, scaling, target modules, parameters, the per-block norm of scaling·B·A) and the compatibility
verdict of every check the engine makes (esm_core.analysis.describe). A form builds a run from local model,
adapter, encoder and data paths under the allowed roots (any K >= 2, any modality names); it is
applied only when every check passes. An expander imports a published specialist (a LoRA inside a
full checkpoint, a PEFT folder with modules_to_save, a pickled state dict on request) as a clean PEFT
folder (esm_core.importing) and shows its report. Nothing here loads model weights.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pandas as pd
import streamlit as st

from esm_core.analysis.describe import adapter_rows, delta_norm_matrix
from esm_core.encoders import encoder_types
from esm_core.errors import ESMError
from esm_core.importing import FORMATS, import_specialist, report_rows
from esm_core.runspec import RunSpec, load_run_spec, run_spec_from_dict
from esm_core.samples import VALIDATORS
from ui import checks, figures, roots, state
from ui.routes import through_app
from ui.session import current
from ui.widgets import csv_bytes, guard, show_figure

through_app()  # a deep link on a fresh server goes through app.py (ui/routes.py)

st.title("Specialists")
st.caption("One base model and K LoRA specialists on one copy of the base (docs/METHOD.md section 0). Every check below "
           "reads only the adapters and the base's config; the weights are loaded when you run.")

KINDS = sorted(VALIDATORS)


def _show_verdict(v) -> None:
    if v.ok:
        st.success(v.summary())
    else:
        st.error(v.summary())
        for c in v.failures:
            st.error(f"**{c.name}**: {c.detail}" + (f"  \nFix: {c.fix}" if c.fix else ""))


def _form_version(sp: RunSpec) -> int:
    """Form widgets are keyed by a version that changes with the run, so the form always shows the
    current run (after applying, resetting, or loading a session) rather than stale inputs."""
    return current().form_version_for(state.spec_key(sp))


def _apply(new: RunSpec, what: str) -> None:
    v = checks.apply_spec(new)
    if v.ok:
        current().message = f"Applied {what}: {len(new.specialists)} specialists, modalities " \
                            f"{', '.join(m.name for m in new.modalities)}."
        st.rerun()
    st.error(f"Not applied ({what}): the specialists do not pass the checks.")
    _show_verdict(v)


msg = current().take_message()
if msg:
    st.success(msg)

# ------------------------------------------------------------------------------------ current run
with guard():
    sp = state.spec()
    st.subheader("Current run")
    st.caption(f"Base: `{sp.base}` · trust_remote_code: {'on' if sp.trust_remote_code else 'off'}"
               + (f" · from `{sp.source}`" if sp.source else ""))
    c1, c2 = st.columns(2)
    c1.dataframe(pd.DataFrame([dict(specialist=s.name, modality=s.modality or "–", adapter=s.adapter)
                               for s in sp.specialists]), hide_index=True, width="stretch")
    c2.dataframe(pd.DataFrame([dict(modality=m.name, prefix=m.prefix, kind=m.kind, encoder=m.encoder.type,
                                    encoder_path=m.encoder.path or "",
                                    data=f"{Path(m.data.path).name}:{m.data.column}" if m.data else "")
                               for m in sp.modalities]), hide_index=True, width="stretch")

    st.subheader("Compatibility")
    v = checks.verdict(sp)
    _show_verdict(v)
    st.dataframe(pd.DataFrame(v.table()), hide_index=True, width="stretch", key="sp_checks")

    if v.adapters:
        st.subheader("Adapters")
        own = {s.name: s.modality for s in sp.specialists}
        rows = adapter_rows(list(v.adapters.values()), own)
        st.dataframe(pd.DataFrame(rows).drop(columns=["path"]), hide_index=True, width="stretch",
                     key="sp_adapters")
        mats = {n: delta_norm_matrix(a) for n, a in v.adapters.items()}
        fig, df = figures.delta_norm_heatmaps(mats)
        show_figure(fig, df, "adapter delta norms", key="sp_norms")
        tabs = st.tabs(list(v.adapters))
        for tab, row in zip(tabs, rows):
            n = row["specialist"]
            with tab:
                facts = {k: row[k] for k in ("modality", "rank", "alpha", "scaling", "rslora", "target_modules",
                                             "blocks", "parameters", "dtype", "path")}
                st.dataframe(pd.DataFrame([dict(field=k, value=str(x)) for k, x in facts.items()]),
                             hide_index=True, width="stretch", key=f"sp_facts_{n}")
                blocks, modules, arr = mats[n]
                table = pd.DataFrame(arr, index=pd.Index(blocks, name="block"),
                                     columns=[m.rsplit(".", 1)[-1] for m in modules])
                st.caption("‖scaling · B·A‖_F per block (rows) and module (columns): the weight change the "
                           "adapter makes.")
                st.dataframe(table.style.format("{:.4g}"),
                             width="stretch", key=f"sp_norm_{n}")
                st.download_button("CSV", partial(csv_bytes, table.reset_index()),
                                   file_name=f"delta_norms_{n}.csv", mime="text/csv", key=f"sp_norm_csv_{n}",
                                   on_click="ignore")

# ------------------------------------------------------------------------------------ your own models
st.subheader("Use your own models")
allowed = ", ".join(f"`{r}`" for r in roots.allowed_roots())
st.caption(f"Local directories only, under the allowed roots ({allowed}; the operator adds more with "
           "ESM_ALLOWED_ROOTS). Relative paths are taken from the repository root. The run is applied only "
           "when every check passes.")

c1, c2 = st.columns([3, 1])
with c2:
    if st.button("Reset to the demo zoo", key="sp_reset"):
        with guard():
            state.set_spec(state.demo_spec())
            current().message = "Back to the demo zoo."
            st.rerun()
with c1:
    with st.expander("Load a run config (YAML)"):
        ypath = st.text_input("run config path", key="sp_yaml", placeholder="e.g. /data/models/run.yaml")
        if st.button("Load and apply", key="sp_yaml_go") and ypath:
            with guard():
                p = roots.check_allowed(ypath, "Run config")
                _apply(load_run_spec(p), Path(p).name)

with guard():
    sp = state.spec()
    ver = _form_version(sp)
    k = f"spf{ver}_"
    cK, cM = st.columns(2)
    K = int(cK.number_input("specialists (K)", min_value=2, max_value=max(64, len(sp.specialists)),
                            value=len(sp.specialists), key=k + "K"))
    M = int(cM.number_input("modalities", min_value=1, max_value=max(16, len(sp.modalities)),
                            value=len(sp.modalities), key=k + "M"))
    etypes = encoder_types()
    with st.form(k + "form"):
        base = st.text_input("base model directory", value=sp.base, key=k + "base",
                             help=RunSpec.__dataclass_fields__["base"].metadata["help"])
        trust = st.checkbox("trust remote code (runs Python files from the base directory)",
                            value=sp.trust_remote_code, key=k + "trust",
                            help="Off by default. Only for a base whose custom model code you trust.")
        st.markdown("**Modalities** (in probe order)")
        mods = []
        for i in range(M):
            cur = sp.modalities[i] if i < len(sp.modalities) else None
            c = st.columns([2, 2, 2, 2, 3, 3, 2])
            name = c[0].text_input("name", value=cur.name if cur else "", key=f"{k}m{i}_name")
            prefix = c[1].text_input("prefix", value=cur.prefix if cur else "", key=f"{k}m{i}_prefix")
            kind = c[2].selectbox("kind", KINDS, index=KINDS.index(cur.kind) if cur and cur.kind in KINDS
                                  else KINDS.index("text"), key=f"{k}m{i}_kind")
            et = cur.encoder.type if cur and cur.encoder.type in etypes else "text"
            etype = c[3].selectbox("encoder", etypes, index=etypes.index(et), key=f"{k}m{i}_enc")
            epath = c[4].text_input("encoder path", value=(cur.encoder.path or "") if cur else "",
                                    key=f"{k}m{i}_encpath", help="Needed by soft_token encoders.")
            dpath = c[5].text_input("probe data file", value=cur.data.path if cur and cur.data else "",
                                    key=f"{k}m{i}_data")
            col = c[6].text_input("column", value=cur.data.column if cur and cur.data else "",
                                  key=f"{k}m{i}_col")
            mods.append(dict(name=name.strip(), prefix=prefix, kind=kind,
                             encoder=dict(type=etype, path=epath.strip() or None,
                                          options=dict(cur.encoder.options) if cur and cur.encoder.type == etype
                                          else {}),
                             **({"data": dict(path=dpath.strip(), column=col.strip())} if dpath.strip() else {})))
        st.markdown("**Specialists**")
        specs = []
        for i in range(K):
            cur = sp.specialists[i] if i < len(sp.specialists) else None
            c = st.columns([2, 5, 2])
            name = c[0].text_input("name", value=cur.name if cur else "", key=f"{k}s{i}_name")
            adapter = c[1].text_input("adapter directory (PEFT LoRA)", value=cur.adapter if cur else "",
                                      key=f"{k}s{i}_adapter")
            own = c[2].text_input("own modality", value=(cur.modality or "") if cur else "", key=f"{k}s{i}_mod",
                                  help="The modality this specialist was trained on (empty: none).")
            specs.append(dict(name=name.strip(), adapter=adapter.strip(), modality=own.strip() or None))
        go = st.form_submit_button("Check and apply", type="primary")
    if go:
        m = state.method()
        method = {"preset": m.preset, **{f: getattr(m, f) for f in m.overridden}}
        d = dict(base=base.strip(), trust_remote_code=bool(trust), specialists=specs, modalities=mods, method=method)
        for s in specs:
            if not s["adapter"]:
                raise ESMError(f"Specialist {s['name'] or '(unnamed)'!r} has no adapter directory.",
                               fix="fill in the PEFT adapter directory of every specialist.")
        _apply(run_spec_from_dict(d, base_dir=roots.ROOT), "your models")

# ------------------------------------------------------------------------------------ import a published specialist
with st.expander("Import a published specialist"):
    st.caption("Writes a clean PEFT adapter folder (stock keys, its own r and alpha), the other weights (encoders, "
               "projectors, modules_to_save) in extra_weights.safetensors, and import_report.json. Source and output "
               "must lie under the allowed roots; the output must be a new folder outside the source.")
    ic = st.columns([4, 4, 2])
    src = ic[0].text_input("source (folder or weights file)", key="imp_src",
                           placeholder="e.g. /data/models/mol-llama-checkpoint")
    out = ic[1].text_input("output folder (new)", key="imp_out", placeholder="e.g. /data/imports/molecule")
    fmt = ic[2].selectbox("format", FORMATS, key="imp_fmt")
    ic = st.columns([2, 2, 6])
    rank = ic[0].number_input("rank r (0: read from the tensors)", min_value=0, value=0, step=1, key="imp_rank")
    alpha = ic[1].number_input("lora_alpha (0: from its config)", min_value=0.0, value=0.0, key="imp_alpha")
    ibase = ic[2].text_input("base model folder (optional: compares configs and shapes)", key="imp_base")
    allow = st.checkbox("allow pickle (.pt/.bin; read with torch.load(weights_only=True), written as safetensors)",
                        value=False, key="imp_pickle")
    over = st.checkbox("replace an earlier import at the output folder", value=False, key="imp_over")
    if st.button("Import", key="imp_go"):
        with guard():
            if not src.strip() or not out.strip():
                raise ESMError("Import: the source and the output folder are both needed.",
                               fix="fill in the source and a new output folder.")
            report = import_specialist(
                roots.check_allowed(src.strip(), "Import source"), roots.check_allowed(out.strip(), "Import output"),
                fmt=fmt, rank=int(rank) or None, alpha=float(alpha) or None, allow_pickle=bool(allow),
                base=roots.check_allowed(ibase.strip(), "Base model") if ibase.strip() else None, overwrite=bool(over))
            st.success(f"Imported {report['converted']['count']} LoRA factors into `{report['output']}` "
                       f"(r={report['lora']['r']}, alpha={report['lora']['lora_alpha']:g}). Use the folder as a "
                       "specialist's adapter in the form above.")
            st.dataframe(pd.DataFrame(report_rows(report)).astype({"count": "string"}), hide_index=True,
                         width="stretch", key="imp_report")
