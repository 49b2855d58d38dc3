"""Search spaces: validated parameters, per-defense spaces, the conditional define-by-run space."""

from __future__ import annotations

import json
import math
import pickle
import random

import pytest

from search_spaces import (
    BASELINE,
    NON_CONSTRUCTOR_PARAMS,
    SPACES,
    TRAINING_SPACE,
    Categorical,
    ConditionalSpace,
    DefenseSpace,
    Fixed,
    Float,
    Int,
    get_space,
)

ALL_SPACES = [*SPACES.values(), TRAINING_SPACE]
DEFENSES = ("kap", "kwta", "kaf", "topkconv", "dynamic_k", "cas", "noise")


# -- fake trials (optuna-like, no optuna) ----------------------------------------------------


class FakeTrial:
    """Answers suggest_* calls with ``pick`` and records every request.

    ``distributions`` may be shared between trials of one "study" to check what Optuna
    requires across trials: a categorical keeps its choices, a numeric its log flag.
    """

    def __init__(self, pick, distributions=None, forced=None):
        self.pick = pick
        self.requests: dict[str, tuple] = {}
        self.distributions = {} if distributions is None else distributions
        self.forced = forced or {}

    def _record(self, name, dist):
        assert name not in self.requests, f"{name} suggested twice in one trial"
        self.requests[name] = dist
        seen = self.distributions.setdefault(name, dist)
        assert seen[0] == dist[0], f"{name}: kind changed {seen} -> {dist}"
        if dist[0] == "categorical":
            assert seen == dist, f"{name}: categorical choices changed {seen} -> {dist}"
        else:
            assert seen[3] == dist[3], f"{name}: log flag changed {seen} -> {dist}"

    def suggest_float(self, name, low, high, *, step=None, log=False):
        assert low <= high, (name, low, high)
        self._record(name, ("float", low, high, log, step))
        return self.forced.get(name, self.pick("float", low, high, log, step, None))

    def suggest_int(self, name, low, high, *, step=1, log=False):
        assert low <= high, (name, low, high)
        assert isinstance(low, int) and isinstance(high, int)
        self._record(name, ("int", low, high, log, step))
        return self.forced.get(name, self.pick("int", low, high, log, step, None))

    def suggest_categorical(self, name, choices):
        self._record(name, ("categorical", tuple(choices)))
        return self.forced.get(name, self.pick("categorical", None, None, None, None, choices))


def pick_low(kind, low, high, log, step, choices):
    return choices[0] if kind == "categorical" else low


def pick_high(kind, low, high, log, step, choices):
    return choices[-1] if kind == "categorical" else high


def random_picker(seed):
    rng = random.Random(seed)

    def pick(kind, low, high, log, step, choices):
        if kind == "categorical":
            return rng.choice(choices)
        if kind == "int":
            return rng.choice(range(low, high + 1, step))
        if log:
            return math.exp(rng.uniform(math.log(low), math.log(high)))
        if step is not None:
            return low + rng.randrange(round((high - low) / step) + 1) * step
        return rng.uniform(low, high)

    return pick


# -- built-in spaces -------------------------------------------------------------------------


def test_registry_holds_every_defense_and_get_space_rejects_unknown():
    assert tuple(SPACES)[: len(DEFENSES)] == DEFENSES  # built-ins first; plug-ins register after
    assert all(get_space(n) is SPACES[n] and SPACES[n].name == n for n in DEFENSES)
    with pytest.raises(ValueError, match=r"unknown defense 'kwt'.*'kwta'"):
        get_space("kwt")
    with pytest.raises(ValueError, match="allowed"):
        get_space(BASELINE)


@pytest.mark.parametrize("space", ALL_SPACES, ids=lambda s: s.name)
def test_every_space_has_valid_complete_paper_defaults(space):
    assert set(space.defaults) == set(space.param_names)
    assert space.validate(space.defaults) == space.defaults
    assert space.description and space.paper
    json.dumps(space.to_dict())


