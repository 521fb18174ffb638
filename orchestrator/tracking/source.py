"""Where a run comes from, as MLflow's source tags (`mlflow.source.name`, `.type`, `.git.commit`,
`.git.dirty`), which `mlflow.start_run` sets by itself and `MlflowClient.create_run` does not."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mlflow.entities import SourceType
from mlflow.utils.mlflow_tags import (
    MLFLOW_GIT_COMMIT,
    MLFLOW_GIT_DIRTY,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
)

REPO = Path(__file__).resolve().parents[2]  # this project's checkout
# Set by Ray's job supervisor in the environment of a `ray job submit` entrypoint (Ray 2.60,
# ray._private.runtime_env.constants): the run's source is then a JOB, else LOCAL.
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def source_tags(script: str | os.PathLike | None = None) -> dict[str, str]:
    """MLflow's own source tags for a run started by `script` (default: this process's script):
    what `mlflow.start_run` sets by itself and `MlflowClient.create_run` does not.

    - `mlflow.source.name`: the script, relative to this checkout when inside it
      (`entry_point`): 'jobs/train.py', 'jobs/sweep.py'
    - `mlflow.source.type`: MLflow's SourceType name, JOB under `ray job submit`, else LOCAL
    - `mlflow.source.git.commit` (the 40-hex commit) and `mlflow.source.git.dirty` ('true' when
      tracked files differ from it), both left out without git or outside a repository (a
      `ray job submit` working folder: Ray does not upload .git)

    Read them in the process the person started (the job's driver) and pass them to runs made
    in Ray workers, whose own script is Ray's.
    """
    kind = SourceType.JOB if RAY_JOB_ENV in os.environ else SourceType.LOCAL
    tags = {MLFLOW_SOURCE_NAME: entry_point(script), MLFLOW_SOURCE_TYPE: SourceType.to_string(kind)}
    commit = git_commit()
    if commit is not None:
        tags[MLFLOW_GIT_COMMIT], dirty = commit
        tags[MLFLOW_GIT_DIRTY] = "true" if dirty else "false"
    return tags


def entry_point(script: str | os.PathLike | None = None) -> str:
    """`script` (default `sys.argv[0]`, the script this process runs) as MLflow's source name: a
    path relative to this checkout when it lies inside it ('jobs/sweep.py', from any working
    folder), else as given; '<console>' when there is none (MLflow's word for it)."""
    script = sys.argv[0] if script is None and sys.argv else script
    if not script or script == "-c":
        return "<console>"
    try:
        return Path(script).resolve().relative_to(REPO).as_posix()
    except (ValueError, OSError):
        return str(script)


def git_commit(repo_dir: str | os.PathLike | None = None) -> tuple[str, bool] | None:
    """(commit, dirty) of the git repository at `repo_dir` (this checkout by default): the HEAD
    commit and whether tracked files differ from it; None without git, outside a repository or
    before its first commit."""
    repo = str(repo_dir if repo_dir is not None else REPO)

    def git(*args: str) -> str:
        return subprocess.run(  # no optional locks: `status` leaves the index as it is
            ["git", "--no-optional-locks", "-C", repo, *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()

    try:
        sha = git("rev-parse", "--verify", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha, dirty) if sha else None
