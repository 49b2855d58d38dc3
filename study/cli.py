"""The ``robust-study`` command line: one small function per command, each returning an exit code.

Bad input (a config, a name, a path, an option) is one line on stderr and exit status 2, before
anything is written or trained. ``--help`` and ``--version`` import nothing heavy: commands import
what they need when they run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from study.cli_args import EXIT_BAD_INPUT, LazyChoices, Parser, VersionAction, count, fraction, port
from study.errors import ConfigError

if TYPE_CHECKING:
    from study.results.records import TrialRecord

log = logging.getLogger("robust-study")

EXIT_OK, EXIT_FAILED = 0, 1
EXIT_INCOMPLETE = 3
"""The study finished but its front is incomplete: a front trial's verification failed."""


def _pct(value: float) -> str:
    return f"{100 * value:5.1f}%"


def format_trial_result(result: Any) -> str:
    """A short human summary of a TrialResult."""
    split = getattr(result, "split", "val")
    sizes = getattr(result, "split_sizes", {}) or {}
    where = f"{sizes['evaluated']} {split} samples" if "evaluated" in sizes else f"the {split} split"
    lines = [
        f"status     {result.status}" + (f" ({result.reason})" if result.reason else ""),
        f"epochs     {result.epochs_run}   train {result.train_seconds:.1f}s   eval {result.eval_seconds:.1f}s",
        f"split      {where}"
        + (f"   (train {sizes.get('train')}, val {sizes.get('val')}, test {sizes.get('test')})" if sizes else ""),
        f"clean      {_pct(result.clean_accuracy)}   ({split})",
        f"robust     {_pct(result.robust_accuracy)}   ({split}; per-sample worst case over the suite)",
    ]
    for name, value in getattr(result, "reached", {}).items():
        lines.append(f"reached    {name} = {value:g}")
    for attack in result.attacks:
        settings = attack.get("settings", {})
        brief = ", ".join(
            f"{k}={v}"
            for k, v in settings.items()
            if k in ("eps", "steps", "restarts", "queries", "eot_samples") and v is not None
        )
        lines.append(f"  {attack['name']:<16} {_pct(attack['accuracy'])}   {brief}")
    if result.eps_curve:
        curve = "  ".join(f"{eps:g}:{100 * acc:.0f}%" for eps, acc in result.eps_curve)
        lines.append(f"eps curve  {curve}")
    failed = [f for f in result.flags if not f.get("passed")]
    lines.append(
        f"trusted    {'yes' if result.trusted else 'NO'}"
        + (f"   flags: {', '.join(f['id'] + ('' if f.get('gate') else '(warn)') for f in failed)}" if failed else "")
    )
    for flag in failed:
        lines.append(f"  {flag['id']}: {flag.get('message', '')}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- trial commands


def cmd_trial(args: argparse.Namespace) -> int:
    from study.config import commented_default_yaml, parse_trial_config, read_yaml
    from study.results.export import configs_from_export, is_export

    if args.print_default:
        sys.stdout.write(commented_default_yaml())
        return EXIT_OK
    if not args.config or not args.out:
        raise ConfigError("trial: give CONFIG.yaml and --out DIR (or --print-default)")
    data = read_yaml(args.config)
    if is_export(data):  # an exported front: run each of its trials into DIR/trial-N
        jobs = [(config, Path(args.out) / f"trial-{number}") for number, config in configs_from_export(data)]
    else:
        jobs = [(parse_trial_config(data), Path(args.out))]
    from study.data import load_data
    from study.trial import resolve_device, run_trial, save_trial

    for config, _ in jobs:  # every config and dataset is checked before anything trains
        resolve_device(config.device)
        load_data(config.data, seed=config.seed)
    status = EXIT_OK
    for config, out in jobs:
        bundle = load_data(config.data, seed=config.seed)
        result = run_trial(config, data=bundle, on_epoch=_print_epoch)
        save_trial(config, result, out)
        print(format_trial_result(result))
        print(f"wrote {out}/result.json, config.yaml" + (", model.pt" if result.model_state is not None else ""))
        if result.status != "completed":
            status = EXIT_FAILED
    return status


def _print_epoch(report: Any) -> None:
    m = report.metrics
    extra = "".join(f"  {k} {m[k]:.3f}" for k in ("val_accuracy", "val_robust_accuracy", "gamma") if k in m)
    print(f"epoch {report.epoch:>3}  loss {m.get('train_loss', float('nan')):.4f}{extra}", flush=True)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from study.config import AttackConfig, load_trial_config
    from study.orchestration.verify import reevaluate
    from study.trial import load_model

    config = load_trial_config(f"{args.dir}/config.yaml")
    load_model(args.dir)  # weights that do not fit the config fail here, as one line
    update: dict[str, Any] = {"attacks": [AttackConfig(name=args.attack, eps=args.eps)]}
    if args.eps is not None:
        update["eps"] = args.eps
    if args.n is not None:
        update["n_samples"] = args.n
    eval_cfg = config.eval.model_copy(update=update)
    result = reevaluate(args.dir, eval_cfg.model_dump(mode="json"), split=args.split)
    split = result["split"]
    print(f"split  {split} ({result['split_sizes']['evaluated']} samples)")
    print(f"clean  {_pct(result[f'{split}_clean_accuracy'])}\nrobust {_pct(result[f'{split}_robust_accuracy'])}")
    for a in result["attacks"]:
        print(f"  {a['name']:<16} {_pct(a['accuracy'])}  {json.dumps(a.get('settings', {}))}")
    print(f"trusted {'yes' if result['trusted'] else 'NO'}")
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    # Benchmarks run for minutes: show their progress lines, not every trial's integrity warnings
    # (the trials they run are measured, not judged).
    for name in ("study.bench.layers", "study.bench.overhead", "study.bench.search", "study.bench.evaluation", "study.bench.load",
                 "study.bench.scale"):
        logging.getLogger(name).setLevel(logging.INFO)
    if args.what != "defenses":
        logging.getLogger("study.evaluation.checks").setLevel(logging.ERROR)
    if args.what == "defenses":
        from study.bench.defenses import defense_rows

        defense_rows(n_samples=args.n, epochs=args.epochs, only=args.defense, recipe=args.recipe)
        return EXIT_OK
    if args.what == "overhead":
        from study.bench.overhead import bench_overhead, format_overhead

        print(format_overhead(bench_overhead(num_trials=args.trials or 16, concurrency=args.concurrency,
                                             epochs=args.epochs or 3)))
        return EXIT_OK
    if args.what == "load":
        from study.bench.load import audit_problems, bench_load, format_load

        storage = Path(args.storage or "results")
        if (storage / "bench_load").exists():
            raise ConfigError(f"--storage: {storage / 'bench_load'} already exists; remove it or choose another --storage")
        audit = bench_load(num_trials=args.trials or 100, concurrency=args.concurrency, storage=storage)
        print(format_load(audit))
        return EXIT_FAILED if audit_problems(audit) else EXIT_OK  # a trial lost or counted twice
    if args.what == "scale":
        from study.bench.scale import bench_scale, format_scale

        print(format_scale(bench_scale(num_trials=args.trials or 2000, concurrency=args.concurrency)))
        return EXIT_OK
    if args.what == "search":
        from study.bench.search import bench_search, format_search

        print(format_search(bench_search(seeds=args.seeds, max_trials=args.trials or 64, epochs=args.epochs or 9,
                                        budget_fraction=args.budget, early_trials=args.early_trials,
                                        workers=args.workers, grace=args.grace)))
        return EXIT_OK
    if args.what == "evaluation":
        from study.bench.evaluation import bench_evaluation, format_evaluation

        print(format_evaluation(bench_evaluation(args.study, args.storage or "results")))
        return EXIT_OK
    from study.bench.layers import bench_layers, format_table

    rows = bench_layers(batch=args.batch, device=args.device, repeats=args.repeats)
    print(format_table(rows))
    return EXIT_OK


# --------------------------------------------------------------------------- study commands


def _spec_with(args: argparse.Namespace) -> Any:
    from study.spec import load_spec

    spec = load_spec(args.spec)
    updates: dict[str, Any] = {}
    if getattr(args, "name", None):
        updates["name"] = args.name
    if getattr(args, "storage", None):
        updates["storage"] = args.storage
    if getattr(args, "trials", None):
        updates["num_trials"] = args.trials
    if updates:
        from study.spec import parse_spec

        spec = parse_spec({**spec.model_dump(mode="json"), **updates}, source=args.spec)
    return spec


def study_failure(records: Sequence[TrialRecord]) -> str | None:
    """Why a finished study failed, or None when at least one of its trials completed.

    A study none of whose trials completed has no front and nothing to export: its command exits
    1, so that scripts and job schedulers see the failure.
    """
    if any(r.get("status") == "completed" for r in records):
        return None
    if not records:
        return "no trial ran"
    return f"no trial completed ({len(records)} trial(s) failed, diverged or were stopped)"


def front_incomplete(records: Sequence[TrialRecord]) -> str | None:
    """Why a study's verified front is incomplete (a front trial's verification failed), or None."""
    failed = [r for r in records if r.get("verified") is False]
    if not failed:
        return None
    which = ", ".join(f"#{r.get('number')} ({r.get('final_error') or 'unknown error'})" for r in failed)
    return (f"the front is incomplete: {len(failed)} front trial(s) could not be verified on the test split: "
            f"{which}; they are marked unverified in the front, front_final.csv and best.yaml")


def study_exit_status(records: Sequence[TrialRecord]) -> tuple[int, str | None]:
    """The exit status of a finished study and the line that explains it (None when it is 0)."""
    problem = study_failure(records)
    if problem is not None:
        return EXIT_FAILED, problem
    problem = front_incomplete(records)
    return (EXIT_INCOMPLETE, problem) if problem is not None else (EXIT_OK, None)


def _finish_study(args: argparse.Namespace, outcome: Any, spec: Any) -> int:
    from study.results.report import report_study

    report_study(outcome, spec)
    status, problem = study_exit_status(outcome.records)
    if problem is not None:
        print(f"robust-study {args.command}: {problem}", file=sys.stderr)
    return status


def cmd_run(args: argparse.Namespace) -> int:
    from study.orchestration.runner import run_study

    spec = _spec_with(args)
    outcome = run_study(spec, progress=not args.quiet, address=args.address, tracking_uri=args.tracking_uri)
    return _finish_study(args, outcome, spec)


def cmd_demo(args: argparse.Namespace) -> int:
    from study.orchestration.runner import run_study
    from study.spec import load_spec, parse_spec
    from study.storage import study_exists

    spec = load_spec("demo")
    storage = args.storage or spec.storage  # a str: Path would fold s3:// into s3:/
    name, n = "demo", 1
    while study_exists(storage, name):  # make demo twice: a new study each time
        n += 1
        name = f"demo-{n}"
    spec = parse_spec({**spec.model_dump(mode="json"), "name": name, "storage": storage}, source="demo")
    print(f"robust-study demo: {spec.num_trials} trials of {', '.join(spec.defenses)} + baseline on digits, "
          f"{spec.concurrency} at a time", flush=True)
    outcome = run_study(spec, progress=True, address=args.address, tracking_uri=args.tracking_uri)
    return _finish_study(args, outcome, spec)


def cmd_resume(args: argparse.Namespace) -> int:
    from study.orchestration.runner import STUDY_FILE, run_study
    from study.spec import parse_spec
    from study.storage import fetch_study

    state_file = fetch_study(args.storage, args.name) / STUDY_FILE
    if not state_file.is_file():
        raise ConfigError(f"resume: no study {args.name!r} under {Path(args.storage).resolve()}")
    state = json.loads(state_file.read_text())
    spec = parse_spec(state["spec"], source=str(state_file))
    outcome = run_study(spec, resume=True, progress=not args.quiet, address=args.address)
    return _finish_study(args, outcome, spec)


def cmd_pareto(args: argparse.Namespace) -> int:
    from study.orchestration.runner import load_records
    from study.results.export import front_to_quote

    state, records = load_records(args.storage, args.name)
    if args.final:
        front = front_to_quote(records)
        title = "verified front (test split, final attacks)"
    else:
        front, title = [r for r in records if r.get("on_front")], "search front (validation split, search attacks)"
    from study.results.report import format_front

    print(format_front(front, f"study {args.name}: {title}, {len(records)} trials"))
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from study.orchestration.runner import load_records
    from study.results.export import export_document, front_to_quote, write_export
    from study.spec import parse_spec

    state, records = load_records(args.storage, args.name)
    spec = parse_spec(state["spec"], source=args.name)
    front = front_to_quote(records)
    if args.register is not None:  # every front model must be there before anything is written
        from study.mlflow_model import check_registry_name, front_models, register_models

        check_registry_name(args.register)
        models = front_models(state, front)
    out = write_export(export_document(spec, front), args.out)
    unverified = sum(not (r.get("verified") and r.get("final")) for r in front)
    print(f"wrote {len(front)} trial config(s) to {out}; run them with: robust-study trial {out} --out DIR"
          + (f"\n{unverified} of them unverified (no test numbers; marked verified: false)" if unverified else ""))
    if args.register is not None:
        versions = register_models(state["tracking_uri"], args.register, models)
        print(f"registered {len(versions)} new version(s) of model {args.register!r} in {state['tracking_uri']}"
              + (f" ({len(models) - len(versions)} already there)" if len(versions) < len(models) else ""))
    return EXIT_OK


def cmd_sync(args: argparse.Namespace) -> int:
    from study.storage import fetch_study
    from study.tracking import sync_study

    study_dir = fetch_study(args.storage, args.name, include_tune=True)
    if not (study_dir / "study.json").is_file():
        raise ConfigError(f"no study {args.name!r} under {study_dir.parent}")
    report = sync_study(study_dir)
    print(
        f"study {args.name}: {report.trials} trials, {report.replayed} run(s) logged now"
        + (", study run completed" if report.parent_logged else "")
    )
    return EXIT_OK


def cmd_ui(args: argparse.Namespace) -> int:
    import os

    from study.mlflow_conventions import resolve_tracking_uri
    from study.storage import work_root
    from study.tracking import is_server
    from study.ui_server import serve

    uri = resolve_tracking_uri(args.tracking_uri, None, os.environ, work_root(args.storage))
    if is_server(uri):
        print(f"{uri} is an MLflow server: open it in a browser")
        return EXIT_OK
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise ConfigError(f"no MLflow store at {uri.removeprefix('sqlite:///')} (run a study first)")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host, "--port",
           str(args.port), "--workers", str(args.workers)]
    print(f"MLflow UI on http://{args.host}:{args.port}  (Ctrl-C to stop)", flush=True)
    return serve(cmd, name="robust-study ui", env=ui_environment(os.environ))