@pytest.mark.parametrize("name", DEFENSES)
def test_non_constructor_params_are_params_of_their_space(name):
    assert set(NON_CONSTRUCTOR_PARAMS[name]) <= set(SPACES[name].param_names)


def test_paper_defaults_are_the_documented_ones():
    assert SPACES["kap"].defaults == {
        "kernel_size": 3, "stride": 1, "sigma": 0.1, "dims": 2, "mode": "avg", "widen": "area"}
    assert SPACES["kwta"].defaults["gamma"] == 0.1
    assert SPACES["kwta"].defaults["gamma_start"] == 0.2
    assert SPACES["kaf"].defaults["dictionary_size"] == 20
    assert SPACES["topkconv"].defaults == {
        "k": 0.1, "criterion": "max", "layers": 2, "dynamic_k_heads": True,
        "k_dense_hidden": 250 / 25088, "k_dense_last": 10 / 512}
    assert SPACES["dynamic_k"].defaults == {"k": 0.02}
    assert SPACES["cas"].defaults == {"beta": 2.0, "placement": "last2", "recipe": "pgd_at"}
    assert TRAINING_SPACE.defaults["recipe"] == "standard"
    assert TRAINING_SPACE.param("lr").log and TRAINING_SPACE.param("weight_decay").log


# -- parameters ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Float("x", 1.0, 0.0), "low=1.0 must be <= high=0.0"),
        (lambda: Float("x", 0.0, math.inf), "high=inf must be a finite"),
        (lambda: Float("x", 0.0, 1.0, log=True), "log=True needs low > 0"),
        (lambda: Float("x", 0.1, 1.0, log=True, step=0.1), "cannot be combined"),
        (lambda: Float("x", 0.0, 1.0, step=0.3), "multiple of step=0.3"),
        (lambda: Float("x", 0.0, 1.0, step=-0.5), "step=-0.5 must be a positive"),
        (lambda: Float("x", True, 2.0), "low=True"),
        (lambda: Float("a.b", 0.0, 1.0), "'a.b' must be a Python identifier"),
        (lambda: Float("", 0.0, 1.0), "identifier"),
        (lambda: Int("n", 1.5, 3), "low=1.5 must be an integer"),
        (lambda: Int("n", 5, 1), "low=5 must be <= high=1"),
        (lambda: Int("n", 1, 5, step=0), "step=0 must be an integer >= 1"),
        (lambda: Int("n", 0, 8, log=True), "log=True needs low >= 1"),
        (lambda: Int("n", 1, 9, log=True, step=2), "step == 1"),
        (lambda: Int("n", 1, 4, step=2), "multiple of step=2"),
        (lambda: Categorical("c", ()), "non-empty"),
        (lambda: Categorical("c", ("a", "b", "a")), "'a' appears more than once"),
        (lambda: Categorical("c", ([1], 2)), r"choice \[1\]"),
        (lambda: Categorical("c", (math.nan,)), "choice nan"),
        (lambda: Categorical("c", ("a",), when=("d",)), "when=.* must be"),
        (lambda: Fixed("f", [1, 2]), r"fixed value \[1, 2\]"),
        (lambda: Int("n", 1, 4, at_most="n"), "another parameter"),
    ],
)
def test_bad_param_definitions_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_float_contains_and_validate():
    p = Float("sigma", 0.0, 0.3)
    assert p.contains(0) and p.contains(0.3) and p.contains(0.15)
    for bad in (-0.01, 0.31, math.nan, math.inf, True, "0.1", None):
        assert not p.contains(bad)
    with pytest.raises(ValueError, match=r"sigma=0.5 must be a real number in \[0.0, 0.3\]"):
        p.validate(0.5)
    grid = Float("g", 0.0, 1.0, step=0.25)
    assert grid.contains(0.75) and not grid.contains(0.7)
    with pytest.raises(ValueError, match=r"g=0.7 .*grid of step 0.25"):
        grid.validate(0.7)


