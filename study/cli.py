"""``robust-study`` command line: a table of small commands, each returning an exit code.

Bad input (a config, a name, a path) is one line on stderr and exit status 2, before anything
is written or trained.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from study.config import ConfigError

log = logging.getLogger("robust-study")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _pct(value: float) -> str:
    return f"{100 * value:5.1f}%"


def format_trial_result(result: Any) -> str:
    """A short human summary of a TrialResult."""
    lines = [
        f"status     {result.status}" + (f" ({result.reason})" if result.reason else ""),
        f"epochs     {result.epochs_run}   train {result.train_seconds:.1f}s   eval {result.eval_seconds:.1f}s",
        f"clean      {_pct(result.clean_accuracy)}",
        f"robust     {_pct(result.robust_accuracy)}   (per-sample worst case over the suite)",
    ]
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
    from study.export import configs_from_export, is_export

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
    from study.config import ATTACKS, AttackConfig, load_trial_config
    from study.trial import load_model
    from study.verify import reevaluate

    config = load_trial_config(f"{args.dir}/config.yaml")
    load_model(args.dir)  # weights that do not fit the config fail here, as one line
    if args.attack not in ATTACKS:
        raise ConfigError(f"--attack {args.attack!r} is not allowed; choose one of {', '.join(ATTACKS)}")
    update: dict[str, Any] = {"attacks": [AttackConfig(name=args.attack, eps=args.eps)]}
    if args.eps is not None:
        update["eps"] = args.eps
    if args.n is not None:
        update["n_samples"] = args.n
    eval_cfg = config.eval.model_copy(update=update)
    result = reevaluate(args.dir, eval_cfg.model_dump(mode="json"))
    print(f"clean  {_pct(result['clean_accuracy'])}\nrobust {_pct(result['robust_accuracy'])}")
    for a in result["attacks"]:
        print(f"  {a['name']:<16} {_pct(a['accuracy'])}  {json.dumps(a.get('settings', {}))}")
    print(f"trusted {'yes' if result['trusted'] else 'NO'}")
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    # Benchmarks run for minutes: show their progress lines, not every trial's integrity warnings
    # (the trials they run are measured, not judged).
    for name in ("study.bench.layers", "study.bench.overhead", "study.bench.search", "study.bench.evaluation", "study.bench.load"):
        logging.getLogger(name).setLevel(logging.INFO)
    if args.what != "defenses":
        logging.getLogger("study.checks").setLevel(logging.ERROR)
    if args.what == "defenses":
        from study.bench.defenses import defense_rows

        defense_rows(n_samples=args.n, epochs=args.epochs)
        return EXIT_OK
    if args.what == "overhead":
        from study.bench.overhead import bench_overhead, format_overhead

        print(format_overhead(bench_overhead(num_trials=args.trials or 16, concurrency=args.concurrency,
                                             epochs=args.epochs or 3)))
        return EXIT_OK
    if args.what == "load":
        from study.bench.load import bench_load, format_load

        storage = Path(args.storage or "results")
        if (storage / "bench_load").exists():
            raise ConfigError(f"--storage: {storage / 'bench_load'} already exists; remove it or choose another --storage")
        print(format_load(bench_load(num_trials=args.trials or 100, concurrency=args.concurrency, storage=storage)))
        return EXIT_OK
    if args.what == "search":
        from study.bench.search import bench_search, format_search

        print(format_search(bench_search(seeds=args.seeds, max_trials=args.trials or 64, epochs=args.epochs or 2)))
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


def format_front(records: list[dict[str, Any]], title: str) -> str:
    """The front as a fixed-width table (search numbers and, where verified, final numbers)."""
    header = f"{'#':>4}  {'defense':<10} {'clean':>7} {'robust':>7} {'final clean':>11} {'final robust':>12}  params"
    lines = [title, header, "-" * len(header)]
    for r in records:
        final = r.get("final") or {}
        params = ", ".join(f"{k.split('.', 1)[-1]}={_short(v)}" for k, v in sorted(r["params"].items()) if k != "defense")
        fc = _pct(final["clean_accuracy"]) if final else "-"
        fr = _pct(final["robust_accuracy"]) + ("" if final.get("trusted", True) else "!") if final else "-"
        lines.append(
            f"{r['number']:>4}  {r['defense']:<10} {_pct(r['clean_accuracy']):>7} {_pct(r['robust_accuracy']):>7} "
            f"{fc:>11} {fr:>12}  {params}"
        )
    if not records:
        lines.append("  (no trusted completed trial)")
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _report_study(outcome: Any, spec: Any) -> None:
    records = outcome.records
    done = sum(r["status"] == "completed" for r in records)
    untrusted = sum(r["status"] == "completed" and not r["trusted"] for r in records)
    print(
        f"\nstudy {spec.name}: {len(records)} trials ({done} completed, {len(records) - done} failed/stopped, "
        f"{untrusted} untrusted) in {outcome.seconds:.0f}s"
    )
    print(format_front(outcome.front, f"\nPareto front (search attacks: {_attack_names(spec.search_eval)})"))
    print(format_front(outcome.final_front, f"\nVerified front (final attacks: {_attack_names(spec.final_eval)})"))
    print(f"\nresults  {outcome.study_dir}  (front.png, front.html, front.csv, best.yaml)")
    print(f"MLflow   {outcome.tracking_uri}")
    storage = spec.study_dir().parent
    print(f"open the UI:  robust-study ui --storage {storage}   (then http://127.0.0.1:5000)")
    print(f"export:       robust-study export {spec.name} --storage {storage} --out best.yaml")


def _attack_names(eval_cfg: Any) -> str:
    return ", ".join(a.name for a in eval_cfg.attacks) + f" at eps {eval_cfg.eps:g}"


def cmd_run(args: argparse.Namespace) -> int:
    from study.runner import run_study

    spec = _spec_with(args)
    outcome = run_study(spec, progress=not args.quiet, address=args.address)
    _report_study(outcome, spec)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from study.runner import STUDY_FILE, run_study
    from study.spec import load_spec, parse_spec

    spec = load_spec("demo")
    storage = Path(args.storage or spec.storage)
    name, n = "demo", 1
    while (storage / name / STUDY_FILE).exists():  # make demo twice: a new study each time
        n += 1
        name = f"demo-{n}"
    spec = parse_spec({**spec.model_dump(mode="json"), "name": name, "storage": str(storage)}, source="demo")
    print(f"robust-study demo: {spec.num_trials} trials of {', '.join(spec.defenses)} + baseline on digits, "
          f"{spec.concurrency} at a time", flush=True)
    outcome = run_study(spec, progress=True, address=args.address)
    _report_study(outcome, spec)
    return EXIT_OK


def cmd_resume(args: argparse.Namespace) -> int:
    from study.runner import STUDY_FILE, run_study
    from study.spec import parse_spec

    state_file = Path(args.storage) / args.name / STUDY_FILE
    if not state_file.is_file():
        raise ConfigError(f"resume: no study {args.name!r} under {Path(args.storage).resolve()}")
    state = json.loads(state_file.read_text())
    spec = parse_spec(state["spec"], source=str(state_file))
    outcome = run_study(spec, resume=True, progress=not args.quiet, address=args.address)
    _report_study(outcome, spec)
    return EXIT_OK


def cmd_pareto(args: argparse.Namespace) -> int:
    from study.runner import load_records

    state, records = load_records(args.storage, args.name)
    stage = "final" if args.final else "search"
    front = [r for r in records if r.get("on_final_front" if args.final else "on_front")]
    print(format_front(front, f"study {args.name}: Pareto front ({stage} numbers), {len(records)} trials"))
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from study.export import export_document, write_export
    from study.runner import load_records
    from study.spec import parse_spec

    state, records = load_records(args.storage, args.name)
    spec = parse_spec(state["spec"], source=args.name)
    front = [r for r in records if r.get("on_final_front")] or [r for r in records if r.get("on_front")]
    out = write_export(export_document(spec, front), args.out)
    print(f"wrote {len(front)} trial config(s) to {out}; run them with: robust-study trial {out} --out DIR")
    return EXIT_OK


def cmd_sync(args: argparse.Namespace) -> int:
    from study.tracking import sync_study

    study_dir = (Path(args.storage) / args.name).resolve()
    if not (study_dir / "study.json").is_file():
        raise ConfigError(f"no study {args.name!r} under {study_dir.parent}")
    report = sync_study(study_dir)
    print(
        f"study {args.name}: {report.trials} trials, {report.replayed} run(s) logged now"
        + (", study run completed" if report.parent_logged else "")
    )
    return EXIT_OK


def cmd_ui(args: argparse.Namespace) -> int:
    import subprocess

    from study.tracking import default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri(Path(args.storage))
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise ConfigError(f"no MLflow store at {uri.removeprefix('sqlite:///')} (run a study first)")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port)]
    print(f"MLflow UI on http://{args.host}:{args.port}  (Ctrl-C to stop)", flush=True)
    return subprocess.call(cmd)


# --------------------------------------------------------------------------- parser

#: Every benchmark ``robust-study bench`` runs (README: Benchmarks).
BENCHMARKS: dict[str, str] = {
    "layers": "defense cost per training step at ResNet-18 scale",
    "defenses": "the defense table on digits",
    "overhead": "the same trials in plain loops (default and 1 thread), a process pool and a study",
    "search": "hypervolume per sampler after n trials",
    "evaluation": "search cheap/verify strong vs strong on every trial",
    "load": "100 tiny trials, audited",
}

COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "trial": (cmd_trial, "train and attack one configuration locally"),
    "evaluate": (cmd_evaluate, "re-evaluate a saved trial's model with one attack"),
    "bench": (cmd_bench, "benchmarks (layers: defense cost at ResNet-18 scale)"),
    "run": (cmd_run, "run a study (a spec file or a built-in name such as demo)"),
    "demo": (cmd_demo, "run the built-in demo study and print its front"),
    "resume": (cmd_resume, "continue a study whose driver died"),
    "pareto": (cmd_pareto, "print a finished study's Pareto front"),
    "export": (cmd_export, "write the front's trials as re-runnable trial configs"),
    "sync": (cmd_sync, "log into MLflow what a study could not log while its server was away"),
    "ui": (cmd_ui, "open the MLflow UI for the studies' store (127.0.0.1 by default)"),
}


def _address_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray to run on: host:port of a cluster's head, auto, or local (a new local "
                   "instance); before the spec's address and RAY_ADDRESS (README: Running on a cluster)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="robust-study", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("trial", help=COMMANDS["trial"][1])
    p.add_argument("config", nargs="?", help="trial config YAML")
    p.add_argument("--out", help="output directory (result.json, config.yaml, model.pt)")
    p.add_argument("--print-default", action="store_true", help="print the commented default config")

    p = sub.add_parser("evaluate", help=COMMANDS["evaluate"][1])
    p.add_argument("dir", help="a trial output directory")
    p.add_argument("--attack", required=True, help="attack name (see robust-study trial --print-default)")
    p.add_argument("--eps", type=float, help="budget (default: the trial's eval eps)")
    p.add_argument("--n", type=int, help="number of test samples")

    p = sub.add_parser("bench", help=COMMANDS["bench"][1])
    p.add_argument("what", choices=BENCHMARKS, help="; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items()))
    p.add_argument("--n", type=int, default=200, help="defenses: attacked test samples")
    p.add_argument("--epochs", type=int, help="defenses: override the demo's epochs; search: epochs per trial (2); "
                   "overhead: epochs per trial (3)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when present)")
    p.add_argument("--trials", type=int, help="overhead: trials (16); load: trials (100); search: max trials (64)")
    p.add_argument("--concurrency", type=int, default=2, help="overhead, load: trials at once")
    p.add_argument("--seeds", type=int, default=3, help="search: seeds per sampler")
    p.add_argument("--study", default="demo", help="evaluation: a finished study (default demo)")
    p.add_argument("--storage", help="evaluation, load: results directory (default results)")

    p = sub.add_parser("run", help=COMMANDS["run"][1])
    p.add_argument("spec", help="study spec YAML or built-in name (demo, cifar10_kap, ...)")
    p.add_argument("--name", help="override the study name")
    p.add_argument("--storage", help="override the results directory")
    p.add_argument("--trials", type=int, help="override the number of trials")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    _address_option(p)

    p = sub.add_parser("demo", help=COMMANDS["demo"][1])
    p.add_argument("--storage", help="results directory (default: results)")
    _address_option(p)

    for command in ("resume", "pareto", "export", "sync"):
        p = sub.add_parser(command, help=COMMANDS[command][1])
        p.add_argument("name", help="study name")
        p.add_argument("--storage", default="results", help="results directory (default: results)")
        if command == "resume":
            p.add_argument("--quiet", action="store_true")
            _address_option(p)
        if command == "pareto":
            p.add_argument("--final", action="store_true", help="the front verified with the final attacks")
        if command == "export":
            p.add_argument("--out", required=True, help="output YAML")

    p = sub.add_parser("ui", help=COMMANDS["ui"][1])
    p.add_argument("--storage", default="results", help="results directory (default: results)")
    p.add_argument("--tracking-uri", help="an MLflow tracking URI instead of the storage's SQLite store")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=5000)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    handler = COMMANDS[args.command][0]
    from study.tracking import MlflowUnsynced

    try:
        return handler(args)
    except MlflowUnsynced as err:  # results are safe on disk, but not bad input: exit 1
        print(f"robust-study {args.command}: {err}", file=sys.stderr)
        return EXIT_FAILED
    except ConfigError as err:
        print(f"robust-study {args.command}: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
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

    code = main()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()  # a local instance stops; a cluster's driver only disconnects
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(entry())
