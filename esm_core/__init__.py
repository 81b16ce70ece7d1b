"""esm_core: the ES-Merging engine (Lee, Kim, Hwang 2026), importable without Streamlit.

Data flows one way (docs/ARCHITECTURE.md): specialists + probe samples -> hidden states -> signals
(SWD curves, gradient scores) -> coefficients -> merged adapter -> answers and scores. Each arrow is
one function returning a plain object; the app caches and plots them, the CLI saves them. The
folders follow that path: models/adapters/encoders -> probes -> states -> signals/ -> coefficients
-> pipeline -> merging/ -> answering/ -> benchmark/, analysis/ -> zoo/ -> cli/.

    python -m esm_core coefficients --config run.yaml --out runs/coef
    python -m esm_core merge --config run.yaml --out runs/merged

Importing esm_core changes nothing in the process; loading a model makes the Hugging Face
libraries offline (esm_core/models.py): nothing is ever downloaded.
"""

from esm_core.errors import Cancelled, ESMError

__version__ = "0.1.0"
__all__ = ["ESMError", "Cancelled", "__version__"]