def test_int_and_categorical_do_not_confuse_bools_and_numbers():
    n = Int("kernel_size", 1, 4)
    assert n.contains(3) and not n.contains(3.0) and not n.contains(True) and not n.contains(5)
    with pytest.raises(ValueError, match=r"kernel_size=5 must be an integer in \[1, 4\]"):
        n.validate(5)
    switch = Categorical("trainable_dictionary", (False, True))
    assert switch.contains(False) and not switch.contains(0) and not switch.contains(1)
    dims = Categorical("dims", (1, 2))
    assert dims.contains(2) and not dims.contains(True)
    assert Categorical("c", (1, True)).choices == (1, True)  # distinct, not duplicates
    with pytest.raises(ValueError, match=r"mode='sum' must be one of \('avg', 'max'\)"):
        Categorical("mode", ("avg", "max")).validate("sum")
    assert Categorical("c", ["a", "b"]).choices == ("a", "b")


# -- DefenseSpace ----------------------------------------------------------------------------


def _even_total(config):
    # Module-level (not a lambda) so spaces using it pickle.
    return (config["a"] + config["b"]) % 2 == 0


A, B, C = Int("a", 0, 3), Int("b", 0, 3), Categorical("c", ("x", "y"))


@pytest.mark.parametrize(
    ("params", "defaults", "extra", "match"),
    [
        ((A, Int("a", 0, 3)), {"a": 1}, {}, "'a' appears more"),
        ((A, B), {"a": 1}, {}, r"miss .*\['b'\]"),
        ((A,), {"a": 7}, {}, "invalid defaults: a=7"),
        ((A,), {"a": 1, "z": 1}, {}, r"unknown parameter\(s\) \['z'\]"),
        ((Int("b", 0, 3, at_most="a"), A), {"a": 1, "b": 1}, {}, "listed before it"),
        ((A, Int("b", 5, 9, at_most="a")), {"a": 1, "b": 5}, {}, "can never be"),
        ((C, Int("b", 0, 3, at_most="c")), {"c": "x", "b": 1}, {}, "non-numeric"),
        ((A, Int("b", 0, 3, when=("a", (1,)))), {"a": 1, "b": 1}, {}, "must name a categorical"),
        ((C, Int("b", 0, 3, when=("c", ("z",)))), {"c": "x", "b": 1}, {},
         r"\['z'\] are not choices"),
        ((A, B), {"a": 1, "b": 0}, {"constraints": (("a + b even", _even_total),)},
         r"violates constraint: a \+ b even"),
        ((A,), {"a": 1}, {"constraints": (("no callable", 3),)},
         r"must be a \(description, callable\) pair"),
        ((A,), {"a": 1}, {"name": "bad name"}, "identifier"),
    ],
)
def test_bad_space_definitions_raise(params, defaults, extra, match):
    kwargs = {"name": "toy", "params": params, "defaults": defaults, **extra}
    with pytest.raises(ValueError, match=match):
        DefenseSpace(**kwargs)


def test_validate_rejects_unknown_missing_out_of_range_and_bad_choice():
    kap = SPACES["kap"]
    good = dict(kap.defaults)
    with pytest.raises(
        ValueError, match=r"unknown parameter\(s\) \['kernel'\]; allowed: \['kernel_size'"
    ):
        kap.validate({**good, "kernel": 3})
    with pytest.raises(ValueError, match="missing parameter 'mode'"):
        kap.validate({k: v for k, v in good.items() if k != "mode"})
    with pytest.raises(ValueError, match=r"sigma=0.5 must be a real number in \[0.0, 0.3\]"):
        kap.validate({**good, "sigma": 0.5})
    with pytest.raises(ValueError, match=r"dims=3 must be one of \(1, 2\)"):
        kap.validate({**good, "dims": 3})
    with pytest.raises(ValueError, match="must be a dict"):
        kap.validate([("kernel_size", 3)])


