"""The names this project gives things in MLflow, one owner for each: run tags, their values, and
the artifact paths that one part writes and another reads.

A tag written by one part and read by another (the sweep writes a trial's role, the report reads
it) is named here, so the two cannot drift apart. MLflow's own tags that this project sets or
reads by hand (`mlflow.parentRunId`, `mlflow.experimentKind`) are here too; those that
`mlflow.utils.mlflow_tags` names (the source tags) are used from there.
"""

# ----- every run (orchestrator.train.trainer.run_tags) -------------------------------------------
METHOD_TAG = "method"  # adapter.method: 'lora', 'melora', 'lap', 'ens', ...
TASK_TAG = "task"  # task.name
SEED_TAG = "seed"  # the run's seed, as text
SWEEP_TAG = "sweep"  # the sweep's name, on its parent run and on each of its trials
FAILURE_REASON_TAG = "failure_reason"  # why a run ended FAILED or KILLED
START_TAG = "melora.start_id"  # finds a run made by a start that died before recording its id
MODEL_ERROR_TAG = "melora.model_error"  # on a FINISHED run whose model could not be logged
RESOLVED_CONFIG = "config/resolved.yaml"  # the artifact holding a run's resolved config

# ----- MLflow's own, set or read by hand ------------------------------------------------------------
PARENT_RUN_TAG = "mlflow.parentRunId"  # a sweep trial's (or post-hoc run's) parent run
# MLflow 3's experiment type, read by its UI to choose the page an experiment opens on. 3.17 has no
# Python constant for it; its UI's ExperimentKind enum has FINETUNING = "finetuning".
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
FINETUNING = "finetuning"

# ----- a sweep's trials (orchestrator.sweep.plan) -----------------------------------------------------
# A sweep trial's role (`sweep.role` tag; orchestrator.sweep.plan.Trial.role)
ROLE_TAG = "sweep.role"
TRAINED, ENS_MEMBER, ENSEMBLE = "trained", "ens_member", "ensemble"
SWEEP_AXIS_PREFIX = "sweep."  # `sweep.<axis>`: the named choice of a grid axis that a trial took

# ----- a sweep's parent run (orchestrator.sweep.state, orchestrator.sweep.outcome) ---------------
KIND_TAG = "kind"
SWEEP_KIND = "sweep"  # KIND_TAG's value on a sweep's parent run
CONFIG_HASH_TAG = "config_hash"  # the sweep config's hash (sweep.json has the same)
TRIALS_TOTAL_TAG = "trials_total"
TRIALS_FINISHED_TAG = "trials_finished"
TRIALS_FAILED_TAG = "trials_failed"
TRIALS_STOPPED_TAG = "trials_stopped"
BEST_TRIAL_TAG = "best_trial"  # the best trial's run name
BEST_RUN_ID_TAG = "best_run_id"  # the best trial's MLflow run id
BEST_VALUE_PREFIX = "best."  # `best.<key>`: a value the best trial set
BEST_MODEL_TAG = "best_model"  # 'models:/<sweep>/<version>' (orchestrator.tracking.model)
REGISTRY_ERROR_TAG = "registry_error"  # why the best model could not be registered
# the registered model version's tags (orchestrator.tracking.model.register_best)
SWEEP_RUN_TAG = "melora.sweep_run_id"
SWEEP_METRIC_TAG = "melora.sweep_metric"
SWEEP_VALUE_TAG = "melora.sweep_metric_value"
SWEEP_TRIAL_TAG = "melora.sweep_trial"

# ----- evaluations of finished runs (orchestrator.posthoc) ----------------------------------------
MEMBERS_TAG = "ensemble_members"  # an ENS run's member run ids, comma-separated
MAP_RUN_TAG = "map_run"  # a post-hoc LAP run's MAP (LoRA) run id
