"""Run configuration: YAML recipes, dotted overrides, type checks and error messages."""

import pytest
import yaml

from longreach.train import DataConfig, RunConfig, TrainConfig, load_config

RECIPE = """\
name: tiny
seed: 7
model:
  hidden_size: 64
  num_hidden_layers: 2
  mixers: [full, swa]
  rms_norm_eps: 1e-5
data:
  seq_len: 128
train:
  steps: 50
  lr: 3e-4
  betas: [0.9, 0.99]
"""


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(RECIPE)
    return path


def test_recipe_sections_and_defaults(recipe):
    cfg = load_config(recipe)
    assert cfg.name == "tiny" and cfg.seed == 7
    assert cfg.model == {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "mixers": ["full", "swa"],
        "rms_norm_eps": 1e-5,
    }
    assert cfg.data.seq_len == 128 and cfg.data.source == "builtin" and cfg.data.tokenizer == "byte"
    # PyYAML reads 3e-4 (no dot) as a string: float fields accept it
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.betas == (0.9, 0.99)
    assert cfg.train.steps == 50 and cfg.train.grad_accum == 1 and cfg.train.precision == "auto"
    assert str(cfg.out_dir) == "runs/tiny"


def test_no_file_gives_runnable_defaults():
    cfg = load_config(None)
    assert cfg.data == DataConfig() and cfg.train == TrainConfig() and cfg.model == {}


def test_overrides_parse_values_as_yaml(recipe):
    cfg = load_config(
        recipe,
        [
            "train.steps=300",
            "train.lr=0.001",
            "train.compile=true",
            "train.max_time_minutes=2.5",
            "model.mixers=[full,swa]",
            "model.max_position_embeddings=null",
            "data.synthetic={task: copy, fraction: 0.1}",
            "name=other",
            "seed=3",
            "train.out_dir=/tmp/x=y",  # only the first '=' splits
        ],
    )
    assert cfg.train.steps == 300 and cfg.train.lr == 0.001 and cfg.train.compile is True
    assert cfg.train.max_time_minutes == 2.5
    assert cfg.model["mixers"] == ["full", "swa"] and cfg.model["max_position_embeddings"] is None
    assert cfg.data.synthetic == {"task": "copy", "fraction": 0.1}
    assert cfg.name == "other" and cfg.seed == 3 and cfg.train.out_dir == "/tmp/x=y"
    assert str(cfg.out_dir) == "/tmp/x=y"


def test_nested_model_override_creates_mappings():
    cfg = load_config(None, ["model.rope_scaling.factor=2.0"])
    assert cfg.model == {"rope_scaling": {"factor": 2.0}}


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "train.stepz"),
        ("data.seqlen=3", "data.seqlen"),
        ("optim.lr=3", "optim"),
    ],
)
def test_unknown_keys_are_named_with_the_valid_ones(override, message):
    with pytest.raises(ValueError, match=message) as info:
        load_config(None, [override])
    assert "valid keys" in str(info.value)


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  step: 10\n")
    with pytest.raises(ValueError, match=r"train\.step\b.*valid keys: steps"):
        load_config(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.steps=many", "train.steps must be an integer"),
        ("train.steps=2.5", "train.steps must be an integer"),
        ("train.lr=fast", "train.lr must be a number"),
        ("train.compile=maybe", "train.compile must be true or false"),
        ("train.betas=[0.9]", "train.betas must be a list of 2"),
        ("data.synthetic=copy", "data.synthetic must be a mapping"),
        ("train.precision=fp8", "train.precision must be one of"),
        ("train.steps=0", "train.steps must be >= 1"),
        ("train.min_lr=1.0", "train.min_lr must be in"),
        ("data.val_fraction=1.5", "data.val_fraction"),
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_integral_float_and_numeric_string_are_accepted():
    cfg = load_config(None, ["train.steps=100.0", "train.lr=1", "name=42"])
    assert cfg.train.steps == 100 and isinstance(cfg.train.steps, int)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.name == "42"


@pytest.mark.parametrize("override", ["train.steps", "=3", "train..steps=3", "train.steps 3"])
def test_malformed_overrides(override):
    with pytest.raises(ValueError, match="malformed override"):
        load_config(None, [override])


def test_override_through_a_non_mapping():
    with pytest.raises(ValueError, match="train.steps is not a mapping"):
        load_config(None, ["train.steps=3", "train.steps.x=4"])


def test_bad_override_value_yaml():
    with pytest.raises(ValueError, match="cannot parse the value"):
        load_config(None, ["model.mixers=[full"])


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ValueError, match="cannot parse .*bad.yaml as YAML"):
        load_config(path)


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping at the top level"):
        load_config(path)


def test_to_dict_round_trips_through_yaml(recipe):
    cfg = load_config(recipe, ["data.synthetic={task: copy, fraction: 0.5}"])
    saved = yaml.safe_dump(cfg.to_dict())
    assert "!!python" not in saved  # plain YAML: tuples became lists
    again = RunConfig.from_dict(yaml.safe_load(saved))
    assert again == cfg


def test_recipe_names_resolve_from_any_folder(tmp_path, monkeypatch):
    from longreach.train.config import RECIPES, available_recipes, find_recipe

    monkeypatch.chdir(tmp_path)  # no configs/ here: the shipped recipes answer
    assert find_recipe("tiny-swa") == RECIPES / "tiny-swa.yaml"
    assert find_recipe("cca-finetune.yaml") == RECIPES / "cca-finetune.yaml"
    assert {"tiny-swa", "gca-tiny", "swa-tiny", "cca-finetune"} <= set(available_recipes())
    # a path to a YAML file still works, and ./configs/<name>.yaml wins over a shipped one
    own = tmp_path / "mine.yaml"
    own.write_text("name: mine\n")
    assert find_recipe(str(own)) == own and load_config(find_recipe(own)).name == "mine"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny-swa.yaml").write_text("name: local\n")
    assert load_config(find_recipe("tiny-swa")).name == "local"
    with pytest.raises(FileNotFoundError, match="config 'nope' not found.*tiny-swa"):
        find_recipe("nope")


def test_recipe_paths_of_older_checkouts_resolve_to_the_shipped_recipes(tmp_path, monkeypatch):
    from longreach.train import find_recipe
    from longreach.train.config import RECIPES

    monkeypatch.chdir(tmp_path)
    assert find_recipe("configs/gca-tiny.yaml") == RECIPES / "gca-tiny.yaml"
    assert find_recipe("gca-tiny") == RECIPES / "gca-tiny.yaml"
    with pytest.raises(FileNotFoundError, match="not found"):
        find_recipe("configs/no-such-recipe.yaml")
