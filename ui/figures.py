"""Plotly figures of the method's signals: pure functions (arrays in, (figure, data frame) out).

Every builder returns the figure and the data it shows as a tidy DataFrame, so that the page can
offer both for download. Nothing here computes the method; it only lays out what esm_core returns.
Reference figures: docs/METHOD.md section 8 (Figs. 1/8, 2, 5, 6/9/10; Table 7).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

PALETTE = px.colors.qualitative.Set2
DIVERGING = "RdBu_r"


def _np(x) -> np.ndarray:
    return x.detach().cpu().float().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float32)


def color_map(names: list[str]) -> dict[str, str]:
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}


# ------------------------------------------------------------------------------------ layer-wise
def swd_curves(D, specialists: list[str], modalities: list[str], preset: str = "") -> tuple[go.Figure, pd.DataFrame]:
    """D [K, M, L+1]: SWD between base and each specialist per layer, one panel per modality."""
    D = _np(D)
    K, M, L1 = D.shape
    df = pd.DataFrame([dict(specialist=specialists[k], modality=modalities[m], layer=l, swd=float(D[k, m, l]))
                       for k in range(K) for m in range(M) for l in range(L1)])
    fig = px.line(df, x="layer", y="swd", color="specialist", facet_col="modality", markers=True,
                  color_discrete_map=color_map(specialists),
                  labels={"swd": "SWD(base, specialist)", "layer": "block (0 = input embeddings)"})
    fig.update_layout(title=f"Sliced Wasserstein distance per layer{_tag(preset)}", height=360,
                      legend_title_text="specialist")
    fig.update_xaxes(dtick=1)
    return fig, df


def layer_steps(ls, specialists: list[str], modalities: list[str], preset: str = "") -> tuple[go.Figure, pd.DataFrame]:
    """Increments Delta and z-scores per (specialist, modality), score s and alpha per specialist."""
    delta, z, s, alpha = _np(ls.delta), _np(ls.z), _np(ls.s), _np(ls.alpha)
    K, M, L = delta.shape
    layers = np.arange(1, L + 1)
    fig = make_subplots(rows=1, cols=4, subplot_titles=("increment Δ", "z-score of Δ", "layer score s", "α (Eq. 2)"))
    cmap = color_map(specialists)
    dash = ["solid", "dot", "dash", "dashdot", "longdash"]
    rows = []
    for k, n in enumerate(specialists):
        for m, mod in enumerate(modalities):
            for col, arr, name in ((1, delta, "delta"), (2, z, "z")):
                fig.add_trace(go.Scatter(x=layers, y=arr[k, m], mode="lines+markers", line=dict(color=cmap[n], dash=dash[m % 5]),
                                         name=f"{n} · {mod}", legendgroup=n, showlegend=col == 1 and m == 0 and False),
                              row=1, col=col)
            for l in range(L):
                rows.append(dict(specialist=n, modality=mod, layer=l + 1, delta=float(delta[k, m, l]), z=float(z[k, m, l])))
        fig.add_trace(go.Scatter(x=layers, y=s[k], mode="lines+markers", line=dict(color=cmap[n]), name=n,
                                 legendgroup=n, showlegend=False), row=1, col=3)
        fig.add_trace(go.Scatter(x=layers, y=alpha[k], mode="lines+markers", line=dict(color=cmap[n]), name=n,
                                 legendgroup=n), row=1, col=4)
    df = pd.DataFrame(rows)
    sa = pd.DataFrame([dict(specialist=n, layer=l + 1, s=float(s[k, l]), alpha=float(alpha[k, l]))
                       for k, n in enumerate(specialists) for l in range(L)])
    df = df.merge(sa, on=["specialist", "layer"])
    fig.update_layout(height=340, title=f"From distances to layer coefficients{_tag(preset)} "
                                        f"(line style = modality: {', '.join(f'{m}={d}' for m, d in zip(modalities, dash))})")
    fig.update_xaxes(title_text="block", dtick=1)
    return fig, df


def alpha_heatmap(alpha, specialists: list[str], preset: str = "") -> tuple[go.Figure, pd.DataFrame]:
    a = _np(alpha)  # [K, L]
    L = a.shape[1]
    fig = go.Figure(go.Heatmap(z=a.T, x=specialists, y=[str(l + 1) for l in range(L)], colorscale="Viridis",
                               zmin=0, zmax=1, texttemplate="%{z:.3f}",
                               hovertemplate="block %{y}<br>%{x}: α=%{z:.4f}<extra></extra>"))
    fig.update_layout(title=f"α per block (Fig. 5){_tag(preset)}", height=max(260, 28 * L + 120),
                      yaxis_title="block", xaxis_title="specialist")
    df = pd.DataFrame([dict(layer=l + 1, **{n: float(a[k, l]) for k, n in enumerate(specialists)}) for l in range(L)])
    return fig, df


def alpha_errorbars(alpha, std_probes, std_seeds, specialists: list[str]) -> tuple[go.Figure, pd.DataFrame]:
    """alpha per block with error bars: +-1 std over probe bootstrap draws (and, dotted, over seeds)."""
    a, sp, ss = _np(alpha), _np(std_probes), _np(std_seeds)
    L = a.shape[1]
    x = list(range(1, L + 1))
    colors = color_map(specialists)
    fig = go.Figure()
    for k, n in enumerate(specialists):
        fig.add_trace(go.Scatter(x=x, y=a[k], name=f"{n} (probes)", mode="lines+markers", line=dict(color=colors[n]),
                                 error_y=dict(type="data", array=sp[k], visible=True)))
        fig.add_trace(go.Scatter(x=[v + 0.15 for v in x], y=a[k], name=f"{n} (seeds)", mode="markers",
                                 marker=dict(color=colors[n], symbol="diamond-open"),
                                 error_y=dict(type="data", array=ss[k], visible=True, width=2)))
    fig.update_layout(title="α per block, ±1 std over probe bootstrap draws and over projection seeds",
                      xaxis_title="block", yaxis_title="α", yaxis_range=[0, 1], height=380)
    df = pd.DataFrame([dict(block=l + 1, specialist=n, alpha=float(a[k, l]), std_probes=float(sp[k, l]),
                            std_seeds=float(ss[k, l])) for k, n in enumerate(specialists) for l in range(L)])
    return fig, df


def distance_matrix(D, layer: int, specialists: list[str], modalities: list[str], preset: str = "") -> tuple[go.Figure, pd.DataFrame]:
    """Specialists x modalities SWD at one layer (Fig. 2); the row maximum is marked."""
    d = _np(D)[:, :, layer]
    fig = go.Figure(go.Heatmap(z=d, x=modalities, y=specialists, colorscale="Magma",
                               texttemplate="%{z:.3f}", hovertemplate="%{y} on %{x} tokens: %{z:.4f}<extra></extra>"))
    for k in range(d.shape[0]):
        m = int(np.argmax(d[k]))
        fig.add_shape(type="rect", x0=m - 0.5, x1=m + 0.5, y0=k - 0.5, y1=k + 0.5, line=dict(color="cyan", width=3))
    fig.update_layout(title=f"Distance from the base at block {layer} (Fig. 2){_tag(preset)}",
                      xaxis_title="tokens of modality", yaxis_title="specialist", height=120 + 60 * d.shape[0])
    fig.update_yaxes(autorange="reversed")
    df = pd.DataFrame(d, index=specialists, columns=modalities).reset_index(names="specialist")
    return fig, df


def projection_sweep(sweep: dict[int, object], specialists: list[str]) -> tuple[go.Figure, pd.DataFrame]:
    """alpha [seeds, K, L] per projection count: mean and spread across seeds (Table 7)."""
    rows = []
    for n, a in sweep.items():
        a = _np(a)
        for s in range(a.shape[0]):
            for k, name in enumerate(specialists):
                for l in range(a.shape[2]):
                    rows.append(dict(projections=n, seed=s, specialist=name, layer=l + 1, alpha=float(a[s, k, l])))
    df = pd.DataFrame(rows)
    fig = px.box(df, x="layer", y="alpha", color="specialist", facet_col="projections", points="all",
                 color_discrete_map=color_map(specialists))
    fig.update_layout(title="α across random projection sets: more projections, less spread (Table 7)", height=360)
    fig.update_xaxes(dtick=1)
    return fig, df


# ------------------------------------------------------------------------------------ element-wise
def block_reduce(mat: np.ndarray, max_rows: int = 256, max_cols: int = 256) -> tuple[np.ndarray, tuple[int, int]]:
    """Mean over blocks so the matrix has at most max_rows x max_cols cells; returns (matrix, factors)."""
    R, C = mat.shape
    fr, fc = max(1, math.ceil(R / max_rows)), max(1, math.ceil(C / max_cols))
    if fr == 1 and fc == 1:
        return mat, (1, 1)
    Rp, Cp = math.ceil(R / fr) * fr, math.ceil(C / fc) * fc
    pad = np.full((Rp, Cp), np.nan, dtype=np.float32)
    pad[:R, :C] = mat
    red = np.nanmean(pad.reshape(Rp // fr, fr, Cp // fc, fc), axis=(1, 3))
    return red.astype(np.float32), (fr, fc)


def element_heatmaps(mats: dict[str, np.ndarray], title: str, *, zmin=None, zmax=None, colorscale="Viridis",
                     max_cells: int = 256, offset: tuple[int, int] = (0, 0), symmetric: bool = False,
                     row_title: str = "row", col_title: str = "column") -> tuple[go.Figure, tuple[int, int]]:
    """One heatmap per specialist, side by side, block-reduced above max_cells per side, on ONE colour
    scale (the one colour bar shown is true for every panel; ``symmetric``: centred on 0).

    ``offset`` is the (row, col) of the top-left cell when showing a crop, so hover shows true indices.
    """
    names = list(mats)
    first = next(iter(mats.values()))
    if zmin is None or zmax is None:
        finite = [np.asarray(m, dtype=np.float32)[np.isfinite(m)] for m in mats.values()]
        lo = min((float(f.min()) for f in finite if f.size), default=0.0)
        hi = max((float(f.max()) for f in finite if f.size), default=1.0)
        if symmetric:
            lo, hi = -max(abs(lo), abs(hi)), max(abs(lo), abs(hi))
        zmin = lo if zmin is None else zmin
        zmax = hi if zmax is None else zmax
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names, horizontal_spacing=0.04)
    factors = (1, 1)
    for i, n in enumerate(names):
        red, factors = block_reduce(np.asarray(mats[n], dtype=np.float32), max_cells, max_cells)
        ys = offset[0] + np.arange(red.shape[0]) * factors[0]
        xs = offset[1] + np.arange(red.shape[1]) * factors[1]
        fig.add_trace(go.Heatmap(z=red, x=xs, y=ys, zmin=zmin, zmax=zmax, colorscale=colorscale,
                                 showscale=i == len(names) - 1, name=n,
                                 hovertemplate=f"{n}<br>row %{{y}}, col %{{x}}<br>value %{{z:.4g}}<extra></extra>"),
                      row=1, col=i + 1)
    h = int(min(700, max(260, 12 * min(first.shape[0], max_cells) + 120)))
    note = "" if factors == (1, 1) else f" — block means of {factors[0]}×{factors[1]} cells (select a crop for full resolution)"
    fig.update_layout(title=title + note, height=h)
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(title_text=col_title)
    fig.update_yaxes(title_text=row_title, col=1)
    return fig, factors


def histograms(values: dict[str, np.ndarray], title: str, bins: int = 60) -> tuple[go.Figure, pd.DataFrame]:
    fig = go.Figure()
    cmap = color_map(list(values))
    for n, v in values.items():
        fig.add_trace(go.Histogram(x=np.asarray(v).ravel(), nbinsx=bins, name=n, opacity=0.6, marker_color=cmap[n]))
    fig.update_layout(barmode="overlay", title=title, height=300, xaxis_title="value", yaxis_title="elements")
    df = pd.DataFrame({n: pd.Series(np.asarray(v).ravel()) for n, v in values.items()})
    return fig, df


def matrix_frame(mats: dict[str, np.ndarray], value: str) -> pd.DataFrame:
    """Long table (specialist, row, col, value) of element matrices."""
    parts = []
    for n, m in mats.items():
        m = np.asarray(m)
        r, c = np.indices(m.shape)
        parts.append(pd.DataFrame({"specialist": n, "row": r.ravel(), "col": c.ravel(), value: m.ravel()}))
    return pd.concat(parts, ignore_index=True)


# ------------------------------------------------------------------------------------ embeddings
def embedding_scatter(df: pd.DataFrame, title: str, models: list[str], axis: str = "component") -> go.Figure:
    """df columns: x, y, model, modality, sample, text (hover); axis: the projection's name (PCA, UMAP)."""
    fig = px.scatter(df, x="x", y="y", color="model", symbol="modality", hover_name="text",
                     hover_data={"x": False, "y": False, "sample": True, "model": True, "modality": True},
                     color_discrete_map=color_map(models), custom_data=["model", "modality", "sample"])
    fig.update_traces(marker=dict(size=7, opacity=0.75))
    fig.update_layout(title=title, height=560, dragmode="lasso", legend_title_text="model",
                      xaxis_title=f"{axis} 1", yaxis_title=f"{axis} 2")
    return fig


