"""Search cheap, verify strong: re-evaluate the front's trials with the final (strong) attacks.

Trials were scored with a cheap attack on the validation split so many fit the budget; the few on
the front are attacked again with the spec's ``final_eval`` suite (AutoAttack by default) on the
held-out test split, which no search decision has seen, as Ray tasks with the trial's resources so
a cluster's GPUs do the work. The numbers land in each record's ``final`` entry (``test_...``
keys) and the caller recomputes the front on them. A verification that fails leaves
``final: None`` and ``verified: False``: the record is marked, never quietly scored by its
search numbers.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from study.results.records import FINAL_SPLIT, SEARCH_SPLIT, labelled
from study.spec import StudySpec

log = logging.getLogger(__name__)


def reevaluate(
    trial_dir: str, eval_data: dict[str, Any], device: str = "cpu", split: str = FINAL_SPLIT
) -> dict[str, Any]:
    """Attack a saved trial's model with another evaluation config on ``split`` (``test`` or
    ``val``); plain-dict result whose accuracies are named after the split (``test_clean_accuracy``).

    ``trial_dir`` may be an object-store URI (a remote study's checkpoint): it is fetched first.
    """
    from study.config import load_trial_config
    from study.reproducibility import applied
    from study.storage import local_copy

    if split not in (FINAL_SPLIT, SEARCH_SPLIT):
        raise ValueError(f"split {split!r} must be {FINAL_SPLIT!r} or {SEARCH_SPLIT!r}")
    with local_copy(trial_dir) as directory:
        config = load_trial_config(f"{directory}/config.yaml")
        # The trial's recorded threads and determinism: the attack's numbers repeat like the trial's.
        with applied(config.reproducibility, device_type=device.split(":")[0], seed=config.seed, name=config.name):
            return _reevaluate(directory, eval_data, device, split)


def _reevaluate(trial_dir: str, eval_data: dict[str, Any], device: str, split: str) -> dict[str, Any]:
    from study.config import ConfigError, EvalConfig, load_trial_config
    from study.data import eval_tensors, load_data
    from study.evaluation.suite import evaluate
    from study.results.records import failed_gates
    from study.trial import load_model, runtime_defense_params, split_sizes

    config = load_trial_config(f"{trial_dir}/config.yaml")
    eval_cfg = EvalConfig.model_validate(eval_data)
    model = load_model(trial_dir, device=device)
    bundle = load_data(config.data, seed=config.seed)
    dataset = bundle.test if split == FINAL_SPLIT else bundle.val
    if dataset is None:
        raise ConfigError(f"{trial_dir}: the trial has no {split} split (data.val_fraction: 0)")
    x, y = eval_tensors(dataset, eval_cfg.n_samples, seed=config.seed)
    result = evaluate(
        model,
        x.to(device),
        y.to(device),
        eval_cfg,
        num_classes=bundle.info.num_classes,
        defense=config.model.defense,
        defense_params=runtime_defense_params(config),
        recipe=config.training.recipe,
        seed=config.seed,
    )
    return {
        "split": split,
        labelled("clean_accuracy", split): result.clean_accuracy,
        labelled("robust_accuracy", split): result.robust_accuracy,
        "trusted": result.trusted,
        "flags": result.flags,
        "flags_failed": failed_gates(result.flags),
        "attacks": result.attacks,
        "split_sizes": {**split_sizes(bundle), "evaluated": len(y)},
        "seconds": result.seconds,
    }


def verify_front(spec: StudySpec, front: list[dict[str, Any]], *, progress: bool = False) -> None:
    """Fill ``record['final']`` and ``record['verified']`` for every front record (in place), in
    parallel on Ray. A failed verification sets ``final: None``, ``verified: False`` and
    ``final_error``. ``progress`` prints a line when it starts and one per finished trial (the
    strong attacks take minutes; the search's progress line has stopped by then)."""
    import ray  # not at the top: `evaluate` and `bench evaluation` use reevaluate without Ray

    for record in front:
        if record.get("final"):
            record["verified"] = True
        elif not record.get("checkpoint"):
            record.update(final=None, verified=False, final_error="no saved model to verify")
    todo = longest_first([r for r in front if r.get("checkpoint") and not r.get("final")])
    if not todo:
        return
    device = "cuda" if spec.resources.gpu > 0 else "cpu"
    task = ray.remote(num_cpus=spec.resources.cpu, num_gpus=spec.resources.gpu)(reevaluate)
    eval_data = spec.final_eval.model_dump(mode="json")
    refs = [task.remote(r["checkpoint"], eval_data, device) for r in todo]
    waiting = {ref: record for ref, record in zip(refs, todo)}
    start = time.monotonic()
    if progress:
        attacks = ", ".join(a.name for a in spec.final_eval.attacks)
        _say(f"verifying {len(todo)} trial(s) on the {FINAL_SPLIT} split with {attacks} at eps "
             f"{spec.final_eval.eps:g} ({spec.final_eval.n_samples} samples)")
    while waiting:
        # As each finishes, not in submission order: the progress line follows the work.
        (ref,), _ = ray.wait(list(waiting), num_returns=1)
        record = waiting.pop(ref)
        try:
            record["final"] = ray.get(ref)
            record["verified"] = True
        except Exception as err:  # noqa: BLE001 - one failed verification must not lose the study
            log.warning("final evaluation of trial %s failed: %s", record["trial_id"], err)
            record["final"] = None
            record["verified"] = False
            record["final_error"] = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        if progress:
            _say(f"[verify {len(todo) - len(waiting):>2}/{len(todo)}] {time.monotonic() - start:6.0f}s  "
                 + verified_line(record))


def longest_first(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The order to submit verifications in: longest expected first, ties in the given order.

    There are usually more front trials than workers, and their attacks differ tenfold (a model
    AutoAttack breaks at once against a robust, widened one). Started last, the longest one
    runs alone while the other workers idle; started first, the short ones fill in beside it
    (longest-processing-time-first scheduling). Its expected length is its search evaluation's
    (``eval_seconds``): the same model attacked more cheaply on the validation split, so robust
    and costly models rank first there too. Records without it go last.
    """
    return sorted(records, key=lambda r: -(r.get("eval_seconds") or 0.0))


def verified_line(record: dict[str, Any]) -> str:
    """One progress line for a verified (or failed) trial: its test numbers and trust."""
    head = f"#{record['number']} {record['defense']}: "
    final = record.get("final")
    if not final:
        return head + f"verification failed ({record.get('final_error', 'unknown error')})"
    clean = final[labelled("clean_accuracy", final["split"])]
    robust = final[labelled("robust_accuracy", final["split"])]
    mark = "" if final["trusted"] else f" UNTRUSTED ({', '.join(final['flags_failed'])})"
    return f"{head}{final['split']} clean {100 * clean:.1f}% robust {100 * robust:.1f}%{mark}  ({final['seconds']:.0f}s)"


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
