from pathlib import Path

import pytest

from components.cli import main
from components.common.config import Params, load_params
from components.common.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_repo_params_file_is_valid():
    params = load_params(REPO / "params.yaml")
    assert params.model.source == "tiny"
    assert params.cache.resolution % 8 == 0


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "train:\n  learing_rate: 1.0e-4\n")
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert str(path) in str(err.value)
    assert "train.learing_rate: unknown key" in str(err.value)


def test_unknown_key_suggests_the_closest_name(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, "train:\n  learnig_rate: 1.0e-4\n"))
    assert "train.learnig_rate: unknown key (did you mean `learning_rate`?)" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, "trian:\n  seed: 1\n"))
    assert "did you mean `train`?" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, "train:\n  zzzz: 1\n"))
    assert str(err.value).endswith("train.zzzz: unknown key")


def test_params_as_dvc_rewrites_them_yaml_1_2(tmp_path):
    """`dvc exp run -S` rewrites params.yaml with ruamel (YAML 1.2) and drops the quotes
    around "no"; YAML 1.1 (PyYAML) would read it as False."""
    text = "train:\n  mixed_precision: no\n  learning_rate: 1e-4\n  tracker_project_name: on\n"
    params = load_params(write(tmp_path, text))
    assert params.train.mixed_precision == "no"
    assert params.train.learning_rate == pytest.approx(1e-4)
    assert params.train.tracker_project_name == "on"
    assert load_params(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"


def test_duplicate_key_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="line 3.*duplicate key"):
        load_params(write(tmp_path, "train:\n  seed: 1\n  seed: 2\n"))


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="trian: unknown key"):
        load_params(write(tmp_path, "trian:\n  seed: 1\n"))


@pytest.mark.parametrize(
    "text, key",
    [
        ("train:\n  train_batch_size: lots\n", "train.train_batch_size"),
        ("pack:\n  val_fraction: 1.5\n", "pack.val_fraction"),
        ("cache:\n  resolution: 30\n", "cache.resolution"),
        ("train:\n  mixed_precision: fp8\n", "train.mixed_precision"),
        ("train:\n  max_train_steps: null\n  num_train_epochs: null\n", "train"),
        ("pipeline:\n  image: example.com/t2i:latest\n", "pipeline.image"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, text))
    assert f"{key}:" in str(err.value)
    assert "\n" not in str(err.value)


def test_set_overrides_a_key(tmp_path):
    path = write(tmp_path, "train:\n  learning_rate: 1.0e-3\n")
    params = load_params(path, ["train.learning_rate=1e-4", "cache.random_flip=false"])
    assert params.train.learning_rate == pytest.approx(1e-4)
    assert params.cache.random_flip is False
    assert params.train.seed == Params().train.seed  # untouched keys keep their defaults


def test_set_with_unknown_key_or_bad_form(tmp_path):
    path = write(tmp_path, "{}\n")
    with pytest.raises(ConfigError, match="train.nope: unknown key"):
        load_params(path, ["train.nope=1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_params(path, ["learning_rate"])


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(write(tmp_path, "train: [\n"))


def test_cli_typo_is_one_line_and_exit_2(tmp_path, capsys):
    path = write(tmp_path, "train:\n  learing_rate: 1.0e-4\n")
    assert main(["train", "--params", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "train.learing_rate: unknown key" in err and str(path) in err


def test_cli_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["pack", "--no-such-flag"])
    assert exit_.value.code == 2
    assert "--no-such-flag" in capsys.readouterr().err


def test_cli_runtime_failure_is_one_line_exit_1(tmp_path, capsys):
    path = write(tmp_path, "{}\n")
    code = main(
        [
            "cache",
            "--params",
            str(path),
            "--shards",
            str(tmp_path / "none"),
            "--model",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "manifest.json" in err and "t2i pack" in err
