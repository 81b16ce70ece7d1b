"""Few-shot example selection, exactly as the paper's evaluation protocol (docs/METHOD.md section 7).

Every selector takes a training pool once (fingerprints, protein vectors and gene sets are computed
once) and then answers queries; it returns :class:`Chosen` examples that carry the row index in the
pool, the similarity used to rank them and why they were chosen, so the app can show them.

- Molecule-protein (:class:`MoleculeProteinSelector`): training pairs whose protein sequence equals
  the query's, top-k by Tanimoto similarity of Morgan fingerprints (radius 2, 2048 bits, RDKit
  ``BulkTanimotoSimilarity``) to the query molecule. If fewer than k, fill from the other proteins
  in order of their similarity to the query protein, taking from each protein the one pair whose
  molecule is most similar to the query molecule. Protein similarity is the cosine of ESM2 (or any)
  embeddings when the caller passes an embedding function (:class:`EmbeddingProteinSimilarity`),
  else the documented fallback :class:`KmerProteinSimilarity`: cosine of 3-mer count vectors
  (amino acids outside the 20 standard ones count as X), which ranks near-identical sequences and
  homologues first without any model.
- Molecule-cell (:class:`MoleculeCellSelector`; GDSC2 with one drug, DrugComb with two): a cell is
  its top-50 expressed gene symbols. Training rows whose cell has the identical top-50 gene set (as
  a set) come first, top-k by Tanimoto; then the other cells by Jaccard similarity of the gene sets,
  from each cell the row whose molecule is most similar. For drug pairs the molecule similarity is
  the mean Tanimoto over the two drugs, with the drugs aligned in whichever order scores higher
  (a pair is unordered): max(T(q1,a)+T(q2,b), T(q1,b)+T(q2,a)) / 2.
- CYP (:class:`MoleculeSelector`): fixed target, the top-k training molecules by Tanimoto.

Deterministic tie-breaking (the same pool and query always give the same examples):
rows with equal molecule similarity are taken in pool order (lower row index first); filling
proteins / cells with equal protein similarity / Jaccard are ordered by the Tanimoto of their best
row (higher first), then by the pool order of that best row. Rows listed in ``exclude`` (e.g. the
query itself when it comes from the pool) are never chosen.

    sel = MoleculeProteinSelector(train_smiles, train_proteins)
    for c in sel.select("CCO", "MKT...", k=5):
        print(c.index, c.score, c.reason)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from esm_core.chem import MORGAN_BITS, MORGAN_RADIUS, fingerprint, tanimoto_many
from esm_core.errors import ESMError


@dataclass
class Chosen:
    """One selected in-context example: its pool row, rank score, and why it was chosen."""

    index: int  # row index in the training pool
    score: float  # molecule similarity used to rank it (Tanimoto, or mean Tanimoto for drug pairs)
    reason: str  # "same protein", "similar protein", "same cell", "similar cell", "similar molecule"
    detail: dict = field(default_factory=dict)  # e.g. {"tanimoto": .., "protein_similarity": .., "jaccard": ..}

    def describe(self) -> str:
        extra = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in self.detail.items())
        return f"{self.reason} ({extra})" if extra else self.reason


# ------------------------------------------------------------------------------------ molecules
def tanimoto(query: str, smiles: Sequence[str]) -> np.ndarray:
    """Tanimoto similarity of one SMILES to each of a list (Morgan, radius 2, 2048 bits)."""
    idx = MoleculeIndex(smiles)
    return idx.similarity(query)[idx.ids(list(smiles))]


class MoleculeIndex:
    """Fingerprints of the distinct SMILES of a pool; similarity of a query to every distinct one."""

    def __init__(self, smiles: Iterable[str], radius: int = MORGAN_RADIUS, n_bits: int = MORGAN_BITS):
        self.radius, self.n_bits = radius, n_bits
        self.pos: dict[str, int] = {}
        self.unique: list[str] = []
        for s in smiles:
            if s not in self.pos:
                self.pos[s] = len(self.unique)
                self.unique.append(s)
        self.fps = [fingerprint(s, radius, n_bits) for s in self.unique]
        self._cache: dict[str, np.ndarray] = {}

    def ids(self, smiles: Sequence[str]) -> np.ndarray:
        return np.fromiter((self.pos[s] for s in smiles), dtype=np.int64, count=len(smiles))

    def similarity(self, query: str) -> np.ndarray:
        """[n_unique] Tanimoto of the query to each distinct pool molecule (cached per query)."""
        got = self._cache.get(query)
        if got is None:
            got = tanimoto_many(fingerprint(query, self.radius, self.n_bits), self.fps)
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[query] = got
        return got


def _order(score: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """rows sorted by score descending, ties by row index ascending."""
    return rows[np.lexsort((rows, -score))]


def _excluded_mask(n: int, exclude: Iterable[int] | None) -> np.ndarray:
    keep = np.ones(n, dtype=bool)
    if exclude:
        ex = np.fromiter((int(i) for i in exclude), dtype=np.int64)
        ex = ex[(ex >= 0) & (ex < n)]
        keep[ex] = False
    return keep


class MoleculeSelector:
    """CYP protocol: fixed target, top-k training molecules by Tanimoto to the query molecule."""

    def __init__(self, smiles: Sequence[str]):
        self.n = len(smiles)
        self.mols = MoleculeIndex(smiles)
        self.mol_id = self.mols.ids(smiles)

    def select(self, query_smiles: str, k: int = 5, exclude: Iterable[int] | None = None) -> list[Chosen]:
        t = self.mols.similarity(query_smiles)[self.mol_id]
        rows = np.flatnonzero(_excluded_mask(self.n, exclude))
        top = _order(t[rows], rows)[:k]
        return [Chosen(int(i), float(t[i]), "similar molecule", {"tanimoto": float(t[i])}) for i in top]


# ------------------------------------------------------------------------------------ proteins
_AA20 = "ACDEFGHIKLMNPQRSTVWY"
_AA_IDX = np.full(256, 20, dtype=np.int64)  # anything else -> X (index 20)
for _i, _c in enumerate(_AA20):
    _AA_IDX[ord(_c)] = _i


class KmerProteinSimilarity:
    """Fallback protein similarity: cosine of k-mer (default 3-mer) count vectors over 21 letters.

    Used when no protein language model is available. Identical sequences score 1; close homologues
    share most of their 3-mers and score high; unrelated sequences score near the background level.
    """

    name = "3-mer cosine"

    def __init__(self, k: int = 3):
        self.k = int(k)
        self.dim = 21 ** self.k

    def vectors(self, seqs: Sequence[str]):
        """[n, 21^k] L2-normalised sparse count matrix (scipy CSR)."""
        from scipy import sparse  # lazy: scipy is slow to import

        rows, cols = [], []
        for r, s in enumerate(seqs):
            codes = _AA_IDX[np.frombuffer(s.upper().encode("ascii", "replace"), dtype=np.uint8)]
            if len(codes) < self.k:
                continue
            kmers = np.zeros(len(codes) - self.k + 1, dtype=np.int64)
            for j in range(self.k):
                kmers = kmers * 21 + codes[j:len(codes) - self.k + 1 + j]
            rows.append(np.full(len(kmers), r, dtype=np.int64))
            cols.append(kmers)
        if rows:
            r_, c_ = np.concatenate(rows), np.concatenate(cols)
        else:
            r_, c_ = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        m = sparse.csr_matrix((np.ones(len(r_)), (r_, c_)), shape=(len(seqs), self.dim))
        m.sum_duplicates()
        norm = np.sqrt(np.asarray(m.multiply(m).sum(1)).ravel())
        norm[norm == 0] = 1.0
        return sparse.diags(1.0 / norm) @ m

    def fit(self, pool: Sequence[str]) -> "KmerProteinSimilarity":
        self._pool = self.vectors(pool).tocsr()
        return self

    def similarity(self, query: str) -> np.ndarray:
        q = self.vectors([query])
        return np.asarray((self._pool @ q.T).todense()).ravel()


class EmbeddingProteinSimilarity:
    """Protein similarity as the cosine of embeddings from a user-supplied function (paper: ESM2).

    ``embed`` maps a list of sequences to an array [n, d] (e.g. mean-pooled ESM2 last-layer states).
    """

    def __init__(self, embed: Callable[[list[str]], "np.ndarray"], name: str = "embedding cosine"):
        self.embed = embed
        self.name = name

    @staticmethod
    def _unit(x) -> np.ndarray:
        x = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float64)
        if x.ndim != 2:
            raise ESMError(f"The protein embedding function returned shape {x.shape}; expected [n, d].")
        n = np.linalg.norm(x, axis=1, keepdims=True)
        n[n == 0] = 1.0
        return x / n

    def fit(self, pool: Sequence[str]) -> "EmbeddingProteinSimilarity":
        self._pool = self._unit(self.embed(list(pool)))
        if self._pool.shape[0] != len(pool):
            raise ESMError("The protein embedding function returned a different number of rows than sequences.")
        return self

    def similarity(self, query: str) -> np.ndarray:
        return self._pool @ self._unit(self.embed([query]))[0]


def _group_rows(keys: Sequence) -> tuple[list, np.ndarray]:
    """Distinct keys in first-appearance order and the group id of every row."""
    pos: dict = {}
    gid = np.empty(len(keys), dtype=np.int64)
    for i, key in enumerate(keys):
        g = pos.get(key)
        if g is None:
            g = pos[key] = len(pos)
        gid[i] = g
    return list(pos), gid


def _best_per_group(score: np.ndarray, rows: np.ndarray, gid: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """For each group: the row with the highest score (ties: lowest row). Returns (best_row, best_score);
    best_row is -1 for groups without any allowed row."""
    order = _order(score[rows], rows)  # best first
    best_row = np.full(n_groups, -1, dtype=np.int64)
    g = gid[order]
    # first occurrence of each group in the best-first order
    _, first = np.unique(g, return_index=True)
    best_row[g[first]] = order[first]
    best_score = np.where(best_row >= 0, score[np.maximum(best_row, 0)], -np.inf)
    return best_row, best_score


def _fill_order(group_sim: np.ndarray, best_row: np.ndarray, best_score: np.ndarray,
                skip_groups: np.ndarray) -> np.ndarray:
    """Groups to fill from: similarity desc, then best row's molecule similarity desc, then pool order."""
    cand = np.flatnonzero((best_row >= 0) & ~skip_groups)
    return cand[np.lexsort((best_row[cand], -best_score[cand], -group_sim[cand]))]


