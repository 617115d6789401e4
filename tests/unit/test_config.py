from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from tunelab.config.hf_args import MAPPED, TUNELAB_ONLY, training_arguments
from tunelab.config.load import dump_config, load_config
from tunelab.config.schema import MethodConfig, TrainConfig, TunelabConfig
from tunelab.errors import ConfigError
from tunelab.models.methods import METHODS
from tunelab.stages import STAGES

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))


def _literal_choices(model: type[BaseModel], field: str) -> set[str]:
    import typing

    return set(typing.get_args(model.model_fields[field].annotation))


def test_overrides_are_typed_and_dotted():
    config = load_config(None, ["train.max_steps=50", "method.lora.rank=16", "method.lora.target_modules=[q_proj]"])
    assert config.train.max_steps == 50
    assert config.method.lora.rank == 16
    assert config.method.lora.target_modules == ["q_proj"]


def test_yaml_then_overrides(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 0.001\n  max_steps: 10\n", encoding="utf-8")
    config = load_config(path, ["train.max_steps=20"])
    assert config.train.learning_rate == 0.001 and config.train.max_steps == 20


def test_unknown_field_suggests_the_right_name():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.max_stepz=5"])
    assert "train.max_stepz: unknown field (did you mean 'train.max_steps'?)" in str(err.value)


def test_bad_choice_names_field_and_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["method.name=lorra"])
    assert ("method.name: got 'lorra' (did you mean 'lora'?); allowed values: 'full', 'freeze', 'lora', 'dora', "
            "'qlora', ") in str(err.value)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["method.lora.rank=0", "data.on_bad_record=ignore"])
    message = str(err.value)
    assert "method.lora.rank" in message and "data.on_bad_record" in message


def test_resume_accepts_bool_or_path():
    assert load_config(None, ["train.resume=true"]).train.resume is True
    assert load_config(None, ["train.resume=runs/x/checkpoint-5"]).train.resume == "runs/x/checkpoint-5"


def test_malformed_override_and_missing_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["train.max_steps"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_custom_template_needs_definition():
    with pytest.raises(ConfigError, match="custom_template"):
        load_config(None, ["data.template=custom"])


def test_dump_round_trip(tmp_path: Path):
    config = load_config(None, ["train.max_steps=7", "data.datasets=[{path: a.jsonl, weight: 2}]"])
    dump_config(config, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == config


def test_every_train_field_is_mapped_or_tunelab_only():
    assert set(TrainConfig.model_fields) == MAPPED | TUNELAB_ONLY
    assert not MAPPED & TUNELAB_ONLY


def test_training_arguments_mapping(tmp_path: Path):
    config = load_config(None, [f"train.output_dir={tmp_path}", "train.warmup_ratio=0.1", "train.max_steps=9",
                                "train.gradient_accumulation_steps=4"])
    args = training_arguments(config, dtype="fp32", has_validation=True)
    assert args.warmup_steps == 0.1 and args.max_steps == 9 and args.gradient_accumulation_steps == 4
    assert args.eval_strategy == "epoch"  # no eval_steps given: once per epoch


def test_registries_match_schema_choices():
    assert set(METHODS) == _literal_choices(MethodConfig, "name")
    assert set(STAGES) == _literal_choices(TrainConfig, "stage")


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_shipped_examples_parse(path: Path):
    config = load_config(path)
    assert isinstance(config, TunelabConfig)
    assert yaml.safe_load(path.read_text("utf-8"))


def test_examples_exist():
    assert len(EXAMPLES) >= 4


def test_settings_that_would_fail_only_after_training_fail_before_it():
    with pytest.raises(ConfigError, match=r"train\.max_steps: 0 trains nothing"):
        load_config(None, ["train.max_steps=0"])
    with pytest.raises(ConfigError, match=r"train\.eval_steps: Input should be greater than or equal to 1"):
        load_config(None, ["train.eval_steps=0"])
    with pytest.raises(ConfigError, match=r"^invalid config: eval\.after_training needs a held-out test split: set "
                                          r"data\.test_size"):
        load_config(None, ["eval.after_training=true"])
    assert load_config(None, ["eval.after_training=true", "data.test_size=0.1"]).eval.after_training
