"""The search config: defaults, shipped files, precedence, strict keys and values, round trips."""

from __future__ import annotations

import dataclasses
import pickle
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from prunetune.pruning.errors import UserError
from prunetune.search.config import (
    METHOD_SECTIONS,
    FinetuneSection,
    MethodSections,
    SearchConfig,
    check_names,
    config_from_dict,
    config_to_dict,
    default_run_name,
    describe_config,
    dump_config,
    flatten_config,
    load_config,
    parse_set,
    resolved_scheduler,
    shipped_configs,
)


def _cfg(**tree) -> SearchConfig:
    """A config from a nested dict, without the registry name checks (no torch)."""
    return config_from_dict(tree, names=False)


def _error(**tree) -> str:
    with pytest.raises(UserError) as caught:
        _cfg(**tree)
    message = str(caught.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# Defaults and shipped files
# ---------------------------------------------------------------------------------------------


def test_default_loads_and_is_the_quick_digits_search():
    cfg = load_config()
    # null: each dataset's own size (digits 16x16), so `--dataset fashion-mnist` on the default runs at 28x28
    assert (cfg.model, cfg.dataset.name, cfg.dataset.image_size) == ("small_cnn", "digits", None)
    assert (cfg.method, cfg.methods["optuna"].sampler, cfg.trials, cfg.concurrency) == (
        "optuna",
        "tpe",
        16,
        2,
    )
    assert cfg.finetune.epochs == 2 and resolved_scheduler(cfg) == "none"
    assert cfg.macs_target == 0.5
    assert cfg.method_options is cfg.methods["optuna"]


@pytest.mark.parametrize("name", ["default", "fashion-mnist", "cifar10", "imagenet"])
def test_every_shipped_config_loads_and_validates(name):
    assert name in shipped_configs()
    cfg = load_config(name)  # by name, with the registry checks
    check_names(cfg)
    raw = yaml.safe_load((Path(__file__).parents[1] / "search" / "configs" / f"{name}.yaml").read_text())
    assert cfg.model == raw["model"]
    assert cfg.dataset.name == raw["dataset"]["name"]


def test_shipped_configs_say_what_the_brief_says():
    fashion, cifar, imagenet = load_config("fashion-mnist"), load_config("cifar10"), load_config("imagenet")
    assert (fashion.model, fashion.trials, fashion.finetune.epochs, fashion.macs_target) == (
        "resnet20",
        32,
        5,
        0.5,
    )
    assert (cifar.model, cifar.trials, cifar.finetune.epochs) == ("resnet56", 64, 20)
    assert (imagenet.model, imagenet.dataset.name, imagenet.resources.device) == (
        "resnet50",
        "imagefolder",
        "cuda",
    )
    assert imagenet.resources.gpus_per_trial >= 1


def test_a_file_path_loads_and_missing_keys_take_schema_defaults(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("trials: 3\nfinetune:\n  epochs: 4\n")
    cfg = load_config(path, names=False)
    assert cfg.trials == 3 and cfg.finetune.epochs == 4
    assert cfg.finetune.lr == FinetuneSection().lr and cfg.dataset.image_size is None


def test_empty_file_and_commented_out_section_mean_defaults(tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    assert load_config(tmp_path / "empty.yaml", names=False) == _cfg()
    (tmp_path / "section.yaml").write_text("optuna:\n  # sampler: tpe\n")
    assert load_config(tmp_path / "section.yaml", names=False).methods["optuna"].sampler == "tpe"


def test_missing_config_file_names_the_shipped_ones(tmp_path):
    with pytest.raises(UserError, match=r"does not exist.*cifar10.*default"):
        load_config(tmp_path / "nope.yaml")


# ---------------------------------------------------------------------------------------------
# Precedence and --set parsing
# ---------------------------------------------------------------------------------------------


def test_precedence_file_then_flags_then_sets(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trials: 5\nconcurrency: 3\nfinetune: {epochs: 4}\n")
    cfg = load_config(
        path,
        overrides={"trials": 6, "finetune.epochs": 7},
        sets=["trials=8"],
        names=False,
    )
    assert cfg.trials == 8  # --set beats the flag, which beats the file
    assert cfg.finetune.epochs == 7  # the flag beats the file
    assert cfg.concurrency == 3  # the file beats the default
    assert cfg.finetune.lr == 0.01  # untouched keys of an overridden section stay


def test_overrides_and_sets_create_sections_absent_from_the_file(tmp_path):
    cfg = load_config(None, overrides={"global.floor": 0.3}, sets=["random.floor=0.2"], names=False)
    assert cfg.methods["global"].floor == 0.3 and cfg.methods["random"].floor == 0.2


@pytest.mark.parametrize(
    ("item", "key", "value"),
    [
        ("trials=12", "trials", 12),
        ("macs_target=0.25", "macs_target", 0.25),
        ("finetune.lr=1e-3", "finetune.lr", 0.001),
        ("finetune.lr=2E-2", "finetune.lr", 0.02),
        ("dataset.download=true", "dataset.download", True),
        ("dataset.download=false", "dataset.download", False),
        ("dataset.image_size=null", "dataset.image_size", None),
        ("dataset.root=", "dataset.root", None),
        ("name=my-run", "name", "my-run"),
        ("name='007'", "name", "007"),
        (" storage = s3://bucket/runs ", "storage", "s3://bucket/runs"),
    ],
)
def test_set_parses_yaml_scalars(item, key, value):
    assert parse_set(item) == (key, value)
    cfg = load_config(None, sets=[item], names=False)
    assert flatten_config(cfg)[key] == value


@pytest.mark.parametrize("item", ["trials", "=3", "finetune={epochs: 3}", "trials=[1, 2]"])
def test_malformed_set_is_a_user_error(item):
    with pytest.raises(UserError, match="--set"):
        parse_set(item)


def test_set_through_a_value_is_an_error():
    with pytest.raises(UserError, match=r"'trials' is a value, not a section"):
        load_config(None, sets=["trials.x=1"], names=False)
    with pytest.raises(UserError, match="malformed"):
        load_config(None, overrides={"finetune..epochs": 1}, names=False)


def test_set_int_where_float_is_widened():
    cfg = load_config(None, sets=["macs_target=1", "resources.cpus_per_trial=2"], names=False)
    assert cfg.macs_target == 1.0 and isinstance(cfg.macs_target, float)
    assert isinstance(cfg.resources.cpus_per_trial, float)


# ---------------------------------------------------------------------------------------------
# Unknown keys
# ---------------------------------------------------------------------------------------------


def test_unknown_top_level_key_suggests_the_closest():
    message = _error(trails=3)
    assert "unknown config key 'trails'" in message and "did you mean 'trials'?" in message
    assert "valid keys at the top level" in message and "optuna" in message


def test_unknown_nested_key_suggests_the_closest_and_lists_the_section():
    message = _error(finetune={"epoch": 3})
    assert "unknown config key 'finetune.epoch'; did you mean 'finetune.epochs'?" in message
    assert "valid keys of finetune: batch_size, bn_recalibration_batches" in message


def test_unknown_key_in_a_method_section_and_unknown_section():
    assert "did you mean 'optuna.sampler'?" in _error(optuna={"samplr": "tpe"})
    assert "did you mean 'optuna'?" in _error(optna={"sampler": "tpe"})


def test_leaf_at_the_wrong_level_points_to_where_it_lives():
    message = _error(epochs=3)
    assert "'pretrain.epochs'" in message and "'finetune.epochs'" in message


def test_dotted_key_in_a_file_says_to_nest_it(tmp_path):
    path = tmp_path / "flat.yaml"
    path.write_text("finetune.epochs: 3\n")
    with pytest.raises(UserError, match=r"nest keys: write 'finetune: \{epochs: ...\}'"):
        load_config(path, names=False)


def test_unknown_key_from_a_flag_or_set():
    with pytest.raises(UserError, match="did you mean 'finetune.epochs'"):
        load_config(None, sets=["finetune.epoch=3"], names=False)


def test_methods_is_not_a_yaml_key():
    assert "unknown config key 'methods'" in _error(methods={})


# ---------------------------------------------------------------------------------------------
# Bad values: each names its key
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tree", "key"),
    [
        ({"trials": "many"}, "trials"),
        ({"trials": 2.5}, "trials"),
        ({"trials": True}, "trials"),
        ({"seed": -1}, "seed"),
        ({"macs_target": 0}, "macs_target"),
        ({"macs_target": 1.5}, "macs_target"),
        ({"macs_target": "half"}, "macs_target"),
        ({"macs_target": float("nan")}, "macs_target"),
        ({"macs_tolerance": 0.5}, "macs_tolerance"),
        ({"macs_tolerance": -0.01}, "macs_tolerance"),
        ({"trials": 0}, "trials"),
        ({"concurrency": 0}, "concurrency"),
        ({"calibration_batches": 0}, "calibration_batches"),
        ({"max_failures": -1}, "max_failures"),
        ({"scheduler": "hyperband"}, "scheduler"),
        ({"objective": "accuracy"}, "objective"),
        ({"model": 3}, "model"),
        ({"model": ""}, "model"),
        ({"storage": ""}, "storage"),
        ({"storage": None}, "storage"),
        ({"name": "../escape"}, "name"),
        ({"name": "has space"}, "name"),
        ({"name": ".hidden"}, "name"),
        ({"name": 2024}, "name"),
        ({"dataset": {"val_fraction": 0}}, "dataset.val_fraction"),
        ({"dataset": {"val_fraction": 1}}, "dataset.val_fraction"),
        ({"dataset": {"data_fraction": 0}}, "dataset.data_fraction"),
        ({"dataset": {"data_fraction": 1.01}}, "dataset.data_fraction"),
        ({"dataset": {"image_size": 0}}, "dataset.image_size"),
        ({"dataset": {"download": "yes please"}}, "dataset.download"),
        ({"dataset": 3}, "dataset"),
        ({"pretrain": {"epochs": 0}}, "pretrain.epochs"),
        ({"finetune": {"epochs": -1}}, "finetune.epochs"),
        ({"pretrain": {"lr": 0}}, "pretrain.lr"),
        ({"finetune": {"lr": -0.1}}, "finetune.lr"),
        ({"finetune": {"momentum": 1.0}}, "finetune.momentum"),
        ({"finetune": {"momentum": 0.0}}, "finetune.nesterov"),
        ({"finetune": {"weight_decay": -1e-4}}, "finetune.weight_decay"),
        ({"finetune": {"batch_size": 0}}, "finetune.batch_size"),
        ({"finetune": {"schedule": "linear"}}, "finetune.schedule"),
        ({"finetune": {"bn_recalibration_batches": -1}}, "finetune.bn_recalibration_batches"),
        ({"resources": {"cpus_per_trial": 0}}, "resources.cpus_per_trial"),
        ({"resources": {"cpus_per_trial": 1.5}}, "resources.cpus_per_trial"),
        ({"resources": {"gpus_per_trial": -0.5}}, "resources.gpus_per_trial"),
        ({"resources": {"device": "tpu"}}, "resources.device"),
        ({"resources": {"device": "cuda", "gpus_per_trial": 0}}, "resources.device"),
        ({"space": {"round_to": 0}}, "space.round_to"),
        ({"space": {"min_channels": 0}}, "space.min_channels"),
        ({"optuna": {"sampler": "grid"}}, "optuna.sampler"),
        ({"optuna": {"n_startup_trials": -1}}, "optuna.n_startup_trials"),
        ({"optuna": {"min_keep_ratio": 0}}, "optuna.min_keep_ratio"),
        ({"random": {"floor": 1.5}}, "random.floor"),
        ({"global": {"floor": 0}}, "global.floor"),
        ({"optuna": {"sampler": "nsga2"}}, "optuna.sampler"),
        ({"optuna": {"sampler": "cmaes"}, "objective": "pareto"}, "optuna.sampler"),
        ({"optuna": {"sampler": "gp"}, "objective": "pareto"}, "optuna.sampler"),
        ({"scheduler": "asha", "finetune": {"epochs": 1}}, "scheduler"),
    ],
)
def test_invalid_value_is_a_one_line_user_error_naming_the_key(tree, key):
    assert f"'{key}'" in _error(**tree)


def test_range_error_says_the_range_and_how_to_fix_it():
    message = _error(macs_target=1.5)
    assert "must be in (0, 1]" in message and "--set macs_target=" in message


def test_enum_error_lists_choices_and_suggests():
    message = _error(finetune={"schedule": "cosin"})
    assert "one of: cosine, step" in message and "did you mean 'cosine'?" in message


def test_valid_sampler_objective_pairs_and_fractional_resources():
    assert _cfg(objective="pareto", optuna={"sampler": "nsga2"}).methods["optuna"].sampler == "nsga2"
    assert _cfg(objective="pareto").methods["optuna"].sampler == "tpe"
    assert _cfg(optuna={"sampler": "cmaes"}).objective == "constrained"
    assert _cfg(resources={"gpus_per_trial": 0.25, "cpus_per_trial": 0.5, "device": "cuda"})
    assert _cfg(resources={"gpus_per_trial": 2}).resources.gpus_per_trial == 2.0


@pytest.mark.parametrize(
    ("key", "value", "registry"),
    [("method", "optna", "optuna"), ("importance", "taylr", "taylor"), ("model", "smal_cnn", "small_cnn")],
)
def test_unknown_registry_names_suggest_the_closest(key, value, registry):
    with pytest.raises(UserError) as caught:
        load_config(None, sets=[f"{key}={value}"])
    message = str(caught.value)
    assert f"config key '{key}'" in message and f"did you mean '{registry}'?" in message


def test_unknown_dataset_name_lists_the_valid_ones():
    with pytest.raises(UserError, match=r"config key 'dataset.name'.*fashion-mnist"):
        load_config(None, sets=["dataset.name=mnist"])


def test_validation_runs_on_direct_construction_too():
    cfg = _cfg()
    with pytest.raises(UserError, match="'trials'"):
        dataclasses.replace(cfg, trials=0)
    with pytest.raises(UserError, match="'finetune.epochs'"):
        FinetuneSection(epochs=-2)


# ---------------------------------------------------------------------------------------------
# YAML files that do not parse
# ---------------------------------------------------------------------------------------------


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("trials: 3\nfinetune:\n  epochs: [1, 2\n")
    with pytest.raises(UserError, match=r"broken\.yaml, line \d+") as caught:
        load_config(path, names=False)
    assert "\n" not in str(caught.value)


def test_yaml_that_is_not_a_mapping_names_the_file(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- trials: 3\n")
    with pytest.raises(UserError, match=r"list\.yaml must hold a mapping"):
        load_config(path, names=False)


def test_duplicate_yaml_key_names_the_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("trials: 3\nseed: 1\ntrials: 4\n")
    with pytest.raises(UserError, match=r"dup\.yaml, line 3.*duplicate key 'trials'"):
        load_config(path, names=False)


def test_yaml_file_reads_exponent_floats(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("finetune:\n  lr: 1e-3\n  weight_decay: 5e-4\n")
    cfg = load_config(path, names=False)
    assert (cfg.finetune.lr, cfg.finetune.weight_decay) == (0.001, 0.0005)


# ---------------------------------------------------------------------------------------------
# Round trips, flattening, names, the scheduler
# ---------------------------------------------------------------------------------------------


def test_round_trip_dict_config_dict():
    cfg = load_config("cifar10", sets=["name=r1", "optuna.sampler=cmaes"], names=False)
    tree = config_to_dict(cfg)
    assert config_from_dict(tree, names=False) == cfg
    assert config_to_dict(config_from_dict(tree, names=False)) == tree
    assert set(METHOD_SECTIONS) <= set(tree) and "methods" not in tree


def test_dump_and_load_round_trip(tmp_path):
    cfg = load_config("imagenet", sets=["finetune.lr=1e-5", "name=x"], names=False)
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml", names=False) == cfg


def test_a_saved_config_with_a_retired_key_still_loads_and_a_users_is_told_the_replacement(tmp_path):
    """An older run's config.yaml holds every key of its version (cdp_dtc.epochs, since replaced by
    cdp_dtc.steps): resume, finetune and export read it with saved=True; a user's file is refused."""
    cfg = load_config(names=False)
    dump_config(cfg, tmp_path / "config.yaml")
    tree = yaml.safe_load((tmp_path / "config.yaml").read_text())
    tree["cdp_dtc"]["epochs"] = 1
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tree))
    assert load_config(tmp_path / "config.yaml", names=False, saved=True) == cfg
    with pytest.raises(UserError, match=r"'cdp_dtc.epochs' is no longer used: it was replaced by cdp_dtc.steps"):
        load_config(tmp_path / "config.yaml", names=False)


def test_config_is_hashable_picklable_and_frozen():
    cfg = _cfg()
    assert pickle.loads(pickle.dumps(cfg)) == cfg and hash(pickle.loads(pickle.dumps(cfg))) == hash(cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.trials = 3  # type: ignore[misc]
    assert isinstance(cfg.methods, MethodSections) and list(cfg.methods) == list(METHOD_SECTIONS)


def test_flatten_has_dotted_keys_and_scalar_values():
    flat = flatten_config(_cfg(optuna={"sampler": "gp"}))
    assert flat["finetune.epochs"] == 3 and flat["optuna.sampler"] == "gp" and flat["global.floor"] == 0.1
    assert all(isinstance(v, int | float | str | bool | type(None)) for v in flat.values())
    assert "dataset" not in flat and "dataset.name" in flat
    # model_args.KEY stands for the model factory's own arguments: none by default
    assert list(flat) == [row.key for row in describe_config() if row.key != "model_args.KEY"]


def test_describe_config_documents_every_key():
    rows = {row.key: row for row in describe_config()}
    assert all(row.doc for row in rows.values())
    assert rows.pop("model_args.KEY").type == "any"  # the model factory's own arguments: none by default
    assert {key: row.default for key, row in rows.items()} == flatten_config(_cfg())
    assert rows["optuna.sampler"].type == "tpe | cmaes | gp | nsga2"
    assert (rows["macs_target"].rule, rows["trials"].rule, rows["name"].type) == (
        "in (0, 1]",
        ">= 1",
        "str | null",
    )


def test_the_sections_are_train_recipes():
    from prunetune.pruning.train import TrainRecipe

    cfg = _cfg()
    assert type(cfg.pretrain.recipe()) is TrainRecipe and cfg.pretrain.recipe().epochs == 15
    assert cfg.finetune.recipe().lr == 0.01 and cfg.finetune.recipe().key() == cfg.finetune.key()
    assert TrainRecipe(epochs=15).key() == cfg.pretrain.key()  # the base-model cache key is the recipe's


def test_default_run_name_is_safe_and_dated():
    cfg = _cfg(dataset={"name": "fashion-mnist"}, model="resnet20")
    name = default_run_name(cfg, datetime(2025, 1, 2, 3, 4, 5))
    assert name == "optuna-resnet20-fashion-mnist-20250102-030405"
    assert _cfg(name=name).name == name  # it passes the safe-name rule


@pytest.mark.parametrize(
    ("scheduler", "epochs", "resolved"),
    [
        ("auto", 0, "none"),
        ("auto", 2, "none"),
        ("auto", 3, "asha"),
        ("auto", 20, "asha"),
        ("asha", 2, "asha"),
        ("none", 20, "none"),
    ],
)
def test_resolved_scheduler(scheduler, epochs, resolved):
    assert resolved_scheduler(_cfg(scheduler=scheduler, finetune={"epochs": epochs})) == resolved


def test_config_module_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, prunetune.search.config; sys.exit(1 if {'torch', 'ray', 'mlflow'} & set(sys.modules) else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_readme_documents_every_key():
    """README's reference table is exactly what the schema builds (python -m prunetune.search.config_reference)."""
    from prunetune.search.config_reference import with_reference

    text = (Path(__file__).parents[1] / "README.md").read_text()
    assert text == with_reference(text), "README's config reference is stale: run python -m " \
        "prunetune.search.config_reference README.md"
    missing = [row.key for row in describe_config() if f"`{row.key}`" not in text]
    assert not missing, f"README lacks config keys {missing}"