class MoleculeProteinSelector:
    """Molecule-protein protocol (BindingDB, BioSNAP, Human); see the module docstring."""

    def __init__(self, smiles: Sequence[str], proteins: Sequence[str], protein_similarity=None):
        if len(smiles) != len(proteins):
            raise ValueError("smiles and proteins differ in length")
        self.n = len(smiles)
        self.mols = MoleculeIndex(smiles)
        self.mol_id = self.mols.ids(smiles)
        self.proteins, self.prot_id = _group_rows([p.upper() for p in proteins])
        self._ppos = {p: i for i, p in enumerate(self.proteins)}
        self.protein_similarity = (protein_similarity or KmerProteinSimilarity()).fit(self.proteins)
        self._prot_cache: dict[str, np.ndarray] = {}

    def protein_scores(self, query_protein: str) -> np.ndarray:
        q = query_protein.upper()
        got = self._prot_cache.get(q)
        if got is None:
            got = np.asarray(self.protein_similarity.similarity(q), dtype=np.float64)
            if len(self._prot_cache) > 4096:
                self._prot_cache.clear()
            self._prot_cache[q] = got
        return got

    def select(self, query_smiles: str, query_protein: str, k: int = 5,
               exclude: Iterable[int] | None = None) -> list[Chosen]:
        t = self.mols.similarity(query_smiles)[self.mol_id]
        allowed = _excluded_mask(self.n, exclude)
        q = query_protein.upper()
        same_gid = self._ppos.get(q, -1)
        out: list[Chosen] = []
        if same_gid >= 0:
            rows = np.flatnonzero(allowed & (self.prot_id == same_gid))
            for i in _order(t[rows], rows)[:k]:
                out.append(Chosen(int(i), float(t[i]), "same protein", {"tanimoto": float(t[i])}))
        if len(out) >= k:
            return out
        psim = self.protein_scores(q)
        rows = np.flatnonzero(allowed)
        best_row, best_score = _best_per_group(t, rows, self.prot_id, len(self.proteins))
        skip = np.zeros(len(self.proteins), dtype=bool)
        if same_gid >= 0:
            skip[same_gid] = True
        for g in _fill_order(psim, best_row, best_score, skip)[:k - len(out)]:
            i = int(best_row[g])
            out.append(Chosen(i, float(t[i]), "similar protein",
                              {"tanimoto": float(t[i]), "protein_similarity": float(psim[g])}))
        return out


