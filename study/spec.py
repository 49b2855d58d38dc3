"""Study specs: what to search, how to attack, where to run and record. Validated before Ray starts.

A spec is YAML (or a built-in name such as ``demo``). It fixes the dataset, backbone, training
recipe and attack suites, and names the defenses whose hyperparameters Optuna searches. Each
proposed point is turned into a complete :class:`~study.config.TrialConfig` by
:func:`trial_config_for` — the one place flat search parameters meet the typed trial config.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from study.config import (
    SEED_MAX,
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelConfig,
    TrainingConfig,
    TrialConfig,
    _format_error,
    _Strict,
    check_buildable,
    check_plain_data,
    read_yaml,
    show,
)
from study.reproducibility import threads_for_cpus
from study.stopping import EARLY_STOPPING_RULES, EarlyStopping, EarlyStoppingConfig, decide_early_stopping, milestones

SAMPLERS = ("tpe", "nsga2", "random")
OBJECTIVE_DIRECTIONS = {
    "clean_accuracy": "max",
    "robust_accuracy": "max",
    "train_seconds": "min",
    "num_parameters": "min",
}

# Far beyond any study this tool runs, but small enough for Ray, Optuna and numpy to take.
MAX_TRIALS = 1_000_000


def searchable_defenses() -> list[str]:
    """Registered defenses that have a search space, in the spaces' registration order."""
    from search_spaces import SPACES
    from study.plugins import defense_names

    registered = set(defense_names())
    return [name for name in SPACES if name in registered]


def default_defenses() -> list[str]:
    """What a spec that lists no defenses searches: every searchable defense its module marks so."""
    from defenses import get_defense

    return [name for name in searchable_defenses() if get_defense(name).in_default_study]


def _training_fields(defense: str) -> dict[str, str]:
    """Defense-space parameters that configure the training recipe, not the network (registry)."""
    from defenses import get_defense

    return dict(get_defense(defense).training_fields) if defense != "none" else {}


class SamplerConfig(_Strict):
    """The Optuna sampler that proposes trials."""

    name: Literal[SAMPLERS] = "tpe"  # type: ignore[valid-type]
    """tpe (multi-objective TPE, default) | nsga2 | random."""
    seed: int = Field(0, ge=0, le=SEED_MAX)
    """Sampler seed (a study with the same seed proposes the same first trials)."""
    n_startup_trials: int = Field(8, ge=0, le=MAX_TRIALS)
    """tpe: random trials before the model kicks in (the enqueued paper defaults count)."""
    population_size: int = Field(8, ge=2, le=MAX_TRIALS)
    """nsga2: population size."""


class ResourcesConfig(_Strict):
    """Resources one trial reserves on the cluster."""

    cpu: float = Field(1.0, gt=0, le=1024, allow_inf_nan=False)
    """CPUs per trial."""
    gpu: float = Field(0.0, ge=0, le=64, allow_inf_nan=False)
    """GPUs per trial; fractions (0.25) pack several trials on one GPU."""


class MlflowConfig(_Strict):
    """Where trials are recorded."""

    tracking_uri: str | None = None
    """None = MLFLOW_TRACKING_URI if set, else a SQLite store beside the study's results; or http://host:port."""
    log_models: bool = True
    """Log each completed trial's network as an MLflow PyTorch model (runs:/<run_id>/model)."""

    @field_validator("tracking_uri")
    @classmethod
    def _uri_form(cls, value: str | None) -> str | None:
        if value is None or (value.startswith("sqlite:///") and len(value) > len("sqlite:///")):
            return value
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(value)
            ok = parts.scheme in ("http", "https") and bool(parts.hostname) and not any(c.isspace() for c in value)
            parts.port  # noqa: B018 - raises ValueError on a port out of range or not a number
        except ValueError:
            ok = False
        if not ok:
            raise ValueError("must be http(s)://host:port of an MLflow server or sqlite:///path")
        return value
    experiment: str | None = None
    """Experiment name; None = the study name."""


_DEFENSE_FORMS = "a defense name (kap) or a mapping {name: kap, <parameter>: value, ...}"


