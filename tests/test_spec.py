"""Study files: the shipped ones load, and every kind of mistake is named with file, key and value."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpo.errors import SpecError
from hpo.studyfile.samplers import HyperbandPrunerSpec, SuccessiveHalvingPrunerSpec, TpeSamplerSpec
from hpo.studyfile.space import Choice, Fixed, FloatRange, IntRange
from hpo.studyfile.spec import Overrides, find_study, load_spec, studies_dirs
from hpo.tuning.study import pruner_options

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "path", sorted((ROOT / "studies").glob("*.toml")) + sorted((ROOT / "examples").glob("*.toml")), ids=lambda p: p.stem
)
def test_every_shipped_study_loads(path: Path) -> None:
    spec = load_spec(path)
    assert spec.study.name
    assert spec.space.searched(), "a shipped study searches something"


def test_cifar_study_searches_the_issue_parameters() -> None:
    spec = load_spec(ROOT / "studies" / "cifar.toml")
    lr = spec.space.distribution("lr")
    assert isinstance(lr, FloatRange) and lr.log
    assert spec.space.distribution("batch_size") == Choice((64, 128, 256, 512))
    assert spec.space.distribution("kernel_size") == Choice((3, 5, 7))
    assert isinstance(spec.space.distribution("weight_decay"), FloatRange)
    assert isinstance(spec.space.distribution("depth"), IntRange)
    assert set(spec.space.distribution("optimizer").choices) == {"sgd", "adam", "adamw", "rmsprop"}  # type: ignore[union-attr]
    assert isinstance(spec.sampler, TpeSamplerSpec) and spec.sampler.multivariate and spec.sampler.constant_liar
    assert spec.pruner == SuccessiveHalvingPrunerSpec(min_resource=2, reduction_factor=4), "bench/search.py's winner"
    assert spec.study.direction == "minimize"


def test_a_study_file_without_a_pruner_table_gets_the_measured_default(tmp_path: Path) -> None:
    path = tmp_path / "plain.toml"
    path.write_text("[space]\nlr = { low = 1e-3, high = 1e-1, log = true }\n")
    assert load_spec(path).pruner == SuccessiveHalvingPrunerSpec()


def test_study_name_and_path_both_resolve() -> None:
    assert find_study("cifar").name == "cifar.toml"
    assert find_study(str(ROOT / "studies" / "quick.toml")).stem == "quick"
    assert ROOT / "studies" in studies_dirs()


def test_unknown_study_lists_available() -> None:
    with pytest.raises(SpecError, match=r"--study: unknown study 'cifr'; available: .*cifar.*quick"):
        find_study("cifr")


def test_defaults_fill_missing_tables(tmp_path: Path) -> None:
    path = tmp_path / "bare.toml"
    path.write_text('[space]\nlr = { low = 1e-3, high = 1e-1, log = true }\n')
    spec = load_spec(path)
    assert spec.study.name == "bare"
    assert spec.space.distribution("batch_size") == Fixed(128)


def test_hyperband_max_resource_defaults_to_max_epochs_after_the_max_epochs_flag(tmp_path: Path) -> None:
    path = tmp_path / "hb.toml"
    path.write_text('[train]\nmax_epochs = 7\n[pruner]\ntype = "hyperband"\n')
    spec = load_spec(path)
    assert isinstance(spec.pruner, HyperbandPrunerSpec)
    assert pruner_options(spec)["max_resource"] == 7
    # --max-epochs 3 on a 7-epoch study: Hyperband's rungs end at epoch 3, not 7.
    assert pruner_options(Overrides(max_epochs=3).apply(spec))["max_resource"] == 3
    path.write_text('[train]\nmax_epochs = 7\n[pruner]\ntype = "hyperband"\nmax_resource = 5\n')
    assert pruner_options(Overrides(max_epochs=3).apply(load_spec(path)))["max_resource"] == 5  # given: kept


BAD = [
    ("[study\nname = 'x'\n", r"invalid TOML: .*line 1"),
    ("[study]\nnmae = 'x'\n", r"\[study\]: unknown key 'nmae'"),
    ("[trian]\nmax_epochs = 3\n", r"unknown table \[trian\]"),
    ("[train]\nmax_epochs = 'ten'\n", r"\[train\]: max_epochs must be an integer, got 'ten'"),
    ("[train]\nmax_epochs = 0\n", r"\[train\]: max_epochs must be >= 1, got 0"),
    ("[train]\ndevice = 'gpu'\n", r"\[train\]: device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
    ("[train]\naugment = 1\n", r"\[train\]: augment must be true or false, got 1"),
    ("[data]\nval_fraction = 1.5\n", r"\[data\]: val_fraction must be in \(0, 1\), got 1.5"),
    ("[data]\ndataset = 'imagenet'\n", r"\[data\]: dataset must be one of 'cifar10', 'cifar100', .*'image_folder', got 'imagenet'"),
    ("[data]\nchannels = 2\n", r"\[data\]: channels must be 1 or 3, got 2"),
    ("[model]\nname = 'vgg'\n", r"\[model\]: name must be a built-in model \('cnn', 'resnet18', 'resnet9'\), torchvision:<arch> .* got 'vgg'"),
    ("[model]\nname = 'resnet18'\n[space]\ndepth = { low = 2, high = 4 }\n", r"\[space\] depth shapes the cnn model only; model 'resnet18'"),
    ("[study]\nmetric = 'val_loss'\ndirection = 'maximize'\n", r"direction 'maximize' does not fit metric 'val_loss'"),
    ("[space]\nlr = { low = 0.1, high = 0.001 }\n", r"\[space\] lr: low must be < high.*low=0.1 high=0.001"),
    ("[space]\nlr = { low = 0.1, high = 0.1 }\n", r"\[space\] lr: low must be < high"),
    ("[space]\nlr = { low = 0.0, high = 0.1, log = true }\n", r"\[space\] lr must be > 0, got 0.0"),
    ("[space]\nweight_decay = { low = 0.0, high = 0.1, log = true }\n", r"log range needs low > 0, got low=0.0"),
    ("[space]\nbatch_size = { choices = [] }\n", r"\[space\] batch_size: choices must be a non-empty list, got \[\]"),
    ("[space]\nbatch_size = [64, 128]\n", r"\[space\] batch_size: write choices as \{ choices = \[64, 128\] \}"),
    ("[space]\nbatch_size = { choices = [64, 12.5] }\n", r"\[space\] batch_size must be int, got 12.5"),
    ("[space]\nkernel_size = { choices = [3, 4] }\n", r"\[space\] kernel_size must be an odd size from 1 to 11, got 4"),
    ("[space]\nlearning_rate = 0.1\n", r"\[space\] unknown hyperparameter 'learning_rate'"),
    ("[space]\nlr = { low = 1e-3, high = 1e-1, lg = true }\n", r"\[space\] lr: unknown key lg"),
    ("[space]\noptimizer = { choices = ['sgd', 'lion'] }\n", r"\[space\] optimizer must be one of .*, got 'lion'"),
    ("[space]\noptimizer = { low = 1, high = 2 }\n", r"\[space\] optimizer is categorical: use \{ choices = \[...\] \}, got a range"),
    ("[sampler]\ntype = 'bayes'\n", r"\[sampler\]: type must be one of tpe, random, grid, cmaes, gp, qmc, nsga2, got 'bayes'"),
    ("[sampler]\ntype = 'qmc'\nqmc_type = 'lattice'\n", r"qmc_type must be one of 'sobol', 'halton', got 'lattice'"),
    ("[sampler]\ntype = 'grid'\n[space]\nlr = { low = 1e-4, high = 1e-1 }\n", r"\[space\] lr: a grid search needs choices or a range with a step"),
    ("[sampler]\ntype = 'tpe'\nmultivariate = false\ngroup = true\n", r"\[sampler\] \(type 'tpe'\): group = true needs multivariate = true"),
    ("[pruner]\ntype = 'threshold'\n", r"\[pruner\] \(type 'threshold'\): give lower, upper or both"),
    ("[pruner]\ntype = 'percentile'\npercentile = 120\n", r"percentile must be from 0 to 100, got 120"),
    ("[space]\nactivation = { choices = ['relu', 'swish'] }\n", r"\[space\] activation must be one of relu, .*, got 'swish'"),
    ("[space]\nbatch_norm = 1\n", r"\[space\] batch_norm must be bool, got 1"),
    ("[space]\nflip = { low = 0, high = 1 }\n", r"\[space\] flip is categorical"),
    ("[space]\nstep_size = { low = 2, high = 8 }\n", r"\[space\] step_size is searched but applies only when schedule is step, and schedule is never that here \(got schedule = 'none'\)"),
    ("[space]\noptimizer = { choices = ['adam', 'adamw'] }\nmomentum = { low = 0.8, high = 0.99 }\n", r"momentum is searched but applies only when optimizer is sgd or rmsprop"),
    ("[pruner]\ntype = 'median'\nmin_resource = 2\n", r"\[pruner\] \(type 'median'\): unknown key 'min_resource'"),
    ("[pruner]\ntype = 'successive_halving'\nreduction_factor = 1\n", r"reduction_factor must be >= 2, got 1"),
    # Multi-objective studies (issue 18).
    ("[study]\nobjectives = ['val_loss', 'size']\n", r"\[study\]: objectives must be one of 'val_loss', 'val_accuracy', 'params', 'macs', 'latency_ms', 'train_seconds', got 'size'"),
    ("[study]\nobjectives = ['params', 'val_loss']\n", r"\[study\]: objectives must start with val_loss or val_accuracy .*got \['params', 'val_loss'\]"),
    ("[study]\nobjectives = ['val_loss', 'params', 'params']\n", r"\[study\]: objectives names 'params' twice"),
    ("[study]\nobjectives = 'params'\n", r"\[study\]: objectives must be a list of strings, got 'params'"),
    ("[study]\nmetric = 'val_loss'\nobjectives = ['val_loss', 'params']\n", r"\[study\] give objectives or metric, not both .*got metric = 'val_loss' and objectives = \['val_loss', 'params'\]"),
    ("[study]\nobjectives = ['val_loss', 'params']\nconstraints = { latency_ms = 5.0 }\n", r"\[study\]: constraints: latency_ms is not measured, .*got latency_ms = 5.0"),
    ("[study]\nobjectives = ['val_loss', 'params']\nconstraints = { size = 5 }\n", r"\[study\]: constraints must be one of .*got 'size'"),
    ("[study]\nobjectives = ['val_loss', 'params']\nconstraints = { params = 0 }\n", r"\[study\]: constraints: params must be a number > 0, got 0.0"),
    ("[study]\nobjectives = ['val_loss', 'params']\nconstraints = { params = -5 }\n", r"\[study\]: constraints: params must be a number > 0, got -5.0"),
    ("[study]\nobjectives = ['val_loss', 'params']\nconstraints = { params = 'big' }\n", r"\[study\]: constraints must be a table of numbers, got \{'params': 'big'\}"),
    ("[study]\nconstraints = { params = 1000 }\n", r"\[study\]: constraints: params is not measured, it is not one of objectives \['val_loss'\]"),
    ("[study]\nobjectives = ['val_loss', 'params']\n[sampler]\ntype = 'cmaes'\n", r"\[sampler\] type 'cmaes' optimizes one objective, got objectives \['val_loss', 'params'\]"),
    ("[sampler]\ntype = 'nsga2'\ncrossover_prob = 1.5\n", r"\[sampler\] \(type 'nsga2'\): crossover_prob must be from 0 to 1, got 1.5"),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_study_file_names_file_key_and_value(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SpecError, match=message) as caught:
        load_spec(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert "\n" not in str(caught.value)


BAD_MODEL_TABLES = [
    ('[model]\nname = "cnn"\n[model.space]\nwidth = 3\n', "[model]: [model.space] is for your own model's hyperparameters; 'cnn' is built-in"),
    ('[model]\nname = "a.b:build"\n[model.space]\nlr = 0.1\n', "[model.space] lr is hpo's own hyperparameter: set it in [space]"),
    ('[model]\nname = "a.b:build"\n[model.space]\nwidth = [8, 16]\n', "[model.space] width: write choices as { choices = [8, 16] }"),
    ('[model]\nname = "a.b:build"\n[model.space]\nwidth = { low = 8, high = "x" }\n', "[model.space] width: values must all be"),
    ('[model]\nname = "a.b:build"\n[model.space]\nwidth = { low = 8, high = 4 }\n', "[model.space] width: low must be < high"),
    ('[model]\nname = "a.b:build"\n[space]\ndepth = 2\n', "[space] depth shapes the cnn model only; model 'a.b:build' is your own model"),
    ('[model]\nname = "no model"\n', "[model]: name must be a built-in model ('cnn', 'resnet18', 'resnet9'), torchvision:<arch>"),
]


@pytest.mark.parametrize(("text", "message"), BAD_MODEL_TABLES, ids=[m for _, m in BAD_MODEL_TABLES])
def test_a_bad_model_table_is_one_line_naming_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(SpecError) as error:
        load_spec(path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value), str(error.value)


def test_a_user_model_space_keeps_its_names_kinds_and_a_probe_configuration(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('[model]\nname = "a.b:build"\n[model.space]\nwidth = { choices = [16, 32] }\n'
                    'drop = { low = 0.0, high = 0.5 }\nact = "gelu"\nblocks = { low = 1, high = 3 }\n')
    space = load_spec(path).model.space
    assert dict(space.entries) == {
        "width": Choice((16, 32)), "drop": FloatRange(0.0, 0.5), "act": Fixed("gelu"), "blocks": IntRange(1, 3),
    }
    assert space.probe() == {"width": 16, "drop": 0.0, "act": "gelu", "blocks": 1}


def test_objectives_take_their_fixed_directions_and_the_first_is_the_metric(tmp_path: Path) -> None:
    path = tmp_path / "mo.toml"
    path.write_text(
        "[study]\nobjectives = ['val_accuracy', 'params', 'latency_ms']\nconstraints = { params = 1_000_000, latency_ms = 5 }\n"
    )
    study = load_spec(path).study
    assert study.metric == "val_accuracy" and study.multi_objective
    assert study.directions == ("maximize", "minimize", "minimize")
    assert study.constraints == {"params": 1_000_000.0, "latency_ms": 5.0}
    assert Overrides(study_name="other").apply(load_spec(path)).study.objectives == study.objectives, "kept by overrides"


def test_a_single_objective_file_is_read_as_before(tmp_path: Path) -> None:
    path = tmp_path / "so.toml"
    path.write_text("[study]\nmetric = 'val_accuracy'\n")
    study = load_spec(path).study
    assert (study.metric, study.direction, study.objectives, study.directions) == (
        "val_accuracy", "maximize", ("val_accuracy",), ("maximize",)
    )
    assert not study.multi_objective and study.constraints == {}
    path.write_text("[study]\nseed = 3\n")
    assert load_spec(path).study.metric == "val_loss"
