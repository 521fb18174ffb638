"""The names this project gives things in MLflow, one owner for each: run tags and their values.

A tag written by one part and read by another (the sweep writes a trial's role, the report reads
it) is named here, so the two cannot drift apart.
"""

# A sweep trial's role (`sweep.role` tag; orchestrator.sweep.schema.Trial.role)
ROLE_TAG = "sweep.role"
TRAINED, ENS_MEMBER, ENSEMBLE = "trained", "ens_member", "ensemble"