def ui_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The UI server's environment: ``environ`` with MLflow's server-side job execution off
    unless it says otherwise.

    Those jobs serve MLflow's GenAI features (judges, prompt optimisation), not runs and metrics;
    with them on, MLflow 3 starts a job runner and seven task consumers beside the web server,
    each importing MLflow: measured here, 15 processes, 12 s to answer and 30 CPU-seconds in its
    first half-minute, against 2 processes, 5-6.5 s and 4-6 CPU-seconds with the jobs off and
    one web worker (docs/benchmarks.md, The MLflow UI's start).
    """
    return {**environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")}


# --------------------------------------------------------------------------- parser

#: Every benchmark ``robust-study bench`` runs (README: Benchmarks).
BENCHMARKS: dict[str, str] = {
    "layers": "the cost of each defense per training step at ResNet-18 scale",
    "defenses": "the defense table on digits",
    "overhead": "the same trials in plain loops (default and 1 thread), a process pool and a study",
    "search": "hypervolume per sampler after n trials and core-seconds to reach random search's",
    "evaluation": "search cheap/verify strong against strong on every trial",
    "load": "100 tiny trials, audited",
    "scale": "2,000 synthetic trials through the real driver: time per trial, memory, sampler cost, audit",
}

COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "trial": (cmd_trial, "train and attack one configuration on this machine"),
    "evaluate": (cmd_evaluate, "attack a trained trial's model again, with another attack or budget"),
    "bench": (cmd_bench, "measure the defenses' cost, the framework's overhead or the search"),
    "run": (cmd_run, "run a study from a spec file or a built-in spec"),
    "demo": (cmd_demo, "run the built-in demo study on digits and print its Pareto front"),
    "resume": (cmd_resume, "continue a study that was interrupted"),
    "pareto": (cmd_pareto, "print a study's accuracy-robustness Pareto front"),
    "export": (cmd_export, "write the front's trials as configs that robust-study trial re-runs"),
    "sync": (cmd_sync, "log to MLflow what a study could not log while its server was away"),
    "ui": (cmd_ui, "open the MLflow UI on the studies' results (this machine only by default)"),
}


def _attack_table() -> Sequence[str]:
    from study.config import ATTACKS

    return ATTACKS


def _bench_defenses() -> Sequence[str]:
    from study.bench.defenses import defense_choices

    return defense_choices()


def _bench_recipes() -> Sequence[str]:
    from study.bench.defenses import recipe_choices

    return recipe_choices()


def build_parser() -> Parser:
    parser = Parser(prog="robust-study", description="Hyperparameter studies of adversarial-robustness "
                     "defenses: search, train, attack and keep the accuracy-robustness Pareto front.")
    parser.add_argument("--version", action=VersionAction, help="print the program's name and version, then exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details (INFO level)")
    # The same option after the command. SUPPRESS: when absent there it must not reset the value
    # given before the command.
    common = Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log progress details (INFO level)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands",
                                help="robust-study COMMAND --help shows a command's options")
    parser.commands = sub.choices

    def address_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--address", help="the Ray to run on: a cluster head's host:port, auto, or local (a new "
                       "local instance); comes before the spec's address and RAY_ADDRESS")

    def command(name: str) -> argparse.ArgumentParser:
        about = COMMANDS[name][1]
        return sub.add_parser(name, help=about, description=about[0].upper() + about[1:] + ".", parents=[common])

    p = command("trial")
    p.add_argument("config", nargs="?", help="a trial config (YAML), or a front written by robust-study export")
    p.add_argument("--out", metavar="DIR", help="folder for result.json, config.yaml and model.pt "
                   "(one sub-folder per trial of an exported front)")
    p.add_argument("--print-default", action="store_true", help="print the default trial config with comments, then exit")

    p = command("evaluate")
    p.add_argument("dir", help="a folder written by robust-study trial")
    p.add_argument("--attack", required=True, choices=LazyChoices(_attack_table), metavar="NAME",
                   help="the attack: %(choices)s")
    p.add_argument("--eps", type=float, help="perturbation budget (default: the one the trial was evaluated at)")
    p.add_argument("--n", type=count, help="number of samples to attack (default: the trial's)")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="the split to attack: test (held out, default) or val (the search's)")

    p = command("bench")
    p.add_argument("what", choices=BENCHMARKS, metavar="WHAT", help="; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items()))
    p.add_argument("--n", type=count, default=200, help="defenses: validation samples to attack (default 200)")
    p.add_argument("--epochs", type=count, help="defenses: epochs per trial (default: the demo's); "
                   "search: epochs per trial (9); overhead: epochs per trial (3)")
    p.add_argument(
        "--defense",
        choices=LazyChoices(_bench_defenses),
        metavar="DEFENSE",
        help="defenses: only this defense's rows (none for the baseline): %(choices)s",
    )
    p.add_argument(
        "--recipe",
        choices=LazyChoices(_bench_recipes),
        metavar="RECIPE",
        help="defenses: train the rows with this training recipe instead of the demo's: %(choices)s",
    )
    p.add_argument("--batch", type=count, default=128, help="layers: batch size (default 128)")
    p.add_argument("--repeats", type=count, default=3, help="layers: timed repetitions per defense (default 3)")
    p.add_argument("--device", default=None, help="layers: cpu or cuda (default: cuda when present)")
    p.add_argument("--trials", type=count, help="overhead: trials (16); load: trials (100); search: at most this "
                   "many trials (64); scale: trials (2000)")
    p.add_argument("--concurrency", type=count, default=2, help="overhead, load, scale: trials at once (default 2)")
    p.add_argument("--seeds", type=count, default=3, help="search: seeds per sampler (default 3)")
    p.add_argument("--budget", type=fraction, default=1.0, help="search: core-seconds a search with early stopping "
                   "may spend, as a fraction of random search's over --trials trials (default 1.0)")
    p.add_argument("--early-trials", type=count, help="search: run each search with early stopping for this many "
                   "trials, beside the others from the start, instead of within --budget after random search")
    p.add_argument("--grace", type=count, help="search: epochs before early stopping's first rung (default: a third "
                   "of --epochs, as a study's)")
    p.add_argument("--workers", type=count, help="search: worker processes (default: one per core)")
    p.add_argument("--study", default="demo", help="evaluation: the name of a finished study (default demo)")
    p.add_argument("--storage", help="evaluation, load: results folder (default results)")

    p = command("run")
    p.add_argument("spec", help="a study spec (YAML file) or a built-in spec's name, e.g. demo or cifar10_kap")
    p.add_argument("--name", help="study name (default: the spec's)")
    p.add_argument("--storage", help="results folder (default: the spec's)")
    p.add_argument("--trials", type=count, help="number of trials (default: the spec's)")
    p.add_argument("--quiet", action="store_true", help="no progress lines while trials run")
    address_option(p)

    p = command("demo")
    p.add_argument("--storage", help="results folder (default: results)")
    address_option(p)
    for command_parser in (sub.choices["run"], p):
        command_parser.add_argument("--tracking-uri", help="the MLflow store: comes before the spec's "
                                    "mlflow.tracking_uri, MLFLOW_TRACKING_URI and the results folder's mlflow.db")

    for name in ("resume", "pareto", "export", "sync"):
        p = command(name)
        p.add_argument("name", help="the study's name")
        p.add_argument("--storage", default="results", help="results folder (default: results)")
        if name == "resume":
            p.add_argument("--quiet", action="store_true", help="no progress lines while trials run")
            address_option(p)
        if name == "pareto":
            p.add_argument("--final", action="store_true", help="the front re-checked with the strong final attacks")
        if name == "export":
            p.add_argument("--out", required=True, help="the YAML file to write")
            p.add_argument("--register", metavar="MODEL", help="also register the front's models as versions of "
                           "this MLflow registered model")

    p = command("ui")
    p.add_argument("--storage", default="results", help="results folder (default: results)")
    p.add_argument("--tracking-uri", help="show this MLflow store instead of MLFLOW_TRACKING_URI's or the results "
                   "folder's (e.g. http://host:5000 or sqlite:///path/mlflow.db)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port, default=5000, help="port to listen on (default 5000)")
    p.add_argument("--workers", type=count, default=1, metavar="N",
                   help="web server processes (default 1, enough for one person's browser; MLflow's own default is 4)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the command's parser, so that the line names the command
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    handler = COMMANDS[args.command][0]

    try:
        return handler(args)
    except ConfigError as err:
        print(f"robust-study {args.command}: {err}", file=sys.stderr)
        # An MLflow store that stayed away is not bad input: results are safe on disk (exit 1).
        # Only a command that imported the tracking module can have raised it.
        tracking = sys.modules.get("study.tracking")
        return EXIT_FAILED if tracking is not None and isinstance(err, tracking.MlflowUnsynced) else EXIT_BAD_INPUT
    except KeyboardInterrupt as err:
        # A study's interrupt says how to continue it (study.orchestration.interrupt).
        print(f"robust-study {args.command}: {err}" if str(err) else "interrupted", file=sys.stderr)
        return 130


def entry() -> int:
    """The ``robust-study`` program: :func:`main`, then a quick exit.

    Two costs of leaving a process that ran a study, measured after a `run`, are avoidable:

    * Ray's exit hook sleeps 0.5 s so that workers' log lines can still be printed; the driver
      prints none (``log_to_driver=False``), so Ray is shut down here instead, without the wait.
    * The interpreter's last garbage collections walk every object the imports left (~700 000
      after a study: torch, Ray, MLflow, SQLAlchemy, matplotlib; 0.4 s per full pass here):
      2.1-2.4 s between the last exit handler and the end of the process. Freezing them first
      (``gc.freeze``: future collections skip them) leaves 0.3-0.5 s. Every exit handler
      (logging's flush, MLflow's) still runs and objects freed by reference counting are still
      finalized; only cyclic garbage left at exit goes uncollected, which nothing relies on.

    Not in :func:`main`, which callers may run many times in one process.
    """
    import gc

    from study.malloc import limit_arenas

    limit_arenas()  # before any thread: the driver's memory over long studies (study/malloc.py)
    code = main()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()  # a local instance stops; a cluster's driver only disconnects
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(entry())
