"""The app's pages and how a deep link reaches them through app.py.

Every page's URL path is its file name in ``pages/`` (``/learn``, ``/element_signals``; the Overview is
``/``). On a server process's first script run Streamlit still routes by the ``pages/`` folder (its older
multipage convention, until st.navigation has run once): a deep link such as ``/learn?lesson_step=4``
then runs ``pages/learn.py`` directly, without app.py, its sidebar and its link restore. Each page
therefore starts with :func:`through_app`: in that first run it runs app.py in its place, which
registers the app's navigation and runs the same page inside the app (a page's identity is its URL path, the
same in both conventions). With URL paths that differ from the file names, the first run found no
page, showed "Page not found" and only then reached the page.
"""

from __future__ import annotations

import streamlit as st

from ui.roots import ROOT

# (file in pages/, title, icon); the first is the default page
PAGE_FILES = [
    ("overview", "Overview", ":material/home:"),
    ("specialists", "Specialists", ":material/extension:"),
    ("probe", "Probe", ":material/science:"),
    ("layer_signals", "Layer signals", ":material/show_chart:"),
    ("element_signals", "Element signals", ":material/grid_on:"),
    ("embeddings", "Embeddings", ":material/scatter_plot:"),
    ("merge", "Merge", ":material/merge:"),
    ("query", "Query", ":material/chat:"),
    ("compare", "Compare", ":material/leaderboard:"),
    ("explain", "Explain", ":material/school:"),
    ("learn", "Learn in 10 steps", ":material/menu_book:"),
]


def pages() -> list:
    """The st.Page objects of the app, URL path = file name (the Overview is the default page, ``/``)."""
    return [st.Page(f"pages/{name}.py", title=title, icon=icon, default=i == 0)
            for i, (name, title, icon) in enumerate(PAGE_FILES)]


def _folder_routing() -> bool:
    """True while Streamlit still routes this server process by the pages/ folder (no st.navigation yet)."""
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # a Streamlit without the folder convention
        return False
    return bool(getattr(PagesManager, "uses_pages_directory", False))


def through_app() -> None:
    """First call of every page script. A page run directly by the folder convention (a deep link into a
    server process no session has used yet; every run of Streamlit's AppTest, which resets the
    convention flag per run) runs app.py in its place, within this same script run, and stops: app.py
    registers the navigation (the process leaves the folder convention), resolves this same page (its
    URL path is its identity in both conventions) and runs it inside the app's frame. Done in the same
    run rather than by a rerun, so a button press carried by this run is not lost."""
    if not _folder_routing():
        return
    app_path = ROOT / "app.py"
    code = compile(app_path.read_text(encoding="utf-8"), str(app_path), "exec")
    exec(code, {"__name__": "__main__", "__file__": str(app_path)})  # noqa: S102 (the app's own entry script)
    st.stop()