def test_kap_stride_constraint():
    kap = SPACES["kap"]
    assert "stride <= kernel_size" in kap.constraint_descriptions()
    kap.validate({**kap.defaults, "kernel_size": 2, "stride": 2})
    with pytest.raises(ValueError, match="stride=3 must be <= kernel_size=2"):
        kap.validate({**kap.defaults, "kernel_size": 2, "stride": 3})


def test_callable_constraints_are_checked():
    space = DefenseSpace("toy", (Int("a", 0, 3), Int("b", 0, 3)), {"a": 1, "b": 1},
                         constraints=(("a + b even", _even_total),))
    space.validate({"a": 2, "b": 0})
    with pytest.raises(ValueError, match="a \\+ b even"):
        space.validate({"a": 2, "b": 1})
    assert space.constraint_descriptions() == ["a + b even"]
    assert pickle.loads(pickle.dumps(space)).validate({"a": 3, "b": 1}) == {"a": 3, "b": 1}


def test_conditional_params_of_the_training_space():
    base = {"recipe": "standard", "lr": 0.1, "weight_decay": 5e-4, "epochs": 15}
    TRAINING_SPACE.validate(base)  # inactive noise/adversarial settings may be absent
    TRAINING_SPACE.validate({**base, "noise_sigma": 0.2})  # ...or present (and checked)
    with pytest.raises(ValueError, match=r"noise_sigma=0\.9"):
        TRAINING_SPACE.validate({**base, "noise_sigma": 0.9})
    with pytest.raises(ValueError, match="missing parameter 'noise_sigma'"):
        TRAINING_SPACE.validate({**base, "recipe": "noise"})
    trades = TRAINING_SPACE.suggest(FakeTrial(pick_low), given={"recipe": "trades"})
    assert {"adv_eps", "adv_steps", "trades_beta"} <= set(trades) and "noise_sigma" not in trades
    fast = TRAINING_SPACE.suggest(FakeTrial(pick_low), given={"recipe": "fast_at"})
    assert "adv_eps" in fast and "adv_steps" not in fast


def test_param_lookup():
    assert SPACES["kaf"].param("init").choices == ("random", "relu", "elu", "swish")
    with pytest.raises(ValueError, match=r"unknown parameter 'D'; allowed: \['dictionary_size'"):
        SPACES["kaf"].param("D")


# -- restrict --------------------------------------------------------------------------------


def test_restrict_fixes_values_after_validating_them():
    kap = SPACES["kap"]
    fixed = kap.restrict({"dims": 1, "sigma": 0.2})
    assert isinstance(fixed.param("dims"), Fixed) and fixed.defaults["sigma"] == 0.2
    assert kap.defaults["sigma"] == 0.1 and isinstance(kap.param("dims"), Categorical)
    trial = FakeTrial(pick_low)
    values = fixed.suggest(trial, prefix="kap.")
    assert values["dims"] == 1 and values["sigma"] == 0.2
    assert "kap.dims" not in trial.requests and "kap.sigma" not in trial.requests
    with pytest.raises(ValueError, match="dims=2 is fixed to 1"):
        fixed.restrict({"dims": 2})
    with pytest.raises(ValueError, match=r"sigma=0.9 must be a real number in \[0.0, 0.3\]"):
        kap.restrict({"sigma": 0.9})
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['sigmaa'\]"):
        kap.restrict({"sigmaa": 0.1})


