"""probe page (work in progress)."""
import streamlit as st

st.title("probe")
st.info("Coming next.")
