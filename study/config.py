"""Typed trial configuration: the one place YAML becomes a validated ``TrialConfig``.

Every field has a one-line docstring (the cleanrl habit) and a default that runs the embedded
digits benchmark. Validation happens once, at load; nothing downstream re-checks user input.
Errors surface as :class:`ConfigError` with one line naming the field, the bad value and what is
allowed, so the CLI can print it and exit 2.
"""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from study.errors import ConfigError  # re-exported: `from study.config import ConfigError` keeps working

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "imagefolder")
BACKBONES = ("small_cnn", "resnet18", "resnet20", "vgg16")
RECIPES = ("standard", "noise", "fast_at", "pgd_at", "trades", "mart")
ATTACKS = (
    "fgsm",
    "pgd",
    "pgd_l2",
    "cw_linf",
    "deepfool",
    "square",
    "autoattack",
    "autoattack_rand",
    "eot_pgd",
    "cas_adaptive",
)


# numpy's RandomState (scikit-learn's splits, Optuna's samplers) takes seeds in 0..2**32-1.
SEED_MAX = 2**32 - 1
# Integers beyond 64 bits fit no field and overflow C code (torch, numpy, sockets) later.
_INT_LIMIT = 2**63


class _Strict(BaseModel):
    # Unknown keys are typos more often than not: reject them instead of silently ignoring.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class DataConfig(_Strict):
    """Which data, where it lives, and how it is split."""

    name: Literal[DATASETS] = "digits"  # type: ignore[valid-type]
    """Dataset name; `digits` is bundled with scikit-learn and needs no download."""
    data_dir: str | None = None
    """Directory holding torchvision datasets or an ImageFolder tree (train/ and val/ or test/)."""
    download: bool = False
    """Let torchvision download the dataset into data_dir (off: tests and offline clusters)."""
    val_fraction: float = Field(0.15, ge=0.0, lt=0.5)
    """Fraction of the training data held out for validation (early stopping, checks)."""
    test_fraction: float = Field(0.25, gt=0.0, lt=0.6)
    """Digits only: stratified fraction used as the test set (other datasets have their own)."""
    augment: bool | None = None
    """Random crop + flip for CIFAR-like data; None = the dataset's paper default."""
    train_subset: int | None = Field(None, ge=10)
    """Use only this many training samples (quick runs); None = all."""
    image_size: int | None = Field(None, ge=8, le=4096)
    """ImageFolder only: resize images to this square size."""
    num_workers: int = Field(0, ge=0, le=256)
    """DataLoader worker processes (0 = load in the trial's process)."""