def test_restrict_keeps_cross_parameter_rules():
    kap = SPACES["kap"]
    with pytest.raises(ValueError, match=r"inconsistent: .*stride=4 must be <= kernel_size=3"):
        kap.restrict({"stride": 4})
    assert kap.restrict({"stride": 4, "kernel_size": 4}).defaults["stride"] == 4
    # A fixed stride raises the lower bound of the searched kernel size instead.
    loose = DefenseSpace(
        "toy",
        (Int("kernel_size", 1, 4), Int("stride", 1, 4, at_most="kernel_size")),
        {"kernel_size": 4, "stride": 1},
    )
    fixed_stride = loose.restrict({"stride": 3})
    for seed in range(20):
        trial = FakeTrial(random_picker(seed))
        values = fixed_stride.suggest(trial)
        assert trial.requests["kernel_size"][1:3] == (3, 4)
        assert values["stride"] == 3 <= values["kernel_size"]


def test_restrict_narrows_ranges_and_choices():
    kap = SPACES["kap"]
    narrow = kap.restrict(
        {"sigma": Float("sigma", 0.0, 0.05), "mode": Categorical("mode", ("max",))}
    )
    assert narrow.param("sigma").high == 0.05 and narrow.defaults["sigma"] == 0.0
    assert narrow.defaults["mode"] == "max"
    assert narrow.restrict({"kernel_size": Int("kernel_size", 2, 3)}).defaults["kernel_size"] == 3
    assert narrow.param("stride").at_most == "kernel_size"
    with pytest.raises(ValueError, match=r"sigma=0.5 must be a real number in \[0.0, 0.3\]"):
        kap.restrict({"sigma": Float("sigma", 0.0, 0.5)})
    with pytest.raises(ValueError, match="mode='sum'"):
        kap.restrict({"mode": Categorical("mode", ("avg", "sum"))})
    with pytest.raises(ValueError, match="cannot narrow Float 'sigma' with a Int"):
        kap.restrict({"sigma": Int("sigma", 0, 0)})
    with pytest.raises(ValueError, match="named 'x'"):
        kap.restrict({"sigma": Float("x", 0.0, 0.1)})
    with pytest.raises(ValueError, match="keep log=True"):
        TRAINING_SPACE.restrict({"lr": Float("lr", 0.01, 0.1)})
    json.dumps(narrow.to_dict())


def _three_modes():
    # "mode" controls only_a, a_or_b and scale_a; "chained" hangs on only_a, "bounded" is
    # at_most scale_a.
    return DefenseSpace(
        "toy",
        (
            Categorical("mode", ("a", "b", "c")),
            Categorical("only_a", ("x", "y"), when=("mode", ("a",))),
            Int("a_or_b", 1, 5, when=("mode", ("a", "b"))),
            Float("chained", 0.0, 1.0, when=("only_a", ("x",))),
            Float("scale_a", 0.0, 1.0, when=("mode", ("a",))),
            Float("bounded", 0.0, 1.0, at_most="scale_a"),
        ),
        {"mode": "a", "only_a": "x", "a_or_b": 3, "chained": 0.5, "scale_a": 0.5, "bounded": 0.25},
    )


def test_restrict_drops_dependants_of_narrowed_away_choices():
    space = _three_modes()
    narrow = space.restrict({"mode": Categorical("mode", ("b",))})
    # only_a and scale_a were active only for "a" (removed): they leave, with "chained", which
    # hangs on only_a; "bounded" stays but loses its at_most (scale_a is never set).
    # a_or_b keeps only "b".
    assert narrow.param_names == ("mode", "a_or_b", "bounded")
    assert narrow.param("a_or_b").when == ("mode", ("b",))
    assert narrow.param("bounded").at_most is None
    # The default mode "a" is no longer a choice: the first (only) one, "b".
    assert narrow.defaults == {"mode": "b", "a_or_b": 3, "bounded": 0.25}
    values = narrow.suggest(FakeTrial(pick_high))
    assert values == {"mode": "b", "a_or_b": 5, "bounded": 1.0}
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['only_a'\]"):
        narrow.validate({**values, "only_a": "x"})
    # Every when value still a choice: the relations are unchanged.
    both = space.restrict({"mode": Categorical("mode", ("a", "b"))})
    assert both.param_names == space.param_names and both.defaults == space.defaults
    assert both.param("a_or_b").when == ("mode", ("a", "b"))
    assert both.param("only_a").when == ("mode", ("a",)) and both.param("bounded").at_most == "scale_a"


