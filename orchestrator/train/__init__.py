"""One training run. On the driver: `trainer.fit_run` (checks from `preflight`, the run's marker
and lock from `run_marker`) sets up Ray Train's TorchTrainer around `worker.train_loop_per_worker`,
which fine-tunes under DeepSpeed ZeRO on every worker: `model` (device, base model, tokenizer),
`data` (the task's loaders), `objective` (one optimiser step of the paper's objective),
`dist_eval` (evaluation sharded over the ranks), `laplace` (LAP's last step), `checkpoint`,
`logger` (rank 0's MLflow logging), `deepspeed_config` and `collectives`."""