def _defense_list_to_mapping(entries: list[Any]) -> dict[str, Any]:
    """``[kap, {name: kwta, gamma: 0.2}]`` -> ``{kap: {}, kwta: {gamma: 0.2}}``.

    A mapping entry fixes those parameters (they are not searched); the ranges are checked
    later against the defense's search space, which knows them.
    """
    mapping: dict[str, Any] = {}
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            name, overrides = entry, {}
        elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
            name, overrides = entry["name"], {k: v for k, v in entry.items() if k != "name"}
        elif isinstance(entry, dict):
            raise ValueError(f"entry {i} has no name: key; each entry is {_DEFENSE_FORMS}")
        else:
            raise ValueError(f"entry {i} is {show(entry)}; each entry is {_DEFENSE_FORMS}")
        if name in mapping:
            raise ValueError(f"defense {name!r} is listed twice")
        mapping[name] = overrides
    return mapping


def defense_entries(value: Any) -> Any:
    """A spec's ``defenses:`` as written (a list of names and entries, or a mapping) -> the mapping
    name -> fixed parameters; anything else is returned for validation to refuse. Needs no defense
    registry: the names are checked afterwards."""
    if isinstance(value, list):
        return _defense_list_to_mapping(value)
    if isinstance(value, dict):
        # `kap:` with nothing after it is YAML's None: the defense with no fixed parameters.
        return {name: {} if overrides is None else overrides for name, overrides in value.items()}
    return value


