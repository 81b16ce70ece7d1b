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

from ui import links, session_io, state  # noqa: E402
from ui.widgets import guard  # noqa: E402

# URL paths differ from the file names on purpose: until st.navigation has run once in a server
# process, Streamlit maps a URL equal to a file name in pages/ straight to that file (the older
# multipage convention), which would skip this script and its sidebar on a deep link.
PAGES = [
    st.Page("pages/overview.py", title="Overview", icon=":material/home:", default=True),
    st.Page("pages/specialists.py", title="Specialists", icon=":material/extension:", url_path="models"),
    st.Page("pages/probe.py", title="Probe", icon=":material/science:", url_path="probes"),
    st.Page("pages/layer_signals.py", title="Layer signals", icon=":material/show_chart:", url_path="layers"),
    st.Page("pages/element_signals.py", title="Element signals", icon=":material/grid_on:", url_path="elements"),
    st.Page("pages/embeddings.py", title="Embeddings", icon=":material/scatter_plot:", url_path="maps"),
    st.Page("pages/merge.py", title="Merge", icon=":material/merge:", url_path="merging"),
    st.Page("pages/query.py", title="Query", icon=":material/chat:", url_path="ask"),
    st.Page("pages/compare.py", title="Compare", icon=":material/leaderboard:", url_path="table"),
    st.Page("pages/explain.py", title="Explain", icon=":material/school:", url_path="trace"),
    st.Page("pages/learn.py", title="Learn in 10 steps", icon=":material/menu_book:", url_path="lesson"),
]


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
nav = st.navigation(PAGES)
nav.run()
sidebar()  # after the page, so it shows what the page just computed
with guard():
    links.publish()  # the address bar follows the view