class ModelConfig(_Strict):
    """The network and the defense placed in it."""

    backbone: Literal[BACKBONES] = "small_cnn"  # type: ignore[valid-type]
    """Backbone architecture."""
    width: int = Field(1, ge=1, le=16)
    """Channel multiplier."""
    head: Literal["gap", "flatten"] = "gap"
    """gap: average-pool the last feature map | flatten: flatten it unpooled (vgg16 only, inputs >= 32x32:
    the TopKConv paper's VGG-16 head, 25,088 inputs at 224x224)."""
    defense: str = "none"
    """A registered defense placed at its paper sites; `none` is the undefended baseline."""
    defense_params: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the defense (constructor and placement), e.g. {kernel_size: 3}."""

    @field_validator("defense")
    @classmethod
    def _registered_defense(cls, value: str) -> str:
        # The registry, not a list here: a plug-in defense is as valid as a built-in one.
        allowed = allowed_defenses()
        if value not in allowed:
            raise ValueError(f"{value!r} is not allowed; expected one of {', '.join(map(repr, allowed))}")
        return value


class TrainingConfig(_Strict):
    """The training recipe and optimiser."""

    recipe: Literal[RECIPES] = "standard"  # type: ignore[valid-type]
    """standard | noise (Gaussian input noise) | fast_at (FGSM-RS, Wong et al.) | pgd_at (Madry) |
    trades (Zhang et al.) | mart (Wang et al.)."""
    epochs: int = Field(15, ge=1, le=1000)
    """Training epochs."""
    batch_size: int = Field(64, ge=1, le=1_000_000)
    """Mini-batch size."""
    optimizer: Literal["sgd", "adam"] = "sgd"
    """Optimiser."""
    lr: float = Field(0.05, gt=0.0, le=10.0)
    """Peak learning rate."""
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    """SGD momentum."""
    weight_decay: float = Field(5e-4, ge=0.0, le=0.1)
    """L2 weight decay."""
    defense_weight_decay: bool = True
    """Decay the parameters a defense declares its own too (KAF's alpha, dictionary, bandwidth).
    false: only the network's layers, as the KAF thesis trains."""
    schedule: Literal["onecycle", "multistep", "cosine", "constant"] = "onecycle"
    """Learning-rate schedule (one-cycle is the fast-AT recipe's)."""
    milestones: list[float] = Field(default_factory=lambda: [0.5, 0.75])
    """multistep: fractions of the epochs at which the LR is divided by 10."""
    noise_sigma: float = Field(0.1, ge=0.0, le=1.0)
    """recipe `noise`: std of the Gaussian noise added to training inputs."""
    adv_eps: float = Field(0.2, gt=0.0, le=1.0)
    """Adversarial-training epsilon (L-inf, inputs in [0,1])."""
    adv_steps: int = Field(7, ge=1, le=100)
    """PGD steps for pgd_at / trades / mart."""
    adv_step_size: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    """PGD step size; None = 2.5*eps/steps (Madry); fast_at always uses 1.25*eps (Wong et al.)."""
    trades_beta: float = Field(6.0, ge=0.0, le=100.0)
    """TRADES / MART regularisation weight."""
    cas_beta: float | None = Field(None, ge=0.0, le=100.0)
    """CAS auxiliary-loss weight; None = defense_params['beta'] or the paper's 2."""
    early_stopping: bool = True
    """pgd_at: keep the epoch with the best validation robust accuracy (Rice et al. 2020)."""
    val_eps: float | None = Field(None, gt=0.0, le=1.0)
    """Epsilon of the per-epoch validation robust accuracy; None = adv_eps (adversarial recipes only).
    Set, it is measured for every recipe: a study's mo_asha early stopping sets it to the search epsilon so
    that trials trained at different adv_eps compare on the objective's epsilon."""
    val_robust_epochs: list[int] | None = None
    """Epochs (counted from 1) after which that robust accuracy is measured; None = after every epoch.
    It is a PGD-10 on up to 500 validation samples: on all of digits 0.37 s, a fast-AT epoch 0.51 s.
    pgd_at's early stopping measures every epoch regardless. In a study spec: the epochs to measure
    besides the ones the study reads (its MO-ASHA rungs); unset, only those."""
    grad_clip: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    """Clip the gradient norm (None = off)."""
    checkpoint_every: int = Field(1, ge=1)
    """Write a resumable checkpoint every this many epochs (when a checkpoint dir is given)."""

    @field_validator("val_robust_epochs")
    @classmethod
    def _epochs_counted_from_one(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        for e in value:
            if e < 1:
                raise ValueError(f"epoch {e} must be >= 1 (epochs are counted from 1)")
        return sorted(set(value))

    @field_validator("milestones")
    @classmethod
    def _milestones_in_range(cls, value: list[float]) -> list[float]:
        for m in value:
            if not 0.0 < m < 1.0:
                raise ValueError(f"milestone {m} must be a fraction of the epochs in (0, 1)")
        return sorted(value)


class AttackConfig(_Strict):
    """One attack of the evaluation suite; unset fields take the faithful defaults."""

    name: Literal[ATTACKS]  # type: ignore[valid-type]
    """Attack name."""
    eps: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    """Perturbation budget; None = the evaluation's eps (L2 attacks: see eps_l2)."""
    steps: int | None = Field(None, ge=1, le=100_000)
    """Iterations; None = the attack's faithful default (PGD 20, AutoAttack 100)."""
    step_size: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    """Step size; None = eps/4 for PGD (docs/evaluation.md)."""
    restarts: int = Field(1, ge=1, le=1000)
    """Random restarts."""
    queries: int = Field(5000, ge=1, le=10_000_000)
    """Square: query budget (AutoAttack standard: 5000)."""
    eot_samples: int = Field(20, ge=1, le=10_000)
    """EOT samples for stochastic models (AutoAttack rand: 20)."""


class EvalConfig(_Strict):
    """How the trained model is attacked and checked."""

    eps: float = Field(0.2, gt=0.0, le=1.0)
    """L-inf budget on [0,1] inputs. Digits default 0.2: an undefended model is broken there."""
    eps_l2: float = Field(1.0, gt=0.0, allow_inf_nan=False)
    """L2 budget for L2 attacks."""
    n_samples: int = Field(500, ge=1)
    """Test samples attacked (the first n of a fixed, seeded order)."""
    batch_size: int = Field(256, ge=1, le=1_000_000)
    """Evaluation batch size."""
    attacks: list[AttackConfig] = Field(default_factory=lambda: [AttackConfig(name="pgd")])
    """The suite; robust accuracy is the per-sample worst case over it."""
    eps_curve: list[float] = Field(default_factory=lambda: default_eps_curve(0.2))
    """Epsilons of the accuracy-vs-eps curve (PGD, checked by R1); 0 is always added. Unset: eps/2,
    eps, 2*eps (capped at 1); [] skips R1."""
    randomized: Literal["single_pass", "smoothed"] = "single_pass"
    """Stochastic models: single_pass scores the deployed classifier (expected accuracy over
    `passes` forward passes); smoothed scores a different, majority-vote classifier."""
    passes: int = Field(10, ge=2, le=1000)
    """Stochastic models: forward passes per expected-accuracy estimate (or per smoothed vote)."""
    add_eot: bool = True
    """Stochastic models: add an EOT attack when the suite has none; off leaves the suite as
    given, and R12 then fails."""
    protocol_arms: Literal["both", "deployed"] = "both"
    """KAP models with activation noise: `both` also attacks the configuration that is not deployed
    (noise off vs. noise on under EOT, the paper reports both); `deployed` attacks only the model
    as deployed, which is what decides the trial's numbers, at a fraction of the cost."""
    checks: bool = True
    """Run the integrity checks (docs/evaluation.md) and set `trusted`."""
    check_samples: int = Field(100, ge=10)
    """Samples used by the costlier integrity checks (large-eps, unbounded, Square)."""

    @model_validator(mode="before")
    @classmethod
    def _curve_follows_eps(cls, data: Any) -> Any:
        # The default curve brackets the configured eps, whatever the dataset's convention.
        if isinstance(data, dict) and "eps_curve" not in data:
            eps = data.get("eps", 0.2)
            if isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 < eps <= 1:
                return {**data, "eps_curve": default_eps_curve(float(eps))}
        return data

    @field_validator("attacks")
    @classmethod
    def _some_attack(cls, value: list[AttackConfig]) -> list[AttackConfig]:
        if not value:
            raise ValueError("robust accuracy needs at least one attack")
        return value

    @field_validator("eps_curve")
    @classmethod
    def _curve_in_range(cls, value: list[float]) -> list[float]:
        for eps in value:
            if not 0.0 < eps <= 1.0:  # NaN fails too
                raise ValueError(f"eps {eps} must be in (0, 1] (inputs are in [0, 1])")
        return value


def default_eps_curve(eps: float) -> list[float]:
    """R1's default curve: half, once and twice the eval eps (at most 1, inputs are in [0, 1])."""
    return sorted({round(eps / 2, 6), eps, min(round(2 * eps, 6), 1.0)})


ENVIRONMENT_KEYS = ("device", "torch", "torchvision", "torchattacks", "numpy")


class ReproducibilityConfig(_Strict):
    """What decides the numbers besides the fields above; applied while the trial runs
    (docs/reproducibility.md)."""

    threads: int | None = Field(None, ge=1, le=4096)
    """torch intra-op threads (the count changes the rounding, hence the weights); None = torch's
    default here. A study sets one per reserved CPU; a saved config records the count used."""
    deterministic: bool = True
    """torch.use_deterministic_algorithms (warn-only) and cuDNN deterministic, benchmark off."""
    environment: dict[str, str] = Field(default_factory=dict)
    """Device (CPU instruction set or GPU model) and library versions the numbers came from
    (filled in by a run); a re-run elsewhere warns."""

    @field_validator("environment")
    @classmethod
    def _known_keys(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(ENVIRONMENT_KEYS))
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(ENVIRONMENT_KEYS)}")
        return value


class TrialConfig(_Strict):
    """Everything one trial needs; a trial is a pure function of this."""

    name: str = "trial"
    """Free-form label."""
    seed: int = Field(0, ge=0, le=SEED_MAX)
    """Seeds data split, initialisation, training order and attacks."""
    device: str = "auto"
    """auto (cuda when available) | cpu | cuda | cuda:N."""
    plugins: list[str] = Field(default_factory=list)
    """Modules or .py files that register third-party defenses; loaded before `model` is read."""
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    reproducibility: ReproducibilityConfig = Field(default_factory=ReproducibilityConfig)

    @field_validator("plugins")
    @classmethod
    def _load_plugins(cls, value: list[str]) -> list[str]:
        from study.plugins import load_plugin_field

        return load_plugin_field(value)

    @field_validator("device")
    @classmethod
    def _device_form(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"device {value!r} must be auto, cpu, cuda or cuda:N")

    @model_validator(mode="after")
    def _defense_params_build(self) -> TrialConfig:
        # Unknown keys are caught here; ranges are checked by the constructors (check_buildable).
        from defenses import DEFENSE_PARAMS

        defense = self.model.defense
        allowed = DEFENSE_PARAMS.get(defense, ()) if defense != "none" else ()
        unknown = sorted(set(self.model.defense_params) - set(allowed))
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {', '.join(unknown)} for defense {defense!r}; "
                f"allowed: {', '.join(allowed) or 'none'}"
            )
        return self