def embedding_map(df: pd.DataFrame, title: str, models: list[str], axis: str = "component", *, color: str = "model",
                  highlight=None, density: bool = False, side_by_side: list[str] | None = None) -> go.Figure:
    """The embedding map as people know it from the Embedding Projector: colour by the model or by a sample
    property (numeric: a colour scale; else categories), search matches ringed, density contours against
    overplotting, and two models side by side on the same projection (LIT-style)."""
    d = df if not side_by_side else df[df["model"].isin(side_by_side)]
    numeric = color != "model" and pd.api.types.is_numeric_dtype(d[color])
    kw = dict(color=color, hover_name="text", custom_data=["model", "modality", "sample"],
              hover_data={"x": False, "y": False, "sample": True, "model": True,
                          **({color: True} if color != "model" else {})})
    if color == "model":
        kw["color_discrete_map"] = color_map(models)
    else:
        kw["symbol"] = "model"
        if numeric:
            kw["color_continuous_scale"] = "Viridis"
    if side_by_side:
        kw.update(facet_col="model", category_orders={"model": list(side_by_side)})
    fig = px.scatter(d, x="x", y="y", **kw)
    fig.update_traces(marker=dict(size=7, opacity=0.45 if density else 0.75))  # the points (others come after)
    panels = list(side_by_side) if side_by_side else [None]
    for j, m in enumerate(panels, start=1):
        part = d if m is None else d[d["model"] == m]
        where = dict(row=1, col=j) if side_by_side else {}
        if density and len(part) > 5:
            fig.add_trace(go.Histogram2dContour(x=part["x"], y=part["y"], showscale=False, ncontours=8,
                                                contours_coloring="none", line=dict(width=1, color="#555"),
                                                hoverinfo="skip", name="density", showlegend=False), **where)
        if highlight is not None:
            hit = part[highlight.loc[part.index]]
            if len(hit):
                fig.add_trace(go.Scatter(x=hit["x"], y=hit["y"], mode="markers", name="search matches",
                                         text=hit["text"], hoverinfo="text", showlegend=j == 1,
                                         marker=dict(size=16, symbol="circle-open", color="black",
                                                     line=dict(width=2))), **where)
    fig.update_layout(title=title, height=560, dragmode="lasso",
                      legend_title_text="model" if color == "model" else f"{color} / model")
    fig.update_xaxes(title_text=f"{axis} 1")
    fig.update_yaxes(title_text=f"{axis} 2")
    return fig


