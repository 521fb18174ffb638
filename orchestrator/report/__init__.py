"""The paper's tables rebuilt from tracked runs (`jobs/report.py`): `build` queries MLflow and
renders; `paper_tables` holds the paper's own numbers to compare with."""
