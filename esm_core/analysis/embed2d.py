"""2-D maps of hidden states (paper Figs. 1 and 8): gather points, project with PCA or UMAP.

    pts = gather_points(states, layer=-1, modality="protein", models=["base", "prot", "merged"])
    xy = project_2d(pts.X, method="umap", seed=42)      # [n, 2]; "pca" is instant

All models' points are projected together, so distances between models are comparable on one map.
UMAP pays a numba JIT (~13 s) in every new process; the app caches it and offers PCA meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from esm_core.errors import ESMError


@dataclass
class Points:
    X: np.ndarray  # [n, d]
    model: list[str]
    sample: np.ndarray  # [n] sample index within the modality
    token: np.ndarray  # [n] token position within the sample's block (-1 for sample means)


def gather_points(states_list, layer: int, modality: str, models: list[str], level: str = "sample",
                  max_points_per_model: int | None = None, seed: int = 0) -> Points:
    """Rows of the chosen models at one block: per-sample means, or every token (token_layers only).

    ``states_list``: HiddenStates objects (e.g. the estimation's base+specialists and a merged model's).
    """
    rows, names, samples, tokens = [], [], [], []
    found = set()
    for st in states_list:
        L = st.num_layers
        l = layer if layer >= 0 else L + 1 + layer
        for m in models:
            if m not in st.models or m in found:
                continue
            i = st.models.index(m)
            if level == "sample":
                X = st.pooled[modality][i, l]
                smp = np.arange(X.shape[0])
                tok = np.full(X.shape[0], -1)
            else:
                if l not in st.tokens or modality not in st.tokens[l]:
                    raise ESMError(f"Per-token states of block {l} were not kept.",
                                   fix=f"add {l} to token_layers and run again, or use sample means.")
                X = st.tokens[l][modality][i]
                smp = st.token_sample[modality].numpy()
                tok = _positions(smp)
            if max_points_per_model and X.shape[0] > max_points_per_model:
                sel = np.sort(np.random.default_rng(seed).choice(X.shape[0], max_points_per_model, replace=False))
                X, smp, tok = X[sel], smp[sel], tok[sel]
            rows.append(X.float().numpy() if isinstance(X, torch.Tensor) else np.asarray(X, dtype=np.float32))
            names += [m] * X.shape[0]
            samples.append(np.asarray(smp))
            tokens.append(np.asarray(tok))
            found.add(m)
    missing = [m for m in models if m not in found]
    if missing:
        raise ESMError(f"No hidden states for model(s) {missing}.", fix="run the estimation / merge first.")
    return Points(np.concatenate(rows), names, np.concatenate(samples), np.concatenate(tokens))


def _positions(sample_of_row: np.ndarray) -> np.ndarray:
    pos = np.zeros(len(sample_of_row), dtype=np.int64)
    last, c = None, 0
    for j, s in enumerate(sample_of_row):
        c = c + 1 if s == last else 0
        pos[j] = c
        last = s
    return pos


def pca_2d(X: np.ndarray) -> np.ndarray:
    Xc = X - X.mean(0, keepdims=True)
    U, S, Vt = np.linalg.svd(Xc.astype(np.float64), full_matrices=False)
    out = Xc @ Vt[:2].T
    # fix the sign so the map does not flip between runs
    signs = np.sign(Vt[:2, np.argmax(np.abs(Vt[:2]), axis=1)].diagonal())
    return (out * np.where(signs == 0, 1, signs)).astype(np.float32)


def project_2d(X: np.ndarray, method: str = "pca", seed: int = 42, n_neighbors: int = 15,
               min_dist: float = 0.1) -> np.ndarray:
    if X.shape[0] < 3:
        raise ESMError(f"Only {X.shape[0]} points to map.", fix="select more samples or models.")
    if method == "pca":
        return pca_2d(X)
    if method == "umap":
        import umap

        nn = int(min(n_neighbors, X.shape[0] - 1))
        red = umap.UMAP(n_components=2, n_neighbors=nn, min_dist=min_dist, random_state=seed, n_jobs=1)
        return red.fit_transform(X).astype(np.float32)
    raise ESMError(f"Unknown projection {method!r}.", fix="use 'pca' or 'umap'.")