def _tag(preset: str) -> str:
    return f" — preset '{preset}'" if preset else ""


# ------------------------------------------------------------------------------------ specialists
def delta_norm_heatmaps(mats: dict[str, tuple[list[int], list[str], np.ndarray]]) -> tuple[go.Figure, pd.DataFrame]:
    """Blocks x modules ||scaling·B·A||_F per adapter, one panel each on a shared colour scale."""
    names = list(mats)
    vmax = max((float(np.nanmax(m[2])) for m in mats.values() if np.isfinite(m[2]).any()), default=1.0)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names, horizontal_spacing=0.05, shared_yaxes=True)
    rows = []
    for i, n in enumerate(names):
        blocks, modules, arr = mats[n]
        short = [m.rsplit(".", 1)[-1] for m in modules]
        fig.add_trace(go.Heatmap(z=arr.astype(np.float32), x=short, y=[str(b) for b in blocks], zmin=0, zmax=vmax,
                                 colorscale="Viridis", showscale=i == len(names) - 1, name=n,
                                 hovertemplate=f"{n}<br>block %{{y}} · %{{x}}<br>‖s·BA‖ = %{{z:.4g}}<extra></extra>"),
                      row=1, col=i + 1)
        for bi, b in enumerate(blocks):
            for mi, m in enumerate(modules):
                rows.append(dict(specialist=n, block=b, module=m, delta_norm=float(arr[bi, mi])))
    L = max((len(m[0]) for m in mats.values()), default=1)
    fig.update_layout(title="Weight change per block and module: ‖scaling · B·A‖_F", height=max(260, 26 * L + 140))
    fig.update_yaxes(autorange="reversed", title_text="block", col=1)
    return fig, pd.DataFrame(rows)


