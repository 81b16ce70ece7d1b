"""explain page (work in progress)."""
import streamlit as st

st.title("explain")
st.info("Coming next.")
