"""Evaluation-cost benchmark: "search cheap, verify strong" against the strong suite on every trial.

Takes a finished study (the demo by default) and attacks *every* completed trial's saved model
with the study's ``final_eval`` suite, exactly as the verification step attacks the front
(:func:`study.orchestration.verify.reevaluate`), two trials at a time. Then:

* attack time, as run: every trial's search evaluation + the verification of the front;
* attack time, strong everywhere: the strong evaluation of every trial (what a study that
  scored every trial with ``final_eval`` would spend on attacks);
* the two fronts: the study's verified front, and the front of all trials on strong numbers.

The trained models are reused, so the comparison costs attacks only; training is the same in
both designs and is left out of the ratio.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["bench_evaluation", "format_evaluation"]

logger = logging.getLogger(__name__)


def _strong(args: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    from study.orchestration.verify import reevaluate

    trial_dir, eval_data = args
    return reevaluate(trial_dir, eval_data)


def bench_evaluation(name: str = "demo", storage: str | Path = "results", workers: int | None = None) -> dict[str, Any]:
    """Strong-attack every trial of study ``name`` and compare the costs and fronts."""
    from study.bench.pool import spawn_pool
    from study.orchestration.runner import load_records
    from study.results.pareto import front_of_records
    from study.spec import StudySpec

    state, records = load_records(str(storage), name)
    spec = StudySpec.model_validate(state["spec"])
    todo = [r for r in records if r["status"] == "completed" and r.get("checkpoint")]
    eval_data = spec.final_eval.model_dump(mode="json")
    workers = workers or max(1, min(len(todo), os.cpu_count() or 1))
    logger.info("bench evaluation: strong suite on %d trials of %r, %d at a time", len(todo), name, workers)
    with spawn_pool(workers) as pool:
        strong = list(pool.map(_strong, [(r["checkpoint"], eval_data) for r in todo]))

    search_s = sum(r.get("eval_seconds") or 0.0 for r in todo)
    verify_s = sum((r.get("final") or {}).get("seconds", 0.0) for r in records)
    strong_s = sum(s["seconds"] for s in strong)
    # Both fronts at test-split numbers of the strong suite; trust is the strong suite's alone.
    everywhere = [{**r, "trusted": s["trusted"], "final": s} for r, s in zip(todo, strong, strict=True)]
    front_all = [everywhere[i] for i in front_of_records(everywhere, spec.objectives, spec.directions, "final")]
    front_run = [r for r in records if r.get("on_final_front")]

    def summary(front: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for r in front:
            numbers = r["final"]
            out.append({"number": r["number"], "defense": r["defense"],
                        "clean": numbers["test_clean_accuracy"], "robust": numbers["test_robust_accuracy"]})
        return sorted(out, key=lambda t: -t["clean"])

    return {
        "study": name,
        "trials": len(todo),
        "front_verified": sum(bool(r.get("final")) for r in records),
        "search_attack_s": search_s,
        "verify_attack_s": verify_s,
        "cheap_then_verify_s": search_s + verify_s,
        "strong_everywhere_s": strong_s,
        "ratio": (search_s + verify_s) / strong_s if strong_s else float("nan"),
        "front_as_run": summary(front_run),
        "front_strong_everywhere": summary(front_all),
        "same_trials_on_front": sorted(t["number"] for t in summary(front_run))
        == sorted(t["number"] for t in summary(front_all)),
        "untrusted_strong": sum(not s["trusted"] for s in strong),
    }


def format_evaluation(m: dict[str, Any]) -> str:
    def front(rows: list[dict[str, Any]]) -> str:
        return "; ".join(f"#{t['number']} {t['defense']} {t['clean']:.1%}/{t['robust']:.1%}" for t in rows) or "(empty)"

    return "\n".join([
        f"study {m['study']!r}: {m['trials']} completed trials, {m['front_verified']} verified",
        f"search cheap + verify strong: {m['cheap_then_verify_s']:7.1f} s of attacks "
        f"(search {m['search_attack_s']:.1f} s + verification {m['verify_attack_s']:.1f} s)",
        f"strong suite on every trial:  {m['strong_everywhere_s']:7.1f} s of attacks",
        f"ratio: {m['ratio']:.2f}",
        f"front as run (verified numbers, clean/robust): {front(m['front_as_run'])}",
        f"front with the strong suite everywhere:        {front(m['front_strong_everywhere'])}",
        f"same trials on both fronts: {'yes' if m['same_trials_on_front'] else 'no'}; "
        f"untrusted under the strong suite: {m['untrusted_strong']}",
    ])
