"""Search-space files: shipped ones load and sample valid configs; bad ones fail in one line."""

from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path

import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from defenses import REGISTRY, get_defense, make_config
from tuner.errors import UsageError
from tuner.spaces import SpaceError, load_space, shipped_spaces, space_from_json, space_to_json

DEFENSES = ("ft", "ftsam", "fst", "ft_init", "lp", "fe_tuning", "ngf", "sft")


def test_every_registered_defense_ships_a_space() -> None:
    assert set(DEFENSES) <= set(shipped_spaces())
    assert set(REGISTRY) <= set(shipped_spaces())


@pytest.mark.parametrize("name", DEFENSES)
def test_shipped_space_keys_are_config_fields(name: str) -> None:
    space = load_space(name)
    fields = {f.name for f in dataclasses.fields(get_defense(name).config_cls)}
    assert space.distributions and set(space.distributions) <= fields
    assert "epochs" in space.distributions  # the ASHA time axis is searched everywhere


@pytest.mark.parametrize("name", DEFENSES)
def test_default_point_is_make_config_on_digits_and_inside_the_space(name: str) -> None:
    space = load_space(name, dataset="digits")
    cfg = dataclasses.asdict(make_config(name, dataset="digits"))
    assert space.default == {k: cfg[k] for k in space.distributions}
    for key, value in space.default.items():
        assert space.distributions[key]._contains(space.distributions[key].to_internal_repr(value))


@pytest.mark.parametrize("name", DEFENSES)
def test_random_samples_are_accepted_by_make_config(name: str) -> None:
    space = load_space(name)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask(fixed_distributions=space.distributions)
        cfg = make_config(name, trial.params, dataset="digits")
        for key, value in trial.params.items():
            assert getattr(cfg, key) == value
        study.tell(trial, 0.0)