def test_restrict_leaves_dependants_of_a_fixed_controller_in_place():
    # A fixed value keeps every dependant (inactive ones simply never become active).
    fixed = _three_modes().restrict({"mode": "c"})
    assert fixed.param_names == _three_modes().param_names
    assert fixed.param("only_a").when == ("mode", ("a",)) and fixed.param("bounded").at_most == "scale_a"
    assert fixed.suggest(FakeTrial(pick_low)) == {"mode": "c", "bounded": 0.0}


def test_restrict_narrows_the_training_recipe_and_its_dependants():
    narrow = TRAINING_SPACE.restrict({"recipe": Categorical("recipe", ("standard", "fast_at", "trades"))})
    # noise_sigma (noise) and, of the adversarial recipes, all but fast_at and trades go.
    assert "noise_sigma" not in narrow.param_names and "noise_sigma" not in narrow.defaults
    assert narrow.param("adv_eps").when == ("recipe", ("fast_at", "trades"))
    assert narrow.param("adv_steps").when == ("recipe", ("trades",))
    assert narrow.param("trades_beta").when == ("recipe", ("trades",))


# -- DefenseSpace.suggest --------------------------------------------------------------------


@pytest.mark.parametrize("space", ALL_SPACES, ids=lambda s: s.name)
@pytest.mark.parametrize("picker", [pick_low, pick_high], ids=["low", "high"])
def test_suggest_extremes_validate(space, picker):
    values = space.suggest(FakeTrial(picker))
    assert space.validate(values) == values


def test_kap_stride_is_suggested_up_to_the_kernel_size_without_clamping():
    kap = SPACES["kap"]
    strides = {k: set() for k in range(1, 5)}
    shared: dict = {}
    for seed in range(400):
        trial = FakeTrial(random_picker(seed), distributions=shared)
        values = kap.suggest(trial, prefix="kap.")
        kap.validate(values)
        assert trial.requests["kap.stride"][1:3] == (1, values["kernel_size"])
        strides[values["kernel_size"]].add(values["stride"])
    # Every valid pair is reachable; none is invalid.
    assert strides == {k: set(range(1, k + 1)) for k in range(1, 5)}


def test_suggest_rejects_a_trial_answer_outside_the_space():
    # e.g. an enqueued trial whose fixed value lies outside the range: fail here, clearly.
    with pytest.raises(ValueError, match=r"sigma=0.7 must be a real number in \[0.0, 0.3\]"):
        SPACES["noise"].suggest(FakeTrial(pick_low, forced={"noise.sigma": 0.7}), prefix="noise.")
    with pytest.raises(ValueError, match="stride=4 must be <= kernel_size=3"):
        SPACES["kap"].suggest(FakeTrial(pick_low, forced={"kernel_size": 3, "stride": 4}))


# -- ConditionalSpace ------------------------------------------------------------------------


def test_defense_choices_and_paper_default_configs():
    space = ConditionalSpace(DEFENSES, training=TRAINING_SPACE)
    assert space.defense_choices() == (BASELINE, *DEFENSES)
    configs = space.paper_default_configs()
    assert [c["defense"] for c in configs] == [BASELINE, *DEFENSES]
    for config in configs:
        assert space.validate(config) == config
        defense, params, training = space.split(config)
        if defense != BASELINE:
            assert params == SPACES[defense].active_defaults()
        assert training["lr"] == 0.1 and training["epochs"] == 15
    assert configs[0] == {"defense": "none", "training.recipe": "standard", "training.lr": 0.1,
                          "training.weight_decay": 5e-4, "training.epochs": 15}
    cas = configs[DEFENSES.index("cas") + 1]
    assert cas["training.recipe"] == cas["cas.recipe"] == "pgd_at"
    assert cas["training.adv_eps"] == 0.1 and cas["training.adv_steps"] == 7

    no_baseline = ConditionalSpace(("kaf",), include_baseline=False)
    assert no_baseline.defense_choices() == ("kaf",)
    assert no_baseline.paper_default_configs() == [
        {"defense": "kaf", **{f"kaf.{k}": v for k, v in _active_defaults("kaf").items()}}]
    # KAF's per_channel only matters with a trainable dictionary, off by default: not written.
    assert "kaf.per_channel" not in no_baseline.paper_default_configs()[0]


