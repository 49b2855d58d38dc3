"""The README's defense table: every defense at its paper defaults on digits, attacked honestly.

``robust-study bench defenses`` trains the undefended baseline and each defense with the demo
study's recipe at the search space's paper defaults, then attacks each with PGD-20, AutoAttack
(standard, 100 iterations) and Square (5000 queries) and prints clean / per-attack / worst-case
accuracy and the failed integrity flags as a markdown table.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from search_spaces import TRAINING_SPACE, Categorical
from study.config import TrialConfig
from study.spec import StudySpec, defense_entries, load_spec, trial_config_for

log = logging.getLogger(__name__)

BUDGET_PARAMS = ("adv_eps", "adv_steps")
"""Training parameters a row's label states whenever its recipe uses them: an adversarial
recipe's budget is part of what ran, whether the point set it or the spec did."""
ATTACKS = [{"name": "pgd", "steps": 20}, {"name": "autoattack"}, {"name": "square"}]


class UnknownDefense(ValueError):
    """``--defense`` or ``--recipe`` names no defense/recipe of the demo's space (raised before
    anything trains)."""


@functools.cache
def defense_choices() -> tuple[str, ...]:
    """What ``--defense`` accepts: the demo's defenses, ``none`` (the baseline) first.

    Read from the demo spec's text, not the parsed spec: parsing imports the defense registry
    (torch), and ``bench --help`` lists these names (it took 5-20 s that way). A test holds them
    equal to the parsed spec's choices. Cached: argparse asks a lazy choice list several times
    per parse (membership, then the error or help text).
    """
    from importlib import resources

    import yaml

    demo = yaml.safe_load(resources.files("study.specs").joinpath("demo.yaml").read_text())
    if "defenses" not in demo:  # every default defense: only the registry knows them
        return load_spec("demo").conditional_space().defense_choices()
    baseline = demo.get("include_baseline", StudySpec.model_fields["include_baseline"].default)
    return ("none",) * bool(baseline) + tuple(defense_entries(demo["defenses"]))


def recipes_using(param: str) -> frozenset[str]:
    """The recipes under which the training space makes ``param`` active (its ``when`` relation),
    so a recipe added to the space is labelled without an edit here."""
    # The full space, not the demo's restricted one: --recipe may name a recipe the demo does
    # not search, whose relations the restriction has pruned.
    recipe, budget = TRAINING_SPACE.param("recipe"), TRAINING_SPACE.param(param)
    if not isinstance(recipe, Categorical):
        raise TypeError(f"training.recipe is {recipe!r}, not a choice of recipes")
    return frozenset(r for r in recipe.choices if TRAINING_SPACE.is_active(budget, {"recipe": r}))


def recipe_choices() -> tuple[str, ...]:
    """What ``--recipe`` accepts: every training recipe a trial config allows."""
    from study.config import RECIPES

    return tuple(RECIPES)


