"""merge page (work in progress)."""
import streamlit as st

st.title("merge")
st.info("Coming next.")
