"""embeddings page (work in progress)."""
import streamlit as st

st.title("embeddings")
st.info("Coming next.")