def allowed_defenses() -> list[str]:
    """``none`` and every registered defense (installed plug-ins included)."""
    from study.plugins import defense_names

    return ["none", *defense_names()]


_SHOW = reprlib.Repr()  # keyword arguments only from Python 3.12
_SHOW.maxstring, _SHOW.maxother, _SHOW.maxlong = 60, 60, 40
_SHOW.maxlist, _SHOW.maxtuple, _SHOW.maxdict, _SHOW.maxlevel = 6, 6, 4, 2


def show(value: Any) -> str:
    """A user's value for an error message: its repr, bounded (one short line, whatever it is)."""
    return _SHOW.repr(value)


def _loc(parts: Any) -> str:
    # Keys come from the user: a key with a newline or a space is shown quoted, on one line.
    return ".".join(p if isinstance(p, str) and p.isprintable() and " " not in p else show(p) for p in map(_key, parts))


def _key(part: Any) -> Any:
    return str(part) if isinstance(part, int) else part


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = _loc(first["loc"]) or "config"
    msg = " ".join(first["msg"].split())
    if first["type"] == "extra_forbidden":
        return f"{loc}: unknown key"
    if first["type"] == "missing":  # the input shown would be the whole enclosing mapping
        return f"{loc}: required"
    if first["type"] == "literal_error":
        return f"{loc}: {show(first.get('input'))} is not allowed; {msg.removeprefix('Input should be ')}"
    msg = msg.removeprefix("Value error, ")
    return f"{loc}: {msg} (got {show(first.get('input'))})" if "input" in first and loc != "config" else f"{loc}: {msg}"