# ------------------------------------------------------------------------------------ cells
def jaccard(a: Iterable[str], b: Iterable[str]) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if (a or b) else 1.0


class MoleculeCellSelector:
    """Molecule-cell protocol (GDSC2 one drug; DrugComb a drug pair); see the module docstring.

    ``drugs``: per row a SMILES or a tuple of SMILES (pairs); ``cells``: per row the ranked gene
    symbols (only the first ``top_n`` count, as a set).
    """

    def __init__(self, drugs: Sequence, cells: Sequence[Sequence[str]], top_n: int = 50):
        from scipy import sparse  # lazy: scipy is slow to import

        if len(drugs) != len(cells):
            raise ValueError("drugs and cells differ in length")
        self.n = len(drugs)
        self.top_n = top_n
        tuples = [(d,) if isinstance(d, str) else tuple(d) for d in drugs]
        widths = {len(d) for d in tuples}
        if len(widths) > 1:
            raise ESMError("Every row must have the same number of drugs (1 or 2).")
        self.width = widths.pop() if widths else 1
        if self.width not in (1, 2):
            raise ESMError(f"Rows have {self.width} drugs; only single drugs and pairs are supported.")
        self.mols = MoleculeIndex(itertools.chain.from_iterable(tuples))
        self.drug_ids = np.array([[self.mols.pos[s] for s in d] for d in tuples], dtype=np.int64).reshape(self.n, self.width)
        sets = [frozenset(list(c)[:top_n]) for c in cells]
        self.cell_sets, self.cell_id = _group_rows(sets)
        self.genes = {g: i for i, g in enumerate(sorted(set().union(*self.cell_sets)) if self.cell_sets else [])}
        r, c = [], []
        for i, s in enumerate(self.cell_sets):
            for g in s:
                r.append(i)
                c.append(self.genes[g])
        self._m = sparse.csr_matrix((np.ones(len(r)), (r, c)), shape=(len(self.cell_sets), max(1, len(self.genes))))
        self._size = np.array([len(s) for s in self.cell_sets], dtype=np.float64)
        self._set_pos = {s: i for i, s in enumerate(self.cell_sets)}

    def drug_scores(self, query_drugs) -> np.ndarray:
        q = (query_drugs,) if isinstance(query_drugs, str) else tuple(query_drugs)
        if len(q) != self.width:
            raise ESMError(f"The query has {len(q)} drug(s); this pool has {self.width} per row.")
        if self.width == 1:
            return self.mols.similarity(q[0])[self.drug_ids[:, 0]]
        t1, t2 = self.mols.similarity(q[0]), self.mols.similarity(q[1])
        a, b = self.drug_ids[:, 0], self.drug_ids[:, 1]
        return np.maximum(t1[a] + t2[b], t1[b] + t2[a]) / 2.0

    def jaccard_scores(self, query_genes: Sequence[str]) -> np.ndarray:
        q = set(list(query_genes)[:self.top_n])
        v = np.zeros(self._m.shape[1])
        hit = [self.genes[g] for g in q if g in self.genes]
        v[hit] = 1.0
        inter = self._m @ v
        union = self._size + len(q) - inter
        return np.where(union > 0, inter / np.maximum(union, 1e-12), 1.0)

    def select(self, query_drugs, query_genes: Sequence[str], k: int = 5,
               exclude: Iterable[int] | None = None) -> list[Chosen]:
        t = self.drug_scores(query_drugs)
        allowed = _excluded_mask(self.n, exclude)
        qset = frozenset(list(query_genes)[:self.top_n])
        same = self._set_pos.get(qset, -1)
        key = "tanimoto" if self.width == 1 else "mean_tanimoto"
        out: list[Chosen] = []
        if same >= 0:
            rows = np.flatnonzero(allowed & (self.cell_id == same))
            for i in _order(t[rows], rows)[:k]:
                out.append(Chosen(int(i), float(t[i]), "same cell", {key: float(t[i]), "jaccard": 1.0}))
        if len(out) >= k:
            return out
        jac = self.jaccard_scores(list(query_genes))
        best_row, best_score = _best_per_group(t, np.flatnonzero(allowed), self.cell_id, len(self.cell_sets))
        skip = np.zeros(len(self.cell_sets), dtype=bool)
        if same >= 0:
            skip[same] = True
        for g in _fill_order(jac, best_row, best_score, skip)[:k - len(out)]:
            i = int(best_row[g])
            out.append(Chosen(i, float(t[i]), "similar cell", {key: float(t[i]), "jaccard": float(jac[g])}))
        return out
