"""ES-Merging workbench: the Streamlit entry point.

    streamlit run app.py

Routes the pages of ``pages/`` with st.navigation; the sidebar shows the current workspace (base,
specialists, device, preset) and saves/loads a whole session. The pages are thin: they call
``esm_core`` through ``ui.state`` and plot what it returns (``ui.figures``).
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

st.set_page_config(page_title="ES-Merging workbench", page_icon=":material/hub:", layout="wide")

from ui import heap, links, routes, session_io, state  # noqa: E402
from ui.widgets import guard  # noqa: E402


def sidebar() -> None:
    with st.sidebar:
        st.markdown("### Workspace")
        with guard():
            sp = state.spec()
            base = Path(sp.base)
            st.caption(f"**base** `{base.parent.name}/{base.name}`")
            st.caption("**specialists** " + ", ".join(f"{s.name} ({s.modality or '–'})" for s in sp.specialists))
            st.caption(f"**device** {state.device_label()}")
            m = state.method()
            st.caption(f"**preset** {m.preset} · **mode** {m.mode}")
            res = state.base_result()
            st.caption("**computed** " + ("yes" if res is not None else "not yet"))
            st.caption("**link** the address bar holds this view (page, selections, changed settings, "
                       "picked probe rows): share it to open the same view")
            for note in links.notes():
                st.caption(f":orange[link: {note}]")
        st.divider()
        session_io.session_panel()


with guard():
    links.restore()  # a link's settings and probe rows, once per session
nav = st.navigation(routes.pages())
nav.run()
sidebar()  # after the page, so it shows what the page just computed
with guard():
    links.publish()  # the address bar follows the view
heap.freeze_long_lived()  # once per process, after its first run (ui/heap.py)