def _active_defaults(defense):
    """The defaults of the parameters active under the defaults (``when`` relations)."""
    space = SPACES[defense]
    return {p.name: space.defaults[p.name] for p in space.params if space.is_active(p, space.defaults)}


def test_paper_default_configs_follow_overrides():
    space = ConditionalSpace(("kap",), overrides={"kap": {"dims": 1}, "training": {"epochs": 5}},
                             training=TRAINING_SPACE)
    assert [c["training.epochs"] for c in space.paper_default_configs()] == [5, 5]
    assert space.paper_default_configs()[1]["kap.dims"] == 1


def test_suggest_is_conditional_on_the_chosen_defense():
    space = ConditionalSpace(DEFENSES, training=TRAINING_SPACE)
    low = FakeTrial(pick_low)
    config = space.suggest(low)
    assert config["defense"] == BASELINE
    assert set(low.requests) == {"defense", "training.recipe", "training.lr",
                                 "training.weight_decay", "training.epochs"}
    assert space.validate(config) == config
    for defense in DEFENSES:
        trial = FakeTrial(pick_high, forced={"defense": defense})
        config = space.suggest(trial)
        space.validate(config)
        asked = {n.split(".")[0] for n in trial.requests}
        assert asked <= {"defense", defense, "training"}
        chosen = {k.split(".", 1)[1]: v for k, v in config.items() if k.startswith(defense + ".")}
        # every parameter active under the chosen values (k-WTA's schedule keys depend on its
        # gamma_schedule), and only those
        assert set(chosen) == {p.name for p in SPACES[defense].params if SPACES[defense].is_active(p, chosen)}


def test_random_suggestions_always_validate_and_keep_distributions_fixed():
    space = ConditionalSpace(DEFENSES, training=TRAINING_SPACE,
                             overrides={"kwta": {"mode": "volume"}})
    shared: dict = {}
    seen = set()
    for seed in range(600):
        trial = FakeTrial(random_picker(seed), distributions=shared)
        config = space.suggest(trial)
        assert space.validate(config) == config
        seen.add(config["defense"])
        # Everything the trial was asked ended up in the config, under the same name.
        assert set(trial.requests) <= set(config)
        assert "kwta.mode" not in trial.requests
        if config["defense"] == "cas":
            assert "training.recipe" not in trial.requests
            assert config["training.recipe"] == config["cas.recipe"]
    assert seen == {BASELINE, *DEFENSES}


def test_suggest_without_training_and_only_baseline():
    only = ConditionalSpace((), include_baseline=True)
    assert only.suggest(FakeTrial(pick_low)) == {"defense": "none"}
    assert only.paper_default_configs() == [{"defense": "none"}]
    cas = ConditionalSpace(("cas",), include_baseline=False)
    config = cas.suggest(FakeTrial(pick_low))
    assert config == {
        "defense": "cas", "cas.beta": 0.0, "cas.placement": "last", "cas.recipe": "pgd_at"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"defenses": ("kap", "nope")}, r"unknown defense 'nope'"),
        ({"defenses": ("kap", "kap")}, r"\['kap'\] appear more than once"),
        ({"defenses": ("none",)}, "use include_baseline"),
        ({"defenses": (), "include_baseline": False}, "nothing to search"),
        ({"defenses": "kap"}, "must be a tuple"),
        ({"defenses": ("kap",), "overrides": {"kwta": {"gamma": 0.1}}},
         r"\['kwta'\] which are not searched"),
        ({"defenses": ("kap",), "overrides": {"training": {"lr": 0.1}}}, r"\['training'\]"),
        ({"defenses": ("kap",), "overrides": {"kap": {"sigma": 1.0}}}, r"sigma=1\.0"),
        ({"defenses": ("cas",), "training": TRAINING_SPACE,
          "overrides": {"training": {"recipe": "standard"}}},
         r"cas\.recipe decides training\.recipe"),
        ({"defenses": ("kap",), "training": SPACES["kap"].to_dict()}, "must be a DefenseSpace"),
    ],
)
def test_bad_conditional_spaces_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConditionalSpace(**kwargs)


