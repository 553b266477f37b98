"""The `wrpo` command line: config check, training from a YAML job, export, error exit codes."""

import json
from pathlib import Path

import pyarrow as pa
import yaml

from wrpo_core.cli import main
from wrpo_core.config import FusionConfig, load_config
from wrpo_core.formats import read_jsonl
from wrpo_core.schemas import QUADRUPLES, write_parquet

ROOT = Path(__file__).resolve().parents[1]


def quadruples(path):
    n = 4
    table = pa.table(
        {
            "prompt_id": [f"p{i}" for i in range(n)],
            "prompt": [f"reverse: ab{i}" for i in range(n)],
            "y_ws": [f"{i}ba" for i in range(n)],
            "y_ws_model": ["src"] * n,
            "y_ws_score": [1.0] * n,
            "y_wt": [f"{i}b" for i in range(n)],
            "y_wt_score": [0.5] * n,
            "y_l": ["zzz"] * n,
            "y_l_score": [0.0] * n,
            "ref_logp_ws": pa.nulls(n, pa.float64()),
            "ref_logp_wt": pa.nulls(n, pa.float64()),
            "ref_logp_l": pa.nulls(n, pa.float64()),
        }
    )
    write_parquet(table, str(path), QUADRUPLES)
    return str(path)


def test_config_check(capsys):
    assert main(["config", "check", str(ROOT / "configs" / "paper.yaml")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["target"] == "Meta-Llama-3-8B-Instruct"
    assert printed["global_batch"] == {"sft": 128, "wrpo": 128}  # the paper's, on its 8 GPUs


def test_config_check_refuses_a_global_batch_the_run_cannot_split(tmp_path, capsys):
    config = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())
    config["wrpo"]["global_batch_size"] = 100  # 2 per device x 8 processes does not divide 100
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    assert main(["config", "check", str(bad)]) == 2
    error = capsys.readouterr().err
    assert "global_batch_size" in error and "100" in error and "Traceback" not in error


def test_config_json_prints_the_validated_config_for_prefect_parameters(capsys):
    assert main(["config", "json", str(ROOT / "configs" / "paper.yaml")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert FusionConfig.model_validate(printed) == load_config(
        str(ROOT / "configs" / "paper.yaml"), FusionConfig
    )


def test_bad_config_exits_2_naming_the_field(tmp_path, capsys):
    bad = tmp_path / "job.yaml"
    bad.write_text(yaml.safe_dump({"model": "m", "data": "d", "output_dir": "o", "training": {"beta": 0}}))
    assert main(["train", "wrpo", "--config", str(bad)]) == 2
    assert "job.yaml: training.beta: Input should be greater than 0" in capsys.readouterr().err


def test_train_wrpo_from_yaml_then_export(tmp_path, tiny_model_dir, capsys):
    data = quadruples(tmp_path / "q.parquet")
    job = {
        "model": tiny_model_dir,
        "data": data,
        "output_dir": str(tmp_path / "out"),
        "training": {
            "max_steps": 2,
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 1,
            "gradient_checkpointing": True,
            "learning_rate": 1e-3,
            "beta": 1.0,
            "max_length": 64,
            "max_prompt_length": 32,
        },
    }
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job))
    assert main(["reference", "--config", str(config)]) == 0
    assert main(["train", "wrpo", "--config", str(config)]) == 0
    assert (tmp_path / "out" / "model.safetensors").exists()
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines if "loss" in json.loads(x)] == [1, 2]

    out = tmp_path / "authors.jsonl"
    assert main(["export", "--to", "authors", data, str(out)]) == 0
    records = read_jsonl(str(out))
    assert records[0]["chosen"][0]["content"] == "0ba" and records[0]["chosen"][1]["content"] == "0b"
    capsys.readouterr()