def check_plain_data(data: Any) -> None:
    """Refuse what YAML can hold but no field should see: text that is not UTF-8 (lone
    surrogates from escapes), NUL characters (they end paths in C) and integers beyond 64 bits.

    Iterative and visiting each container once: YAML aliases can share (or nest) one list many
    times over, and a recursive walk or a re-visit would take forever on an alias bomb.
    """
    stack: list[tuple[Any, str]] = [(data, "")]
    seen: set[int] = set()
    while stack:
        value, loc = stack.pop()
        if isinstance(value, (dict, list)):
            if id(value) in seen:
                continue
            seen.add(id(value))
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                where = f"{loc}.{_loc([key])}" if loc else _loc([key])
                if isinstance(key, str):
                    _check_text(key, where)
                stack.append((item, where))
        elif isinstance(value, str):
            _check_text(value, loc or "config")
        elif isinstance(value, int) and not isinstance(value, bool) and not -_INT_LIMIT <= value < _INT_LIMIT:
            raise ConfigError(f"{loc or 'config'}: an integer of {len(str(abs(value)))} digits is far out of range")


def _check_text(text: str, loc: str) -> None:
    if "\x00" in text:
        raise ConfigError(f"{loc}: text must not contain NUL characters (got {show(text)})")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{loc}: text must be valid Unicode (got {show(text)})") from None


