"""Evaluations of finished runs, each a new MLflow run: LAP around a MAP adapter (`laplace`), the
deep ensemble of tracked member runs (`ensemble`); `runs` holds what both read and write."""