def defense_rows(n_samples: int = 200, epochs: int | None = None, progress: bool = True,
                 only: str | None = None, recipe: str | None = None) -> list[dict[str, Any]]:
    """Train and attack the baseline and every defense at its paper defaults (sequentially).

    ``only`` keeps one defense's rows (``none`` for the baseline): rerunning one row after a
    change to that defense should not cost the whole table. ``recipe`` trains every kept row
    with that training recipe instead of the demo's (e.g. CAS with PGD-AT, as its paper trains
    it, where the demo can afford only fast AT); the rows' labels carry the recipe that ran.
    """
    from study.trial import run_trial

    spec = load_spec("demo")
    space = spec.conditional_space()
    points = space.paper_default_configs()
    # The command line refuses these already (argparse choices); this guards other callers.
    if only is not None:
        if only not in defense_choices():
            raise UnknownDefense(f"--defense: unknown defense {only!r}; one of: {', '.join(defense_choices())}")
        points = [p for p in points if p["defense"] == only]
    if recipe is not None:
        if recipe not in recipe_choices():
            raise UnknownDefense(f"--recipe: unknown recipe {recipe!r}; one of: {', '.join(recipe_choices())}")
        relabelled = []
        for p in points:
            p = {**p, "training.recipe": recipe}
            if f"{p['defense']}.recipe" in p:  # a defense that names its own recipe (CAS)
                p[f"{p['defense']}.recipe"] = recipe
            relabelled.append(p)
        points = relabelled
    rows = []
    seen: set[str] = set()
    for point in points:
        config = trial_config_for(spec, point, name=f"table-{point['defense']}")
        data = config.model_dump()
        data["eval"].update(n_samples=n_samples, attacks=ATTACKS, eps_curve=[0.1, 0.2, 0.3])
        if epochs is not None:
            data["training"]["epochs"] = epochs
        if recipe is not None:
            # After the config is built: a defense's recipe fixed by the demo spec (CAS: fast_at)
            # wins over the point's inside trial_config_for.
            data["training"]["recipe"] = recipe
        config = TrialConfig.model_validate(data)
        if point.get("training.recipe", config.training.recipe) != config.training.recipe:
            raise RuntimeError(f"row label says recipe={point['training.recipe']} but the trial would train with "
                               f"{config.training.recipe}")
        # Two points can build the same trial (with --recipe, a standard row relabelled fast_at and
        # the fast_at row at the spec's adv_eps, or two points relabelled alike): train it once,
        # labelled as the first.
        key = config.model_dump_json(exclude={"name"})
        if key in seen:
            continue
        seen.add(key)
        start = time.perf_counter()
        result = run_trial(config)
        per_attack = {a["name"]: a["accuracy"] for a in result.attacks}
        row = {
            "defense": point["defense"],
            "params": {
                **{k.split(".", 1)[1]: v for k, v in point.items() if k != "defense"},
                **{p: getattr(config.training, p) for p in BUDGET_PARAMS if config.training.recipe in recipes_using(p)},
            },
            "recipe": config.training.recipe,
            "status": result.status,
            "clean": result.clean_accuracy,
            "pgd": per_attack.get("pgd"),
            "autoattack": per_attack.get("autoattack"),
            "square": per_attack.get("square"),
            "robust": result.robust_accuracy,
            # What the schedule left in the model (k-WTA's gamma), beside the label's target.
            "reached": dict(getattr(result, "reached", None) or {}),
            "extra": {
                **{k: v for k, v in per_attack.items() if k not in ("pgd", "autoattack", "square")},
                # KAP protocol: the other configuration's number (noise on + EOT, or noise off)
                **({"other protocol": result.protocol.get("noise_eot" if result.protocol.get("deployed") == "no_noise"
                                                           else "no_noise")} if result.protocol else {}),
            },
            "protocol": result.protocol,
            "failed": [f["id"] + ("" if f.get("gate") else "(w)") for f in result.flags if not f.get("passed")],
            "trusted": result.trusted,
            "seconds": time.perf_counter() - start,
        }
        rows.append(row)
        if progress:
            print(format_rows([row], header=not rows[:-1]), flush=True)
    return rows


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def format_rows(rows: list[dict[str, Any]], header: bool = True) -> str:
    lines = []
    if header:
        lines += [
            "| defense (paper defaults) | recipe | clean | PGD-20 | AutoAttack | Square | worst case | other attacks | failed flags | trusted | s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    for r in rows:
        params = ", ".join([f"{k}={v}" for k, v in r["params"].items()]
                           + [f"{k}={v:g}" for k, v in r.get("reached", {}).items()])
        extra = ", ".join(f"{k} {_pct(v)}" for k, v in r["extra"].items()) or "–"
        lines.append(
            f"| {r['defense']} ({params or 'undefended'}) | {r['recipe']} | {_pct(r['clean'])} | {_pct(r['pgd'])} | "
            f"{_pct(r['autoattack'])} | {_pct(r['square'])} | {_pct(r['robust'])} | {extra} | "
            f"{', '.join(r['failed']) or '–'} | {'yes' if r['trusted'] else 'no'} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)