def test_sft_order_holds_for_every_sample() -> None:
    space = load_space("sft")
    assert space.constraints == (("lr_base", "lr_max2"), ("lr_max2", "lr_max1"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(50):
        p = study.ask(fixed_distributions=space.distributions).params
        assert p["lr_base"] < p["lr_max2"] < p["lr_max1"]


def test_ngf_space_searches_the_authors_variants() -> None:
    space = load_space("ngf")
    choices = {k: set(space.distributions[k].choices) for k in ("trainable", "reinit_head", "fisher")}
    assert choices == {"trainable": {"head", "last_block", "all"}, "reinit_head": {False, True},
                       "fisher": {"empirical", "true"}}  # strings: a bare YAML true is a bool
    assert 0.0 in space.distributions["eta_f"].choices  # EWC off is searched too


def test_json_round_trip() -> None:
    space = load_space("ngf")
    data = json.loads(json.dumps(space_to_json(space)))
    back = space_from_json(data)
    assert back.distributions == space.distributions and back.default == space.default


def test_space_error_is_a_usage_error() -> None:
    assert issubclass(SpaceError, UsageError)


# ---------------------------------------------------------------------------------------------
# Rejections: each one line naming the file and the key.
# ---------------------------------------------------------------------------------------------

GOOD_PARAMS = "  lr: {type: float, low: 1.0e-3, high: 5.0e-2, log: true}\n"


def _load(tmp_path: Path, body: str, defense: str = "ft"):
    path = tmp_path / "space.yaml"
    path.write_text(textwrap.dedent(body))
    return load_space(defense, path)


BAD = {
    "bad yaml": ("defense: ft\nparams: {lr: [\n", "invalid YAML"),
    "not a mapping": ("- a\n- b\n", "expected a mapping"),
    "unknown top key": ("defense: ft\nparams:\n" + GOOD_PARAMS + "sampler: tpe\n",
                        "unknown top-level key 'sampler'"),
    "defense mismatch": ("defense: ngf\nparams:\n" + GOOD_PARAMS, "defense = 'ngf'"),
    "no params": ("defense: ft\n", "params: expected a non-empty mapping"),
    "unknown field": ("defense: ft\nparams:\n  rho: {type: float, low: 0.1, high: 1.0}\n",
                      "params.rho: not a field of the ft Config"),
    "unknown type": ("defense: ft\nparams:\n  lr: {type: loguniform, low: 0.1, high: 1.0}\n",
                     "params.lr.type = 'loguniform'"),
    "missing low": ("defense: ft\nparams:\n  lr: {type: float, high: 1.0}\n",
                    "params.lr: missing 'low'"),
    "missing choices": ("defense: ftsam\nparams:\n  label_smoothing: {type: categorical}\n",
                        "params.label_smoothing: missing 'choices'"),
    "empty range": ("defense: ft\nparams:\n  lr: {type: float, low: 0.1, high: 0.1}\n",
                    "params.lr: empty range"),
    "inverted range": ("defense: ft\nparams:\n  lr: {type: float, low: 0.5, high: 0.1}\n",
                       "params.lr: empty range"),
    "log non-positive": ("defense: ft\nparams:\n  lr: {type: float, low: 0.0, high: 0.1, log: true}\n",
                         "params.lr: `low > 0` must hold for `log=True`"),
    "int non-integer bound": ("defense: ft\nparams:\n  epochs: {type: int, low: 1.5, high: 10}\n",
                              "params.epochs.low = 1.5: expected an integer"),
    "empty choices": ("defense: ftsam\nparams:\n  label_smoothing: {type: categorical, choices: []}\n",
                      "params.label_smoothing.choices = []"),
    "float range for int field": ("defense: ft\nparams:\n  epochs: {type: float, low: 1, high: 9}\n",
                                  "params.epochs: type float does not suit"),
    "string choice for bool field": (
        "defense: ftsam\nparams:\n  adaptive: {type: categorical, choices: [yes_please]}\n",
        "params.adaptive.choices: 'yes_please' does not suit"),
    "literal choice not allowed": (
        "defense: ftsam\nparams:\n  scheduler_granularity: {type: categorical, choices: [daily]}\n",
        "params.scheduler_granularity.choices: 'daily'"),
    "default outside range": ("defense: ft\nparams:\n" + GOOD_PARAMS + "default: {lr: 0.5}\n",
                              "default.lr = 0.5 is outside"),
    "default not among choices": (
        ("defense: ftsam\nparams:\n  label_smoothing: {type: categorical, choices: [0.0, 0.1]}\n"
         "default: {label_smoothing: 0.2}\n"), "default.label_smoothing = 0.2 is outside"),
    "default wrong type": (("defense: ft\nparams:\n  epochs: {type: int, low: 5, high: 20}\n"
                            "default: {epochs: 7.5}\n"), "default.epochs = 7.5"),
    "default unknown param": ("defense: ft\nparams:\n" + GOOD_PARAMS + "default: {momentum: 0.9}\n",
                              "default.momentum: not a searched param"),
    "overlapping constraint": (
        ("defense: sft\nparams:\n  lr_base: {type: float, low: 0.001, high: 0.1}\n"
         "  lr_max2: {type: float, low: 0.05, high: 0.2}\nconstraints: ['lr_base < lr_max2']\n"),
        "ranges overlap"),
    "value the Config rejects": ("defense: ft\nparams:\n  lr: {type: float, low: -0.1, high: 0.1}\n",
                                 "the ft Config rejects the space's lower corner"),
    "unknown key in param": ("defense: ft\nparams:\n  lr: {type: float, low: 0.1, high: 1, q: 2}\n",
                             "params.lr: unknown key 'q'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_file_is_rejected_in_one_line(tmp_path: Path, case: str) -> None:
    body, fragment = BAD[case]
    with pytest.raises(SpaceError) as info:
        _load(tmp_path, body, defense="sft" if "constraint" in case else
              ("ftsam" if "ftsam" in body.split("\n")[0] else "ft"))
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "space.yaml") in message
    assert fragment in message


def test_missing_file_and_unknown_shipped_space(tmp_path: Path) -> None:
    with pytest.raises(SpaceError, match="cannot read"):
        load_space("ft", tmp_path / "nope.yaml")
    with pytest.raises(SpaceError, match="no shipped search space"):
        load_space("no_such_defense")


def test_yaml_exponent_without_dot_reads_as_float(tmp_path: Path) -> None:
    space = _load(tmp_path, "defense: ft\nparams:\n  lr: {type: float, low: 1e-3, high: 5e-2, log: true}\n")
    assert space.distributions["lr"] == FloatDistribution(1e-3, 5e-2, log=True)


def test_explicit_default_wins_over_config(tmp_path: Path) -> None:
    space = _load(tmp_path, "defense: ft\nparams:\n" + GOOD_PARAMS
                  + "  epochs: {type: int, low: 5, high: 20}\ndefault: {lr: 0.02}\n")
    assert space.default == {"lr": 0.02, "epochs": 100}  # epochs from make_config("ft")


# ---------------------------------------------------------------------------------------------
# Property: any bounds either load into a distribution optuna accepts, or raise SpaceError.
# ---------------------------------------------------------------------------------------------

numbers = st.one_of(st.integers(-5, 50), st.floats(-10, 100), st.sampled_from([float("nan"), float("inf")]),
                    st.just("abc"), st.booleans(), st.none())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["float", "int", "categorical", "uniform"]), low=numbers, high=numbers,
       log=st.one_of(st.booleans(), st.just("yes")), step=st.one_of(st.none(), st.integers(-1, 4)))
def test_random_ranges_load_validly_or_raise_space_error(tmp_path: Path, kind, low, high, log,
                                                         step) -> None:
    name = "epochs" if kind == "int" else "lr"
    spec = {"type": kind, "low": low, "high": high, "log": log}
    if kind == "int" and step is not None:
        spec["step"] = step
    if kind == "categorical":
        spec = {"type": kind, "choices": [x for x in (low, high) if x is not None]}
    path = tmp_path / "prop.yaml"
    path.write_text(json.dumps({"defense": "ft", "params": {name: spec}}))  # JSON is YAML
    try:
        space = load_space("ft", path)
    except SpaceError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
        return
    dist = space.distributions[name]
    # Rebuilding through optuna's own constructors succeeds and agrees.
    if isinstance(dist, FloatDistribution):
        assert FloatDistribution(dist.low, dist.high, log=dist.log) == dist and dist.low < dist.high
    elif isinstance(dist, IntDistribution):
        assert IntDistribution(dist.low, dist.high, log=dist.log, step=dist.step) == dist
    else:
        assert isinstance(dist, CategoricalDistribution)
        assert CategoricalDistribution(dist.choices) == dist
        for c in dist.choices:
            make_config("ft", {name: c})
