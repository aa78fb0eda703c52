import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from harness.config import ConfigError, StudyConfig, load_study, parse_study
from harness.preflight import name_problems

REPO = Path(__file__).resolve().parents[1]
STUDIES = sorted((REPO / "studies").glob("*.yaml"))


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_every_study_file_and_its_smoke_variant_load(path):
    cfg = load_study(path)
    smoke = load_study(path, smoke=True)
    assert name_problems(cfg) == name_problems(smoke) == []
    assert cfg.name == path.stem
    assert smoke.train.epochs <= cfg.train.epochs
    assert smoke.search.trials <= cfg.search.trials


def test_a_smoke_section_that_no_longer_fits_its_study_is_named_in_the_refusal(tmp_path):
    """A user's image-folder study copied from default.yaml keeps default's synthetic `smoke:` section."""
    text = (REPO / "studies" / "default.yaml").read_text()
    text = text.replace("format: competition", "format: imagefolder\n  sample: digits", 1)
    text = re.sub(r"\n  synthetic: \{.*\}", "\n  synthetic: null", text, count=1)
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as refused:
        load_study(path, smoke=True)
    message = str(refused.value)
    assert message.startswith(f"{path}: its `smoke:` section does not fit the study")
    assert "data.sample" in message and "no synthetic" in message  # what the section sets and why it clashes


def test_minimal_study_gets_component_defaults():
    cfg = parse_study("name: tiny\n")
    assert cfg.data.age_bounds == (30, 60)
    assert cfg.params.loss == "ce"
    assert cfg.study_dir == Path("runs/tiny")


def test_config_is_frozen():
    cfg = parse_study("name: tiny\n")
    with pytest.raises(ValidationError, match="frozen"):
        cfg.train.epochs = 3  # type: ignore[misc]


@pytest.mark.parametrize("text, expected", [
    ("name: x\ntrain: {epoch: 3}\n", ["train.epoch", "unknown key"]),
    ("name: x\ntrain: {epochs: many}\n", ["train.epochs", "valid integer", "'many'"]),
    ("name: x\ndata: {valid_fraction: 1.5}\n", ["data.valid_fraction", "less than 1"]),
    ("name: x\ndata: {age_bounds: [60, 30]}\n", ["data", "age_bounds"]),
    ("name: x\nsearch: {space: {lr: {type: float, low: 0, high: 1, log: true}}}\n", ["search.space.lr", "low > 0"]),
    ("name: x\nsearch: {space: {colour: {type: categorical, choices: [a]}}}\n", ["space.colour", "unknown parameter"]),
    ("name: x\nsearch: {space: {lr: {type: normal}}}\n", ["search.space.lr", "categorical", "float", "int"]),
    ("name: x\nsearch: {space: {focal_gamma: {type: float, low: 1, high: 2, when: {loss: [focal]}}}}\n",
     ["parent 'loss' is not in the search space above 'focal_gamma'"]),
    ("train: {epochs: 2}\n", ["name", "required key is missing"]),
    ("name: '../escape'\n", ["name", "pattern"]),
])
def test_bad_study_files_are_rejected_with_file_key_and_reason(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_study(path)
    message = str(error.value)
    assert str(path) in message
    for part in expected:
        assert part in message


def test_registered_names_are_refused_by_the_preflight_with_key_and_choices():
    cfg = parse_study("name: x\nparams: {head: twoheads}\nsearch:\n  objective: best/f1\n  enqueue: [{freeze: most}]\n"
                      "  space: {loss: {type: categorical, choices: [ce, hinge]}}\nensemble: {method: vote}\n")
    # each key with the name and the choices (the closing bracket left open: tests may register more)
    expected = ["search.objective: unknown objective 'best/f1'; choose one of ['robust/f1', 'val/f1', 'val/f1_bgswap'",
                "ensemble.method: unknown ensemble method 'vote'; choose one of ['average_top_k', 'best_single', "
                "'greedy'",
                "params.head: unknown head 'twoheads'; choose one of ['multiclass', 'multihead'",
                "search.space.loss.choices: unknown loss 'hinge'; choose one of ['ce', 'f1', 'focal', 'label_smoothing'",
                "search.enqueue.0.freeze: unknown freeze policy 'most'; choose one of ['head_only', 'late_freeze', "
                "'none', 'partial', 'warmup_head'"]
    problems = name_problems(cfg)
    assert len(problems) == len(expected)
    assert all(problem.startswith(start) for problem, start in zip(problems, expected)), problems


def test_loading_a_study_file_imports_no_torch():
    code = ("import sys; from harness.config import load_study; load_study(sys.argv[1]); "
            "print(sorted(m for m in ('torch', 'timm', 'sklearn', 'cv2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(REPO / "studies" / "default.yaml")], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


def test_yaml_is_parsed_safely_and_never_runs_code(tmp_path):
    path = write(tmp_path, "name: !!python/object/apply:os.system ['echo pwned > pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_study(path)
    assert not Path("pwned").exists()


def test_not_a_mapping_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="YAML mapping"):
        load_study(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_study(tmp_path / "nope.yaml")


def test_overrides_are_validated_again():
    cfg = parse_study("name: x\n")
    assert cfg.replace({"train.epochs": 7}).train.epochs == 7
    with pytest.raises(ConfigError, match="train.epochs"):
        cfg.replace({"train.epochs": -1})
    with pytest.raises(ConfigError, match="train.nope"):
        cfg.replace({"train.nope": 1})


def test_search_space_hash_changes_with_the_space():
    a = parse_study("name: x\nsearch: {space: {lr: {type: float, low: 0.001, high: 0.1, log: true}}}\n")
    b = parse_study("name: x\nsearch: {space: {lr: {type: float, low: 0.001, high: 0.2, log: true}}}\n")
    assert a.search_space_hash() != b.search_space_hash()
    assert a.search_space_hash() == StudyConfig.model_validate(a.model_dump()).search_space_hash()
