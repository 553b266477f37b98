"""Config models: paper defaults, the paper config file, and errors that name the field."""

from pathlib import Path

import pytest

from wrpo_core.config import ConfigError, FusionConfig, ModelSpec, SFTConfig, WRPOConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_papers():
    wrpo, sft, sampling = WRPOConfig(), SFTConfig(), ModelSpec(path="org/model").sampling
    assert (wrpo.beta, wrpo.alpha, wrpo.alpha_schedule, wrpo.learning_rate) == (0.01, 0.1, "linear", 3e-7)
    assert (wrpo.max_length, wrpo.max_prompt_length, wrpo.warmup_ratio) == (2048, 1800, 0.1)
    assert (sft.learning_rate, sft.max_seq_length, sft.lr_scheduler_type) == (7e-6, 2048, "cosine")
    assert (sampling.n, sampling.top_p, sampling.temperature) == (5, 0.95, 0.8)


def test_paper_config_loads():
    cfg = load_config(ROOT / "configs" / "paper.yaml", FusionConfig)
    assert len(cfg.sources) == 10
    assert cfg.target.path == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert cfg.reward_model.path == "RLHFlow/ArmoRM-Llama3-8B-v0.1" and cfg.reward_model.trust_remote_code
    assert cfg.split.sft_fraction == pytest.approx(1 / 3)
    assert {s.name for s in cfg.sources} >= {"gemma-2-27b-it", "Qwen2-72B-Instruct"}


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


MINIMAL = """
prompts: {path: p.jsonl}
sources: [{path: org/a}, {path: org/b}]
target: {path: org/t}
reward_model: {path: org/rm}
"""


def test_minimal_config(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), FusionConfig)
    assert [s.name for s in cfg.sources] == ["a", "b"]
    assert cfg.storage.url == "./runs"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("wrpo: {beta: -1}", r"run.yaml: wrpo.beta: Input should be greater than 0"),
        ("wrpo: {alpah: 0.2}", r"run.yaml: wrpo.alpah: unknown field"),
        ("wrpo: {alpha: 1.5}", r"run.yaml: wrpo.alpha: Input should be less than or equal to 1"),
        ("wrpo: {alpha_schedule: cosine}", r"run.yaml: wrpo.alpha_schedule: .*'linear', 'constant'"),
        (
            "wrpo: {max_length: 100, max_prompt_length: 200}",
            r"wrpo: .*max_prompt_length \(200\) must be smaller",
        ),
        ("split: {sft_fraction: 1.0}", r"run.yaml: split.sft_fraction: Input should be less than 1"),
    ],
)
def test_bad_values_name_the_field(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, MINIMAL + extra), FusionConfig)


def test_bad_source_is_named_by_index(tmp_path):
    text = MINIMAL.replace(
        "[{path: org/a}, {path: org/b}]", "[{path: org/a}, {path: org/b, sampling: {n: 0}}]"
    )
    with pytest.raises(
        ConfigError, match=r"sources.1.sampling.n: Input should be greater than or equal to 1"
    ):
        load_config(write(tmp_path, text), FusionConfig)


def test_duplicate_source_names(tmp_path):
    text = MINIMAL.replace("{path: org/b}", "{path: other/a}")
    with pytest.raises(ConfigError, match=r"repeated: \['a'\]"):
        load_config(write(tmp_path, text), FusionConfig)


def test_missing_section_and_file_and_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"run.yaml: target: Field required"):
        load_config(write(tmp_path, MINIMAL.replace("target: {path: org/t}\n", "")), FusionConfig)
    with pytest.raises(ConfigError, match=r"nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml", FusionConfig)
    with pytest.raises(ConfigError, match=r"run.yaml: not valid YAML"):
        load_config(write(tmp_path, "prompts: [unclosed"), FusionConfig)
    with pytest.raises(ConfigError, match=r"run.yaml: expected a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"), FusionConfig)


def test_unusable_model_name(tmp_path):
    with pytest.raises(ConfigError, match=r"sources.0.name: name .a b. is not allowed"):
        load_config(
            write(tmp_path, MINIMAL.replace("{path: org/a}", "{path: org/a, name: 'a b'}")), FusionConfig
        )
