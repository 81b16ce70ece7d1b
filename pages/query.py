"""query page (work in progress)."""
import streamlit as st

st.title("query")
st.info("Coming next.")