# ------------------------------------------------------------------------------------ probe previews
def protein_lengths(lengths: pd.DataFrame, modality: str = "protein") -> tuple[go.Figure, pd.DataFrame]:
    fig = px.histogram(lengths, x="length", nbins=min(40, max(5, len(lengths) // 3)))
    fig.update_layout(title=f"{modality}: sequence length ({len(lengths)} samples, median "
                            f"{float(lengths['length'].median()) if len(lengths) else 0:g})",
                      height=280, xaxis_title="residues", yaxis_title="samples")
    return fig, lengths


def aa_composition(comp: pd.DataFrame, modality: str = "protein") -> tuple[go.Figure, pd.DataFrame]:
    fig = px.bar(comp, x="amino_acid", y="fraction", hover_data=["count"])
    fig.update_layout(title=f"{modality}: amino-acid composition", height=280, xaxis_title="amino acid",
                      yaxis_title="fraction of residues", yaxis_tickformat=".0%")
    return fig, comp


def gene_frequency(freq: pd.DataFrame, top: int, modality: str = "cell") -> tuple[go.Figure, pd.DataFrame]:
    fig = px.bar(freq, x="gene", y="samples", hover_data=["share"])
    fig.update_layout(title=f"{modality}: genes most often in a sample's top {top}", height=300,
                      xaxis_title="gene", yaxis_title="samples")
    return fig, freq


def probe_html(spans: list[tuple[str | None, list[str]]], colors: dict[str, str]) -> str:
    """The tokenised probe as HTML: each modality span on its colour with a label (paper Fig. 4).

    Text is escaped; token boundaries are thin outlines; prefix/BOS text stays plain.
    """
    import html as _html

    parts = ['<div class="esm-probe" style="font-family:monospace;line-height:2.2;word-break:break-all">']
    for mod, toks in spans:
        inner = "".join(f'<span style="outline:1px solid rgba(0,0,0,.18);padding:0 1px">{_html.escape(t).replace(chr(10), "↵<br>")}</span>'
                        for t in toks)
        if mod is None:
            parts.append(f'<span class="esm-text">{inner}</span>')
        else:
            c = colors.get(mod, "#ddd")
            parts.append(f'<span class="esm-span" data-modality="{_html.escape(mod)}" title="{_html.escape(mod)}: '
                         f'{len(toks)} tokens" style="background:{c};border-radius:4px;padding:2px 3px">'
                         f'<sup style="font-family:sans-serif;font-weight:600;font-size:70%;margin-right:3px">{_html.escape(mod)}</sup>{inner}</span>')
    parts.append("</div>")
    return "".join(parts)


def probe_legend(colors: dict[str, str]) -> str:
    import html as _html

    return " ".join(f'<span style="background:{c};border-radius:4px;padding:1px 6px;margin-right:6px">'
                    f'{_html.escape(m)}</span>' for m, c in colors.items())
