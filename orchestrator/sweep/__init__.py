"""Sweeps: `schema` reads and expands a config's `sweep:` section into a plan of trials, `tune`
runs the plan with Ray Tune and logs every trial to MLflow under one parent run."""