def parse_trial_config(data: dict[str, Any] | None) -> TrialConfig:
    """Validate a mapping into a ``TrialConfig``; raises :class:`ConfigError` (one line)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"a trial config must be a mapping, got {type(data).__name__}")
    check_plain_data(data)
    try:
        config = TrialConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None
    try:
        check_buildable(config)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"model.defense_params: {err}") from None
    return config


def check_buildable(config: TrialConfig) -> None:
    """Build the model once (CPU, discarded) so the constructors' range checks run at load time."""
    from defenses import build_model
    from defenses.build import check_head
    from study.data import dataset_info

    info = dataset_info(config.data)
    try:
        check_head(config.model.backbone, config.model.head, info.image_size)
    except ValueError as err:
        raise ConfigError(f"model.head: {err}") from None
    # The constructors own the ranges: one source of truth.
    build_model(
        config.model.backbone,
        num_classes=info.num_classes,
        in_channels=info.channels,
        defense=None if config.model.defense == "none" else config.model.defense,
        defense_params=dict(config.model.defense_params),
        width=config.model.width,
        head=config.model.head,
        input_size=info.image_size,
    )


def read_yaml(path: str | Path) -> Any:
    """Read YAML with the safe loader; one-line ConfigError on missing file or bad syntax."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        # Bytes: the YAML reader checks the encoding itself (UTF-8, or UTF-16 with a BOM).
        return yaml.safe_load(path.read_bytes())
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror or err})") from None
    except yaml.reader.ReaderError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.position}: {err.reason})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise ConfigError(f"{path}:{where} malformed YAML ({problem})") from None
    except RecursionError:
        raise ConfigError(f"{path}: malformed YAML (nested too deeply)") from None


def load_trial_config(path: str | Path) -> TrialConfig:
    """Load and validate a trial config YAML file."""
    return parse_trial_config(read_yaml(path))


def dump_trial_config(config: TrialConfig) -> str:
    """The complete config as YAML (every default written out, so it re-runs as is)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _commented(model: BaseModel, indent: int) -> list[str]:
    lines: list[str] = []
    pad = "  " * indent
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        doc = " ".join((info.description or "").split())
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:" + (f"  # {doc}" if doc else ""))
            lines.extend(_commented(value, indent + 1))
        elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
            lines.append(f"{pad}{name}:" + (f"  # {doc}" if doc else ""))
            for item in value:
                dumped = {k: v for k, v in item.model_dump(mode="json").items() if v is not None}
                lines.append(f"{pad}  - {_yaml_scalar(dumped)}")
        else:
            dumped = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
            lines.append(f"{pad}{name}: {_yaml_scalar(dumped)}" + (f"  # {doc}" if doc else ""))
    return lines


def commented_default_yaml() -> str:
    """The complete default trial config, each field commented with its docstring."""
    header = [
        "# robust-study trial config (defaults: digits, small_cnn, no defense, standard training, PGD).",
        "# Run it with: robust-study trial this.yaml --out results/my-trial",
    ]
    return "\n".join(header + _commented(TrialConfig(), 0)) + "\n"
