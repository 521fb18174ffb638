"""The paper's tables rebuilt from tracked runs (`jobs/report.py`): `build` (build_report,
write_report) reads MLflow through `runs`, assigns rows (`rows`), lays out (`layout`, `tables`,
`cells`), renders (`render`) and draws (`figures`); `paper_tables` holds the paper's own numbers
to compare with."""
