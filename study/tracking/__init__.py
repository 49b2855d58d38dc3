"""MLflow records: one parent run per study, one nested run per trial.

All writes happen in the Tune driver (a :class:`MlflowTrialLogger` callback), never in the
trials: a SQLite store with several writers fails with "database is locked", and a single writer
also makes resume idempotent — a trial's run is looked up by its Ray trial id before one is
created, and its parameters are logged only once.

A tracking server may go away mid-study. Trials never wait for it and never lose results:
everything a run needs is already on disk in Ray Tune's trial folders (``params.json``, one
``result.json`` line per report, the final checkpoint with ``model.pt``). When a logging call
fails, the callback stops calling the server for a while, marks the trial and, once the server
answers again (or at the end of the study, after a grace period), *replays* the trial from those
files. Replay is idempotent — the run is found by its trial-id tag, parameters are logged only
when absent, metrics carry Ray's own timestamps so an identical metric is stored once — and a run
is set terminated only after everything else of it is logged, so "terminated in MLflow" means
"complete". If the server is still away at the end, the study fails loudly with the number of
unlogged runs and the command that logs them later (:func:`sync_study`).
"""

from __future__ import annotations

from study.mlflow_conventions import default_tracking_uri  # noqa: F401  (public here too)
from study.tracking.callback import (  # noqa: F401
    MlflowTrialLogger,
)
from study.tracking.replay import (  # noqa: F401
    _Runs,
    replay_trial,
)
from study.tracking.store import (  # noqa: F401
    PARENT_ARTIFACTS,
    PARENT_TAG,
    STUDY_TAG,
    TERMINAL_MLFLOW,
    TRIAL_ID_TAG,
    MlflowUnsynced,
    _client,
    check_reachable,
    ensure_experiment,
    flat_params,
    grace_seconds,
    is_server,
    open_store,
    remove_created,
    retry_seconds,
    server_answers,
)
from study.tracking.study_run import (  # noqa: F401
    StudyRun,
    unsynced_message,
)
from study.tracking.sync import (  # noqa: F401
    SyncReport,
    sync_study,
)
from study.tracking.trial_files import (  # noqa: F401
    TrialFiles,
    result_metrics,
    trial_files_from_dir,
    trial_files_from_trial,
)