def test_conditional_validate_rejects_bad_flat_configs():
    space = ConditionalSpace(("kap", "cas"), training=TRAINING_SPACE)
    kap = space.paper_default_configs()[1]
    with pytest.raises(ValueError, match="misses 'defense'"):
        space.validate({k: v for k, v in kap.items() if k != "defense"})
    with pytest.raises(ValueError, match=r"defense='kwta' must be one of \('none', 'kap', 'cas'\)"):
        space.validate({**kap, "defense": "kwta"})
    allowed = r"allowed: \['defense', 'kap.kernel_size'"
    unknown = r"unknown key\(s\) \['cas.beta'\] for defense 'kap'; "
    with pytest.raises(ValueError, match=unknown + allowed):
        space.validate({**kap, "cas.beta": 2.0})
    with pytest.raises(ValueError, match="stride=4 must be <= kernel_size=3"):
        space.validate({**kap, "kap.stride": 4})
    with pytest.raises(ValueError, match=r"lr=2\.0 must be a real number"):
        space.validate({**kap, "training.lr": 2.0})
    cas = space.paper_default_configs()[2]
    mismatch = r"training\.recipe='trades' must equal cas\.recipe='pgd_at'"
    with pytest.raises(ValueError, match=mismatch):
        space.validate({**cas, "training.recipe": "trades", "training.trades_beta": 6.0})
    assert space.split(cas)[0] == "cas"


def test_conditional_space_pickles_and_serialises():
    space = ConditionalSpace(("kap", "cas"), training=TRAINING_SPACE,
                             overrides={"kap": {"sigma": Float("sigma", 0.0, 0.1)}})
    clone = pickle.loads(pickle.dumps(space))
    suggest = pickle.loads(pickle.dumps(space.suggest))  # what Ray checkpoints with OptunaSearch
    for seed in range(10):
        expected = space.suggest(FakeTrial(random_picker(seed)))
        assert clone.suggest(FakeTrial(random_picker(seed))) == expected
        assert suggest(FakeTrial(random_picker(seed))) == expected
    described = json.loads(json.dumps(space.to_dict()))
    assert described["defense"]["choices"] == ["none", "kap", "cas"]
    assert described["decides"] == {"cas.recipe": "training.recipe"}
    assert described["defenses"]["kap"]["params"][2]["high"] == 0.1


def test_works_with_real_optuna_samplers():
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = ConditionalSpace(DEFENSES, training=TRAINING_SPACE)
    rng = random.Random(0)
    for sampler in (optuna.samplers.TPESampler(seed=0, n_startup_trials=5),
                    optuna.samplers.NSGAIISampler(seed=0, population_size=6)):
        study = optuna.create_study(directions=["maximize", "maximize"], sampler=sampler)
        for config in space.paper_default_configs():
            study.enqueue_trial(config)
        configs = []
        for _ in range(30):
            trial = study.ask()
            configs.append(space.suggest(trial))
            study.tell(trial, [rng.random(), rng.random()])
        assert configs[: len(DEFENSES) + 1] == space.paper_default_configs()
        for config in configs:
            space.validate(config)
