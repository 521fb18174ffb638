"""From a config to tracked results on a cluster: Ray Train + DeepSpeed training runs, Ray Tune
sweeps, MLflow tracking. The rooms, bottom to top (each imports only from itself and below):
errors, redaction / state_files, config, tracking, train, posthoc, report, sweep. orchestrator/README.md
says what each holds and how one trial flows through them."""
