"""Run a study: Ray Tune schedules, Optuna proposes (multi-objective), MLflow records.

Flow: validate the spec and everything outside it (dataset, MLflow, Ray address, GPUs) before
Ray starts → Tuner(OptunaSearch over the conditional space, paper defaults enqueued first) →
each trial runs :func:`study.trial.run_trial` and reports every objective each epoch (with a
resumable checkpoint) → after the search the front's trials are re-evaluated with the strong
attacks and the front is recomputed ("search cheap, verify strong") → artifacts.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from study.config import ConfigError
from study.orchestration.ray_cluster import RayTarget, resolve_address, validate_target
from study.results.records import SEARCH_SPLIT, TrialRecord, flag_verdicts, labelled, reached_values, trial_outcome
from study.spec import StudySpec, trial_config_for

log = logging.getLogger(__name__)

STUDY_FILE = "study.json"
TRIALS_FILE = "trials.json"
TUNE_DIR = "tune"


# --------------------------------------------------------------------------- the trainable


def _trainable(params: dict[str, Any], spec_data: dict[str, Any], tracking_uri: str | None = None,
               trial_fn: Any = None) -> None:
    """Ray Tune function trainable: one trial, reported per epoch and once more at the end.

    ``trial_fn`` stands in for :func:`study.trial.run_trial` (same signature and result): only
    benchmarks pass one (``bench scale``'s synthetic trial), so that everything around the trial
    runs as in a real study.
    """
    started_at = time.time()
    if tracking_uri:
        # The driver's store, not whatever this node's environment says: MLflow code in the
        # worker that falls back on MLflow's default (saving the model asks for it) sees the
        # study's store. Trials never write to it (study.tracking).
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    import torch
    from ray import tune

    from study.data import load_data
    from study.spec import StudySpec
    from study.trial import run_trial

    spec = StudySpec.model_validate(spec_data)
    context = tune.get_context()
    config = trial_config_for(spec, params, name=context.get_trial_name() or "trial")
    if spec.resources.gpu > 0:
        config = config.model_copy(update={"device": "cuda"})
    data = load_data(config.data, seed=config.seed)  # cached per worker process

    resume = None
    resumed_from = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state_file = Path(directory) / "state.pt"
            if state_file.is_file():
                resume = torch.load(state_file, map_location="cpu", weights_only=True)
                resumed_from = int(resume.get("epoch", 0))

    placeholders = {labelled(o, SEARCH_SPLIT): 0.0 for o in spec.objectives}
    # Seconds the trial spent in per-epoch reports: saving the checkpoint and waiting for the
    # driver (a function trainable's report blocks until the driver has processed the result).
    report_seconds = 0.0
    last_epoch: dict[str, float] = {}
    # Training seconds at the last saved checkpoint (the resumed one, or the start).
    checkpointed_at = float(resume.get("seconds", 0.0)) if resume else 0.0

    def on_epoch(report: Any) -> None:
        nonlocal report_seconds, checkpointed_at
        t0 = time.perf_counter()
        metrics = {
            **placeholders,
            # Every report carries every objective (Ray's strict metric check); the searcher
            # only ever tells Optuna the final one.
            "val_clean_accuracy": float(report.metrics.get("val_accuracy", 0.0)),
            "val_robust_accuracy": float(report.metrics.get("val_robust_accuracy", 0.0)),
            "epoch": report.epoch,
            "final": 0,
            "status": "running",
            "trusted": 0,
            **{f"epoch_{k}": float(v) for k, v in report.metrics.items()},
            # So far: a trial the scheduler stops ends on this report, and its record keeps
            # where its time went (the timeline shows the time early stopping spent).
            "started_at": started_at,
            "ended_at": time.time(),
            "trained_seconds": float(report.checkpoint.get("seconds", 0.0)),
        }
        last_epoch.update({k: v for k, v in metrics.items() if k.startswith("epoch_")})
        trained = metrics["trained_seconds"]
        if trained - checkpointed_at < spec.checkpoint_every_seconds:
            tune.report(metrics)  # the scheduler still sees every epoch
        else:
            checkpointed_at = trained
            with tempfile.TemporaryDirectory() as directory:
                torch.save(report.checkpoint, Path(directory) / "state.pt")
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))
        report_seconds += time.perf_counter() - t0

    result = (trial_fn or run_trial)(config, on_epoch=on_epoch, resume=resume, data=data)
    split = result.split  # val: the spec requires a validation split
    final = {
        labelled("clean_accuracy", split): result.clean_accuracy,
        labelled("robust_accuracy", split): result.robust_accuracy,
        "split": split,
        "split_sizes_json": json.dumps(result.split_sizes),
        "train_seconds": result.train_seconds,
        "num_parameters": float(result.num_parameters),
        "eval_seconds": result.eval_seconds,
        "epochs_run": float(result.epochs_run),
        "epoch": result.epochs_run,
        "trusted": int(result.trusted),
        "status": result.status,
        "reason": result.reason or "",
        "final": 1,
        "resumed_from_epoch": resumed_from,
        "started_at": started_at,
        "ended_at": time.time(),
        "report_seconds": report_seconds,
        "flags_json": json.dumps(flag_verdicts(result.flags)),  # in full in the checkpoint's result.json
        **{f"{split}_robust_acc_{a['name']}": float(a["accuracy"]) for a in result.attacks},
        **{k: float(v) for k, v in result.reached.items()},  # e.g. kwta_gamma_reached
        # Threads, determinism and library versions in force in this worker: the export's record.
        "reproducibility_json": json.dumps(result.reproducibility),
        # The last epoch's numbers again: an early-stopping scheduler checks that every result
        # carries its metric (Ray's strict check), the final one included.
        **last_epoch,
    }
    from study.trial import save_trial

    with tempfile.TemporaryDirectory() as directory:
        save_trial(config, result, directory)
        if spec.mlflow.log_models and result.model_state is not None:
            from study.data import eval_tensors
            from study.mlflow_model import save_trial_model

            # An input example from the validation split: the test split is read by verification only.
            example, _ = eval_tensors(data.val if data.val is not None else data.train, 2, seed=config.seed)
            seconds = save_trial_model(directory, example, stochastic=result.stochastic)
            if seconds is not None:
                final["model_seconds"] = seconds
                final["ended_at"] = time.time()  # saving the model is the trial's work (timeline)
        tune.report(final, checkpoint=tune.Checkpoint.from_directory(directory))


# --------------------------------------------------------------------------- Ray


def quiet_library_env() -> None:
    """The libraries' environment switches for banners and chatter (set before Ray starts its
    processes, from the main thread)."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # legacy reporter: silent at verbose=0
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # MLflow 3 prints "View run ... at: URL" on stdout whenever a run ends on a tracking server.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def quiet_libraries() -> None:
    """Progress is our one line per trial; import MLflow and Optuna and silence their loggers."""
    import warnings

    import mlflow  # noqa: F401 - mlflow configures its loggers on import; quieten them after
    import optuna

    for name in ("mlflow", "alembic", "optuna", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # Ray times the define-by-run space around Optuna's sampling, so past ~1,000 trials TPE's own
    # suggestion time (~1 s here, docs/benchmarks.md, Scale) made it warn on every trial, advice
    # ("move computation into the trainable") that does not apply: the space only suggests.
    warnings.filterwarnings("ignore", message="Define-by-run function passed in the `space` argument took",
                            category=UserWarning)


def init_ray(spec: StudySpec, target: RayTarget | None = None) -> None:
    """Start or join Ray for ``spec`` (``target``: see study.orchestration.ray_cluster; default from the spec
    and the environment)."""
    from study.orchestration.ray_cluster import init_ray as _init

    target = target or resolve_address(None, spec.address, os.environ)
    _init(target, num_cpus=max(int(spec.resources.cpu * spec.concurrency), os.cpu_count() or 1))


def check_cluster_resources(spec: StudySpec) -> None:
    import ray

    total = ray.cluster_resources()
    if spec.resources.gpu > 0 and total.get("GPU", 0) < spec.resources.gpu:
        raise ConfigError(
            f"resources.gpu: {spec.resources.gpu} GPU(s) per trial requested but the cluster has "
            f"{total.get('GPU', 0):g}; set resources.gpu: 0 or add GPU nodes"
        )
    if total.get("CPU", 0) < spec.resources.cpu:
        raise ConfigError(
            f"resources.cpu: {spec.resources.cpu} CPUs per trial requested but the cluster has {total.get('CPU', 0):g}"
        )


# --------------------------------------------------------------------------- study


@dataclass
class StudyOutcome:
    study_dir: Path
    records: list[dict[str, Any]]
    front: list[dict[str, Any]]
    final_front: list[dict[str, Any]]
    seconds: float
    parent_run_id: str
    tracking_uri: str


def tracking_uri_for(spec: StudySpec, flag: str | None = None) -> str:
    """The tracking URI a new study of ``spec`` uses (study.mlflow_conventions.resolve_tracking_uri)."""
    from study.mlflow_conventions import resolve_tracking_uri

    return resolve_tracking_uri(flag, spec.mlflow.tracking_uri, os.environ, spec.study_dir().parent)


def preflight(spec: StudySpec, uri: str, target: RayTarget | None = None) -> None:
    """Everything checkable before Ray starts: dataset present, MLflow and Ray reachable."""
    from study.data import load_data
    from study.orchestration.ray_cluster import check_reachable as check_ray
    from study.storage import check_remote
    from study.tracking import check_reachable

    check_remote(spec.storage)
    target = target or resolve_address(None, spec.address, os.environ)
    check_ray(target)
    load_data(spec.data, seed=spec.seed)
    check_reachable(uri)


def _prepare_tracking(uri: str) -> list[Path]:
    from study.tracking import open_store

    quiet_libraries()
    # What the artifacts need at the study's end (matplotlib, the plots and export code: ~0.8 s
    # of the end's 1.8 s before) is imported here too, while Ray still starts; before the store
    # is created, so that a failing import leaves nothing on disk.
    from matplotlib.figure import Figure  # noqa: F401

    import study.results.artifacts  # noqa: F401
    import study.results.plots  # noqa: F401

    return open_store(uri)


def start_ray_and_tracking(spec: StudySpec, uri: str, target: RayTarget | None = None) -> str:
    """Start Ray (and check it has the resources asked for) while, in a thread, the libraries the
    driver needs later are imported and the tracking store gets ready.

    Starting a local Ray instance takes seconds spent mostly waiting for its processes (30-55 %
    of the 2 cores idle here), while importing MLflow and Optuna (1.2-1.5 s, most of it MLflow's
    genai package), creating a new SQLite store (its schema migrations, 2-3 s) and importing
    what the artifacts need are the driver's CPU: side by side they cost about the longer of
    the two (profiled: Ray + store 6.8 s -> 4.8 s; with the imports moved in too, 2-trial
    studies: call to Tuner.fit 7.6 s -> 6.0-6.4 s, artifacts at the end 1.8 s -> 1.0-1.4 s).
    If Ray refuses the study, a store created here is removed again: a refused spec leaves
    nothing behind. Returns the line that says which Ray the study runs on.
    """
    from concurrent.futures import ThreadPoolExecutor

    from study.orchestration.ray_cluster import describe
    from study.tracking import remove_created

    with ThreadPoolExecutor(1, thread_name_prefix="tracking-store") as pool:
        store = pool.submit(_prepare_tracking, uri)
        try:
            target = target or resolve_address(None, spec.address, os.environ)
            init_ray(spec, target)
            check_cluster_resources(spec)
        except BaseException:
            if store.exception() is None:  # waits for the thread
                remove_created(store.result())
            raise
        store.result()
    return describe(target)


def run_study(
    spec: StudySpec, *, resume: bool = False, progress: bool = True, enqueue: list[dict[str, Any]] | None = None,
    address: str | None = None, tracking_uri: str | None = None, trial_fn: Any = None,
) -> StudyOutcome:
    """Run (or resume) a study to completion and write its artifacts.

    ``enqueue`` replaces the paper defaults as the configurations tried first (see make_searcher).
    ``address``: the command line's ``--address``, ahead of the spec's and RAY_ADDRESS.
    ``tracking_uri`` (``--tracking-uri``) comes before the spec's and the environment's; a
    resumed study keeps the store it started with (its runs are there). ``trial_fn``: see
    :func:`_trainable` (benchmarks only).
    """
    from study import storage as store

    start = time.perf_counter()
    target = resolve_address(address, spec.address, os.environ)
    validate_target(target)  # before the seconds of importing Ray Tune
    study_dir = spec.study_dir()
    state_file = study_dir / STUDY_FILE
    tune_path = f"{store.tune_storage_path(spec.storage, study_dir, spec.name)}/{TUNE_DIR}"
    remote = store.is_remote(spec.storage)
    if remote:
        # The URI is the truth: a stale working copy must neither block a new study nor stand in
        # for the remote one on resume.
        if not store.study_exists(spec.storage, spec.name):
            store.clear_local(spec.storage, spec.name)
        elif not resume:
            raise ConfigError(f"study {spec.name!r} already exists in {spec.storage}; use 'robust-study resume "
                              f"{spec.name} --storage {spec.storage}' or choose another name")
        else:
            store.download(spec.storage, spec.name)
    if resume and not state_file.is_file():
        raise ConfigError(f"resume: no study {spec.name!r} under {study_dir.parent} (no {STUDY_FILE})")
    if not resume and state_file.is_file():
        raise ConfigError(
            f"study {spec.name!r} already exists in {study_dir}; use 'robust-study resume {spec.name}' "
            "or choose another name"
        )
    state = json.loads(state_file.read_text()) if resume else {}
    uri = state.get("tracking_uri") or tracking_uri_for(spec, tracking_uri)
    preflight(spec, uri, target)
    from ray import tune

    from study.orchestration.interrupt import InterruptWatch, study_interrupted, unfinished_trials
    from study.orchestration.progress import ProgressLine
    from study.orchestration.searcher import make_searcher
    from study.tracking import MlflowTrialLogger, StudyRun

    quiet_library_env()
    import ray

    owns_ray = not ray.is_initialized()  # started here, so stopped here (study.orchestration.finish)
    ray_line = start_ray_and_tracking(spec, uri, target)
    # Early stopping decides which trials are finished: say which applies (auto decides per study).
    stopping_line = spec.stopping.describe()
    if progress:
        print(f"{ray_line}\n{stopping_line}", file=sys.stderr, flush=True)  # beside the progress lines
    else:
        log.info("%s; %s", ray_line, stopping_line)

    # A remote study's MLflow artifacts go to the URI too (MLflow writes s3:// or gs:// itself).
    artifact_root = f"{spec.storage}/mlartifacts" if remote else spec.study_dir().parent / "mlartifacts"
    study_run = StudyRun(uri, spec.experiment, artifact_root, study_dir=study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    parent_id = study_run.start(
        spec.name,
        state.get("parent_run_id"),
        params={"spec": json.dumps(spec.model_dump(mode="json"))[:6000], "num_trials": spec.num_trials,
                "sampler": spec.sampler.name, "objectives": ",".join(spec.objectives),
                "early_stopping": stopping_line},
        tags={"description": spec.description},
    )
    if not resume:
        _write_json(
            state_file,
            {"spec": spec.model_dump(mode="json"), "parent_run_id": parent_id, "experiment_id": study_run.experiment_id,
             "tracking_uri": uri, "status": "running"},
        )
        (study_dir / "spec.yaml").write_text(_dump_yaml(spec.model_dump(mode="json")))
        _write_json(study_dir / "search_space.json", spec.conditional_space().to_dict())
    if remote:
        store.upload(spec.storage, spec.name)

    trainable = tune.with_resources(
        tune.with_parameters(_trainable, spec_data=spec.model_dump(mode="json"), tracking_uri=uri,
                             trial_fn=trial_fn),
        {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu},
    )
    if resume and tune.Tuner.can_restore(tune_path):
        tuner = tune.Tuner.restore(tune_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        from study.orchestration.tune_state import ForgetFinishedStatistics, trial_loggers

        callbacks = [*trial_loggers(), MlflowTrialLogger(uri, study_run.experiment_id, parent_id, spec.name),
                     InterruptWatch(str(study_dir))]
        if remote:
            from study.orchestration.mirror import StudyMirror

            callbacks.append(StudyMirror(spec.storage, spec.name))
        if progress:
            callbacks.append(ProgressLine(spec.num_trials, spec.directions))
        callbacks.append(ForgetFinishedStatistics())  # last: the callbacks before it read the trial
        from study.orchestration.scheduler import make_scheduler

        scheduler = make_scheduler(spec)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=make_searcher(spec, study_dir, enqueue),
                num_samples=spec.num_trials,
                max_concurrent_trials=spec.concurrency,
                scheduler=scheduler,
                # One worker process runs trial after trial: a fresh actor per trial would pay
                # the torch/torchattacks/Ray imports (seconds) every time, and load_data's cache
                # keeps the dataset in the worker across trials.
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=TUNE_DIR,
                storage_path=store.tune_storage_path(spec.storage, study_dir, spec.name),
                callbacks=callbacks,
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                # One checkpoint per trial: the final one, or while it runs its latest epoch's
                # (spec.checkpoint_every_seconds). Ray snapshots the study whenever a trial has
                # checkpointed num_to_keep times since the last snapshot, so with 1 every finished
                # trial is in a snapshot before anything can forget it (a killed driver resumes
                # knowing it), at one snapshot per trial.
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                verbose=0,
            ),
        )
    grid = tuner.fit()
    if unfinished_trials(str(study_dir)):  # Ctrl-C: keep everything for resume, finish nothing
        _set_status(state_file, "interrupted")
        if remote:
            store.upload(spec.storage, spec.name)
        raise study_interrupted(spec, study_run)
    records = collect_records(spec, grid)
    from study.orchestration.finish import finish_study
    from study.tracking import MlflowUnsynced

    try:
        front, final_front = finish_study(spec, records, study_run, progress=progress, stop_ray=owns_ray)
    except MlflowUnsynced:
        _set_status(state_file, "finished, MLflow not synced")
        if remote:
            store.upload(spec.storage, spec.name)
        raise
    _set_status(state_file, "finished")
    if remote:
        store.upload(spec.storage, spec.name)
    return StudyOutcome(study_dir, records, front, final_front, time.perf_counter() - start, parent_id, uri)


def collect_records(spec: StudySpec, grid: Any) -> list[TrialRecord]:
    """One record per trial from Tune's results (the source for fronts, tables, export).

    Each trial id is recorded once, with its most complete result (study.results.identity).
    """
    from study.results.identity import one_record_per_trial, trial_id_from_dir
    from study.storage import checkpoint_location

    records: list[TrialRecord] = []
    for number, result in enumerate(sorted(grid, key=lambda r: r.path or "")):
        metrics = result.metrics or {}
        folder = Path(result.path or "").name
        params = {k: v for k, v in (result.config or {}).items()}
        final = bool(metrics.get("final"))
        outcome = trial_outcome(metrics, raised=bool(result.error))
        # A trial stopped by the scheduler ended on a per-epoch report, which carries its times so far.
        timed = final or outcome["status"] == "stopped"
        record: TrialRecord = {
            # Tune puts the id on every result; the folder name carries it too (trial_files reads it
            # the same way), so a trial is one id in trials.json and MLflow alike.
            "trial_id": metrics.get("trial_id") or trial_id_from_dir(folder) or folder,
            "number": number,
            "defense": params.get("defense", "none"),
            "params": params,
            "status": outcome["status"],
            "reason": metrics.get("reason") or (str(result.error).strip().splitlines()[-1] if result.error else ""),
            "trusted": outcome["trusted"],
            "flags_failed": outcome["failed_gates"],
            "checkpoint": checkpoint_location(result.checkpoint) if (final and result.checkpoint) else None,
            "node_ip": metrics.get("node_ip"),
            "resumed_from_epoch": metrics.get("resumed_from_epoch", 0),
            "finished_at": metrics.get("timestamp", 0),
            # Wall-clock start/end in the worker and the seconds blocked in per-epoch reports
            # (the timeline; absent for trials that failed or never reported).
            "started_at": metrics.get("started_at") if timed else None,
            "ended_at": metrics.get("ended_at") if timed else None,
            "report_seconds": metrics.get("report_seconds") if final else None,
            "reproducibility": json.loads(metrics.get("reproducibility_json") or "{}") if final else {},
        }
        for objective in ("val_clean_accuracy", "val_robust_accuracy", "train_seconds", "eval_seconds",
                          "num_parameters"):
            record[objective] = float(metrics.get(objective, 0.0)) if final else None  # type: ignore[literal-required]
        if outcome["status"] == "stopped" and metrics.get("trained_seconds") is not None:
            record["train_seconds"] = float(metrics["trained_seconds"])  # the epochs it trained; never attacked
        record["split_sizes"] = json.loads(metrics.get("split_sizes_json") or "null") if final else None
        if final:
            record["reached"] = reached_values(metrics)
        records.append(record)
    # A trial's attempts (retries, the continuation after a resume) share its id: one record each.
    records, _ = one_record_per_trial(records)
    records.sort(key=lambda r: (r["finished_at"] or 0, r["trial_id"]))
    for number, record in enumerate(records):
        record["number"] = number
    return records


def trial_seconds(record: dict[str, Any]) -> float:
    """A record's own work, timed in its worker: training + attack seconds (0 if it never finished)."""
    return (record.get("train_seconds") or 0.0) + (record.get("eval_seconds") or 0.0)


def params_key(params: dict[str, Any]) -> str:
    """A configuration as a canonical string: matches trials across runs by what they ran."""
    return json.dumps(params, sort_keys=True, default=str)


def _set_status(state_file: Path, status: str) -> None:
    state = json.loads(state_file.read_text())
    state["status"] = status
    _write_json(state_file, state)


def _write_json(path: Path, data: Any) -> None:
    # Write-then-rename: a crash never leaves a half-written state file.
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def _dump_yaml(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def load_records(storage: str, name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A finished study's state and trial records (for pareto/export); a URI ``storage`` is read
    from the object store."""
    from study.storage import fetch_study

    study_dir = fetch_study(str(storage), name)
    state_file, trials_file = study_dir / STUDY_FILE, study_dir / TRIALS_FILE
    if not state_file.is_file():
        where = storage if "://" in str(storage) else study_dir.parent
        raise ConfigError(f"no study {name!r} under {where} (run it with: robust-study run SPEC)")
    if not trials_file.is_file():
        raise ConfigError(f"study {name!r} has no results yet (still running, or resume it: robust-study resume {name})")
    records = json.loads(trials_file.read_text())
    if any("clean_accuracy" in r and "val_clean_accuracy" not in r for r in records):
        # Before the three splits every number was measured on the test split, search and
        # verification alike: relabelling them would be exactly the selection bias they carry.
        raise ConfigError(f"study {name!r} was recorded before search and verification used separate splits "
                          "(its numbers are not labelled val_/test_); run it again")
    return json.loads(state_file.read_text()), records
