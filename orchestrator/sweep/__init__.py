"""Sweeps: a config's `sweep:` section run as many training runs on Ray Tune, logged to MLflow
under one parent run. Read in this order:

    schema.py    the section's fields (`SweepConfig`) and their validation
    names.py     run names from a trial's values; values and resources as printed
    grid.py      the grid's axes and the random draws from the space
    plan.py      `plan_sweep`: every trial's config built and checked (`SweepPlan`, `Trial`)
    describe.py  the --dry-run text
    tune.py      `run_sweep`: the lock, the Tuner, the ENS evaluations, the parent run's end
    trial.py     one trial in its own process (`train_trial`, the Tune trainable)
    state.py     sweep.json and the MLflow parent run
    outcome.py   the trials as MLflow has them, the results table, the best trial's model
"""
