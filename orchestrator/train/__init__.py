"""One training run: `trainer.fit_run` sets up Ray Train's TorchTrainer around
`worker.train_loop_per_worker`, which fine-tunes under DeepSpeed ZeRO on every worker."""