class StudySpec(_Strict):
    """A whole study."""

    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Study name: the results folder, the MLflow parent run and the Optuna study are named after it."""
    description: str = ""
    """Free text shown in MLflow."""
    plugins: list[str] = Field(default_factory=list)
    """Modules or .py files registering third-party defenses (docs/adding-a-defense.md); every worker loads them."""
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    """Backbone and width (the defense is searched: leave defense/defense_params unset)."""
    defenses: dict[str, dict[str, Any]] = Field(default_factory=lambda: {d: {} for d in default_defenses()})
    """Defenses to search: a list of names and {name: kap, dims: 1} entries (parameters given are fixed,
    not searched), or a mapping {kap: {dims: 1}, kwta: {}}."""
    include_baseline: bool = True
    """Also try the undefended model (defense none)."""
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    """The fixed training recipe every trial starts from."""
    search_training: dict[str, list[Any] | None] = Field(default_factory=dict)
    """Training parameters also searched: names from search_spaces.TRAINING_SPACE (e.g. [lr, recipe]),
    or a mapping that narrows them ({recipe: [standard, fast_at], adv_eps: [0.05, 0.2]}: a subset
    of the choices, or [low, high] inside the parameter's range)."""
    search_eval: EvalConfig = Field(default_factory=EvalConfig)
    """Cheap attacks that score every trial."""
    final_eval: EvalConfig = Field(
        default_factory=lambda: EvalConfig(attacks=[{"name": "autoattack"}])  # type: ignore[list-item]
    )
    """Strong attacks that re-evaluate the front after the search (search cheap, verify strong)."""
    verify: bool = True
    """Re-evaluate the front with final_eval. Off: the front stands on the search attacks alone."""
    paper_defaults_per_recipe: bool = False
    """Enqueue every defense's paper defaults once per searched training recipe (with
    search_training.recipe), so each defense is first seen with and without adversarial training."""
    verify_defense_fronts: bool = False
    """Also re-evaluate each defense's own front (not only the overall one): every defense's line of
    the short answer and of front_defenses.png then stands on the strong attacks."""
    clean_floor: float | None = Field(None, ge=0.0, le=1.0)
    """The short answer's clean-accuracy floor (a fraction). Unset: the study's best clean accuracy
    minus 5 points."""
    objectives: list[str] = Field(default_factory=lambda: ["clean_accuracy", "robust_accuracy"])
    """Objectives: clean_accuracy, robust_accuracy (max) and optionally train_seconds or num_parameters (min).
    The search optimises them on the validation split (Optuna's names: val_clean_accuracy, ...)."""
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    num_trials: int = Field(24, ge=1, le=MAX_TRIALS)
    """Trials to run, paper defaults (enqueued first) included."""
    concurrency: int = Field(2, ge=1, le=10_000)
    """Trials running at once."""
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    address: str | None = None
    """Ray address: host:port of a cluster's head, auto (Ray's own search) or local. Unset: RAY_ADDRESS,
    else a new local instance on 127.0.0.1. ``--address`` on the command line comes first."""
    storage: str = "results"
    """Directory for results (shared storage on a cluster), or an s3:// / gs:// URI (study.storage).
    Relative paths resolve against the working directory."""
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    max_failures: int = Field(2, ge=0, le=1000)
    """Retries of a trial whose process died (from its last checkpoint)."""
    checkpoint_every_seconds: float = Field(60.0, ge=0.0, le=86_400.0)
    """A trial saves a resumable checkpoint at the end of an epoch once this many seconds of its
    training have passed since its last one (0: every epoch). A failure loses at most this plus one
    epoch. Every epoch checkpoint makes Ray Tune snapshot the whole study (CheckpointConfig(num_to_keep)),
    whose cost grows with the number of trials, so short trials only save their final checkpoint."""
    seed: int = Field(0, ge=0, le=SEED_MAX)
    """Trial seed (data split, initialisation, attacks); the same for every trial so they compare."""

    @field_validator("early_stopping", mode="before")
    @classmethod
    def _early_stopping_shorthand(cls, value: Any) -> Any:
        if isinstance(value, bool):  # YAML reads a bare off / on (and false / true) as a bool
            return {"enabled": value}
        if isinstance(value, str):
            if value == "off":
                return {"enabled": False}
            if value == "auto":
                return {"enabled": "auto"}
            if value not in EARLY_STOPPING_RULES:
                raise ValueError(f"unknown rule {show(value)}; allowed: {', '.join(EARLY_STOPPING_RULES)}, auto, off "
                                 "or a mapping {enabled: true, rule: mo_asha, grace_epochs: 3, reduction_factor: 3}")
            return {"enabled": True, "rule": value}
        return value

    @field_validator("plugins")
    @classmethod
    def _load_plugins(cls, value: list[str]) -> list[str]:
        from study.plugins import load_plugin_field

        return load_plugin_field(value)

    @field_validator("defenses", mode="before")
    @classmethod
    def _entries_to_mapping(cls, value: Any) -> Any:
        return defense_entries(value)

    @field_validator("defenses")
    @classmethod
    def _known_defenses(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        allowed = searchable_defenses()
        for name in value:
            if name not in allowed:
                raise ValueError(f"unknown defense {show(name)}; allowed: {', '.join(allowed)}")
        return value

    @field_validator("model")
    @classmethod
    def _defense_is_searched(cls, value: ModelConfig) -> ModelConfig:
        if value.defense != "none" or value.defense_params:
            raise ValueError("the defense is searched: list it (and fixed parameters) under defenses:, not model:")
        return value

    @field_validator("address")
    @classmethod
    def _address_form(cls, value: str | None) -> str | None:
        if value is None or value == "auto":
            return value
        host, _, port = value.removeprefix("ray://").removeprefix("http://").rpartition(":")
        if not host or any(c.isspace() for c in host) or not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError("must be auto, host:port or ray://host:port (port 1-65535)")
        return value

    @field_validator("storage")
    @classmethod
    def _storage_path_or_uri(cls, value: str) -> str:
        from study.storage import validate_storage

        return validate_storage(value)

    @field_validator("search_training", mode="before")
    @classmethod
    def _names_to_mapping(cls, value: Any) -> Any:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            if len(set(value)) != len(value):
                raise ValueError("a training parameter is listed twice")
            return {name: None for name in value}
        return value

    @field_validator("search_training")
    @classmethod
    def _known_training_params(cls, value: dict[str, list[Any] | None]) -> dict[str, list[Any] | None]:
        from search_spaces import TRAINING_SPACE

        for name, narrowed in value.items():
            if name not in TRAINING_SPACE.param_names:
                raise ValueError(f"unknown training parameter {show(name)}; allowed: {', '.join(TRAINING_SPACE.param_names)}")
            if narrowed is not None:
                _training_override(name, narrowed)
        return value

    @field_validator("objectives")
    @classmethod
    def _known_objectives(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in OBJECTIVE_DIRECTIONS:
                raise ValueError(f"unknown objective {show(name)}; allowed: {', '.join(OBJECTIVE_DIRECTIONS)}")
        if value[:2] != ["clean_accuracy", "robust_accuracy"] or len(set(value)) != len(value):
            raise ValueError("objectives must start with clean_accuracy, robust_accuracy (then optionally one cost)")
        return value

    @model_validator(mode="after")
    def _something_to_search(self) -> StudySpec:
        if not self.defenses and not self.include_baseline:
            raise ValueError("nothing to search: list defenses or set include_baseline: true")
        return self

    @model_validator(mode="after")
    def _first_rung_before_the_last_epoch(self) -> StudySpec:
        # Early stopping written into the spec whose rungs (the scheduler's own milestones) all lie at
        # or after the last epoch would silently stop nothing. (auto with the default rung is off
        # below AUTO_MIN_EPOCHS anyway.)
        es, epochs = self.early_stopping, self.training.epochs
        if es.enabled is False or "epochs" in self.search_training:
            return self
        if es.grace_epochs is None and es.enabled == "auto":
            return self
        grace = self.stopping.grace_epochs  # the written rung or the default, as the study runs it
        if epochs < 2:
            raise ValueError("early stopping needs at least 2 epochs to stop anything (training.epochs is 1); "
                             "allowed: training.epochs >= 2, or early_stopping: off")
        if not milestones(grace, es.reduction_factor, epochs):
            raise ValueError(f"early_stopping.grace_epochs {grace} is not below training.epochs {epochs}, so no trial "
                             f"could be stopped; allowed: 1 to {epochs - 1} (or early_stopping: off)")
        return self

    @field_validator("data")
    @classmethod
    def _has_validation_split(cls, value: DataConfig) -> DataConfig:
        if value.val_fraction <= 0:
            # The search is scored on validation samples; without them it would read the test
            # split that the verification of the front must find untouched.
            raise ValueError("val_fraction: a study scores trials on the validation split; must be > 0 "
                             "and < 0.5 (default 0.15)")
        return value

    @property
    def stopping(self) -> EarlyStopping:
        """The early stopping this study runs. The spec keeps what its author wrote (``auto`` stays
        ``auto``, so changing ``num_trials`` on the command line decides again); every reader of the
        decision (scheduler, trial configs, the driver's log and MLflow) asks here."""
        return decide_early_stopping(self.early_stopping, self.num_trials, self.training.epochs,
                                     epochs_searched="epochs" in self.search_training)

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVE_DIRECTIONS[o] for o in self.objectives]

    @property
    def experiment(self) -> str:
        return self.mlflow.experiment or self.name

    def study_dir(self) -> Path:
        """Absolute results folder of this study (resolved before any trial changes directory);
        for a URI ``storage`` the driver's local working copy (study.storage)."""
        from study.storage import work_root

        return work_root(self.storage) / self.name

    def conditional_space(self) -> Any:
        """The search space: defense first, then its parameters (search_spaces.ConditionalSpace)."""
        from search_spaces import ConditionalSpace

        return ConditionalSpace(
            defenses=tuple(self.defenses),
            include_baseline=self.include_baseline,
            overrides={k: v for k, v in self.defenses.items() if v},
            training=self._training_space() if self.search_training else None,
            defaults_per_recipe=self.paper_defaults_per_recipe,
        )

    def _training_space(self) -> Any:
        """search_spaces.TRAINING_SPACE restricted to search_training (a DefenseSpace)."""
        import dataclasses

        from search_spaces import TRAINING_SPACE, DefenseSpace

        # Only the searched training parameters enter the space; the rest stay as fixed in
        # `training` (the recipe always: other parameters depend on it; fixed unless searched).
        keep = set(self.search_training) | {"recipe"}
        searched = DefenseSpace(
            name="training",
            params=tuple(p for p in TRAINING_SPACE.params if p.name in keep),
            defaults={n: v for n, v in TRAINING_SPACE.defaults.items() if n in keep},
            description=TRAINING_SPACE.description,
            paper=TRAINING_SPACE.paper,
        )
        overrides = {
            name: _training_override(name, narrowed)
            for name, narrowed in self.search_training.items()
            if narrowed is not None
        }
        if "recipe" not in self.search_training:
            overrides["recipe"] = self.training.recipe
        space = searched.restrict(overrides)
        # The enqueued defaults start from the training values the spec states (the user's
        # starting point) where the searched range holds them, else from the space's defaults.
        stated = self.training.model_dump(include=self.training.model_fields_set)
        inside = {n: v for n, v in stated.items() if n in space.param_names and space.param(n).contains(v)}
        return dataclasses.replace(space, defaults={**space.defaults, **inside})


def _training_override(name: str, narrowed: list[Any]) -> Any:
    """A spec's narrowing of a training parameter (a subset of its choices, or [low, high] inside its
    range) as the parameter DefenseSpace.restrict takes; ValueError naming search_training.<name> if it
    is not one."""
    from search_spaces import TRAINING_SPACE, Categorical, Int

    param = TRAINING_SPACE.param(name)
    if isinstance(param, Categorical):
        allowed = f"a non-empty subset of {list(param.choices)}"
    else:
        integers = "integers " if isinstance(param, Int) else ""
        allowed = f"[low, high] with {integers}{param.low:g} <= low <= high <= {param.high:g}"
    try:
        if isinstance(param, Categorical):
            override: Any = Categorical(name, tuple(narrowed))
        else:
            if len(narrowed) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in narrowed):
                raise ValueError(allowed)
            # YAML's 10.0 is the integer 10 (as pydantic reads it), 10.5 is no epoch count.
            low, high = (int(v) if isinstance(param, Int) and isinstance(v, float) and v.is_integer() else v for v in narrowed)
            override = type(param)(name, low, high, log=param.log, step=param.step)
        TRAINING_SPACE.restrict({name: override})
    except ValueError:
        # The space's reasons name one bound or choice; the user needs the whole allowed form.
        raise ValueError(f"search_training.{name}: {show(narrowed)} must be {allowed}") from None
    return override


def trial_config_for(spec: StudySpec, params: dict[str, Any], *, name: str = "trial") -> TrialConfig:
    """Turn one flat point of the search space into a complete, validated trial config.

    ``params`` holds ``defense`` plus ``<defense>.<param>`` and ``training.<param>`` keys
    (search_spaces.ConditionalSpace's layout); fixed overrides from the spec are applied under
    the searched values' names, so an exported config re-runs exactly.
    """
    defense = params.get("defense", "none")
    defense_params: dict[str, Any] = dict(spec.defenses.get(defense, {}))
    to_training = _training_fields(defense)
    training_updates: dict[str, Any] = {}
    for key, value in params.items():
        if key == "defense":
            continue
        scope, _, pname = key.partition(".")
        if scope == "training":
            training_updates[pname] = value
        elif scope == defense:
            target = to_training.get(pname)
            if target:
                training_updates[target] = value
            else:
                defense_params[pname] = value
    for pname, target in to_training.items():
        if pname in defense_params:
            training_updates[target] = defense_params.pop(pname)
    stopping = spec.stopping
    mo_asha = stopping.enabled and stopping.rule == "mo_asha"
    if mo_asha and spec.training.val_eps is None:
        # MO-ASHA compares trials on the per-epoch validation robust accuracy: at the search
        # epsilon, not each trial's own adv_eps (a trial trained at a small epsilon would look
        # robust and stop the ones trained for the objective's epsilon).
        training_updates.setdefault("val_eps", spec.search_eval.eps)
    # The per-epoch validation robust accuracy only where something reads it: MO-ASHA at its rungs
    # (the scheduler's, from the spec's epochs), and the epochs the spec lists. Otherwise the search
    # evaluation scores the trial, and on digits each skipped measurement saves 70 % of a fast-AT
    # epoch's cost. (A spec's unset list cannot mean "every epoch" as in a lone trial: the spec
    # travels as a full dump, and the trial config would not know whether it was set.)
    reads = milestones(stopping.grace_epochs, stopping.reduction_factor, spec.training.epochs) if mo_asha else []
    training_updates["val_robust_epochs"] = sorted({*reads, *(spec.training.val_robust_epochs or [])})
    training = spec.training.model_copy(update=training_updates)
    data = {
        "name": name,
        "seed": spec.seed,
        "plugins": list(spec.plugins),
        "data": spec.data.model_dump(),
        "model": {**spec.model.model_dump(), "defense": defense, "defense_params": defense_params},
        "training": training.model_dump(),
        "eval": spec.search_eval.model_dump(),
        # The threads each trial of the study trains with (Ray's per-worker rule), recorded so
        # that the trial applies them itself and an exported config re-runs with them too.
        "reproducibility": {"threads": threads_for_cpus(spec.resources.cpu)},
    }
    try:
        return TrialConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def _builtin_names() -> tuple[str, ...]:
    # Every YAML file shipped in study/specs is a built-in spec (the demo first): adding one is
    # adding a file. study/specs/bench holds benchmark workloads, which are not studies to run.
    names = sorted(p.name[:-5] for p in resources.files("study.specs").iterdir() if p.name.endswith(".yaml"))
    return tuple(sorted(names, key=lambda n: n != "demo"))


BUILTIN_SPECS = _builtin_names()


def _builtin_text(name: str) -> str:
    return resources.files("study.specs").joinpath(f"{name}.yaml").read_text()


def parse_spec(data: Any, *, source: str = "spec") -> StudySpec:
    """Validate a mapping into a StudySpec; one-line ConfigError naming the field otherwise."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a study spec must be a mapping, got {type(data).__name__}")
    from study.storage import find_credential_key

    try:
        check_plain_data(data)  # first: it bounds the nesting the credential search then walks
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    secret = find_credential_key(data)
    if secret:
        raise ConfigError(f"{source}: {secret}: credentials do not belong in a spec; set them in the environment "
                          "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS)")
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_format_error(err)}") from None
    from search_spaces import get_space

    # Fixed parameters are checked against the defense's own space: it knows names and ranges.
    for name, overrides in spec.defenses.items():
        try:
            get_space(name).restrict(overrides)
        except ValueError as err:
            reason = " ".join(str(err).split()).removeprefix(f"{name}: ")
            raise ConfigError(f"{source}: defenses.{name}: {reason}") from None
    # Every defense's paper default must build (catches out-of-range fixed overrides now).
    try:
        space = spec.conditional_space()
    except ValueError as err:
        raise ConfigError(f"{source}: defenses: {' '.join(str(err).split())}") from None
    for point in space.paper_default_configs():
        try:
            check_buildable(trial_config_for(spec, point))
        except ValueError as err:
            raise ConfigError(f"{source}: defenses.{point.get('defense')}: {' '.join(str(err).split())}") from None
    return spec


def bench_spec(workload: str, *, source: str, **updates: Any) -> StudySpec:
    """A benchmark's workload (``study/specs/bench/<workload>.yaml``) with ``updates`` applied.

    Top-level keys are replaced, except mappings, which are merged one level deep (so
    ``training={"epochs": 3}`` keeps the file's batch size).
    """
    import yaml

    data = yaml.safe_load(resources.files("study.specs").joinpath("bench", f"{workload}.yaml").read_text())
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return parse_spec(data, source=source)


def load_spec(spec_or_name: str) -> StudySpec:
    """A spec file path or the name of a built-in spec."""
    path = Path(spec_or_name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        data = read_yaml(path)
        if isinstance(data, dict) and isinstance(data.get("plugins"), list):
            # A plug-in file named in a spec is found next to the spec, wherever it is run from.
            from study.plugins import resolve_plugin

            try:
                data["plugins"] = [resolve_plugin(ref, base=path.parent) for ref in data["plugins"]]
            except ValueError as err:
                raise ConfigError(f"{path}: plugins: {err}") from None
        return parse_spec(data, source=str(path))
    if spec_or_name in BUILTIN_SPECS:
        import yaml

        return parse_spec(yaml.safe_load(_builtin_text(spec_or_name)), source=spec_or_name)
    raise ConfigError(
        f"{spec_or_name!r} is neither a spec file nor a built-in spec; built-ins: {', '.join(BUILTIN_SPECS)}"
    )
