"""tbsac operator console (Streamlit). Start with `tbsac console`."""

import os
from pathlib import Path

import streamlit as st

st.set_page_config(page_title="tbsac console", layout="wide")
# Streamlit's own "Stop" (it stops drawing this page, not a session) and its running
# indicator would sit beside the console's red Stop: an operator must find only one.
st.markdown("<style>[data-testid='stStatusWidget'] {display: none;}</style>", unsafe_allow_html=True)

here = Path(__file__).parent
with st.sidebar:
    st.markdown("### tbsac console")
    st.text_input("Control server", value=os.environ.get("TBSAC_SERVER_URL", "http://127.0.0.1:8765"), key="server_url")
    st.text_input("Operator", value=os.environ.get("USER", "operator"), key="operator")
    st.text_input("Operator token", value=os.environ.get("TBSAC_OPERATOR_TOKEN", ""), type="password", key="token",
                  help="Needed to start, approve, abort and restore; reading needs none.")

pages = st.navigation([
    st.Page(str(here / "run.py"), title="Run", url_path="run", default=True),
    st.Page(str(here / "history.py"), title="History and replay", url_path="history"),
    st.Page(str(here / "training.py"), title="Training", url_path="training"),
])
pages.run()
