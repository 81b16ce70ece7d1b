"""specialists page (work in progress)."""
import streamlit as st

st.title("specialists")
st.info("Coming next.")
