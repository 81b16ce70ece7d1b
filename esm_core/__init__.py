"""esm_core: the ES-Merging engine (Lee, Kim, Hwang 2026), importable without Streamlit.

Data flows one way (DESIGN.md): specialists + probe samples -> hidden states -> signals (SWD
curves, gradient scores) -> coefficients -> merged adapter -> answers and scores. Each arrow is one
function returning a plain object; the app caches and plots them, the CLI saves them.

    python -m esm_core coefficients --config run.yaml --out runs/coef
    python -m esm_core merge --config run.yaml --out runs/merged
"""

import os as _os

# Never reach a model hub at run time: everything is read from local directories.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from .errors import Cancelled, ESMError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ESMError", "Cancelled", "__version__"]
