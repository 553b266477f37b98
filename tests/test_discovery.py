"""Source discovery against a local Hub (tests/hubserver.py): watch rules, checks, registration, re-fusion.

huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE when it is imported (the test session sets
HF_HUB_OFFLINE=1), so the `hub` fixture points its constants at the local server for in-process
calls; the CLI test runs `wrpo` in a subprocess with only the environment variables set, as a user would.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hubserver import FakeHub
from safetensors.torch import load_file

from wrpo_core import candidates, cli, discovery, hub, pipeline, registry
from wrpo_core.config import (
    ConfigError,
    DiscoveryConfig,
    SamplingClusterConfig,
    WatchRule,
    load_config,
)
from wrpo_core.pipeline import data
from wrpo_core.toy.tiny_models import build_tiny_llama, save_tiny_model
from wrpo_core.toy.tokenizer import build_char_tokenizer

NOW = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
OLD = NOW - dt.timedelta(days=30)
OK_TAGS = ["text-generation", "conversational", "license:mit"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def hub_server(monkeypatch, tmp_path):
    """A local hub that this process's huggingface_hub talks to (online, own cache)."""
    from huggingface_hub import constants

    server = FakeHub.start()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    yield server
    server.stop()
    assert not server.unhandled, f"requests the local hub does not answer: {server.unhandled}"


@pytest.fixture(scope="module")
def big_model_dir(tmp_path_factory) -> str:
    """A tiny Llama 16x the size of `tiny_model_dir` (hidden 256): too large for the test cluster."""
    tokenizer = build_char_tokenizer()
    model = build_tiny_llama(tokenizer, seed=0, hidden_size=256, num_heads=4)
    return save_tiny_model(model, tokenizer, tmp_path_factory.mktemp("big_llama"))


def rules(**rule) -> DiscoveryConfig:
    """One watch rule on author `org` (overridable), and a cluster on which the tiny model needs 2 GPUs."""
    base = {
        "name": "tiny",
        "authors": ["org"],
        "tags": ["text-generation"],
        "sampling": {"n": 2, "max_new_tokens": 8},
    }
    # tiny model: 552,192 bytes of float32 weights; 0.0004 GiB = 429,497 bytes per GPU -> 2 GPUs.
    cluster = {"gpu_memory_gib": 0.0004, "weights_memory_fraction": 1.0, "max_tensor_parallel_size": 4}
    return DiscoveryConfig.model_validate({"watch": [{**base, **rule}], "cluster": cluster})


def stored_parameters(folder: str) -> int:
    return sum(t.numel() for t in load_file(str(Path(folder) / "model.safetensors")).values())


# --- unit: rules and the size check -----------------------------------------------------------------


def test_parameter_counts_and_rules_validate_with_the_field_named(tmp_path, capsys):
    rule = WatchRule(name="r", min_parameters="1.5B", max_parameters="70b")
    assert (rule.min_parameters, rule.max_parameters) == (1_500_000_000, 70_000_000_000)
    assert WatchRule(name="r", min_parameters=500e6).min_parameters == 500_000_000
    bad = tmp_path / "rules.yaml"
    bad.write_text("watch:\n- {name: a, max_parameters: lots}\n- {name: a, name_pattern: '('}\n")
    with pytest.raises(ConfigError) as error:
        load_config(bad, DiscoveryConfig)
    assert "rules.yaml: watch.0.max_parameters" in str(error.value) and "watch.1.name_pattern" in str(
        error.value
    )
    bad.write_text("watch:\n- {name: a}\n- {name: a}\n")
    with pytest.raises(ConfigError, match="repeated: \\['a'\\]"):
        load_config(bad, DiscoveryConfig)
    with pytest.raises(ValueError, match="min_parameters 9000000000 exceeds max_parameters"):
        WatchRule(name="r", min_parameters="9B", max_parameters="8B")
    assert WatchRule(name="r", max_parameters=None).max_parameters is None
    deployments = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["deployments"]
    (shipped,) = [d for d in deployments if d["entrypoint"] == "flows/discover.py:discover"]
    assert DiscoveryConfig.model_validate(
        shipped["parameters"]["discovery"]
    ).watch  # the shipped example is valid
    assert shipped["schedules"][0]["active"] is False  # the nightly schedule is off by default
    good = tmp_path / "good.yaml"
    good.write_text("watch:\n- {name: qwen, authors: [Qwen], min_parameters: 7B}\n")
    assert cli.main(["config", "check", "--rules", str(good)]) == 0
    assert cli.main(["config", "json", "--rules", str(good)]) == 0  # for --param discovery=...
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert DiscoveryConfig.model_validate_json(printed).watch[0].min_parameters == 7_000_000_000


def test_tensor_parallel_size_is_the_smallest_power_of_two_that_fits_and_divides_the_heads():
    h100 = SamplingClusterConfig(gpu_memory_gib=80, max_tensor_parallel_size=8, weights_memory_fraction=0.75)
    # 60 GiB of weights per GPU. Llama-3-70B in bf16: 70.6e9 * 2 bytes = 131.5 GiB -> 2.19 GPUs -> 4.
    assert candidates.tensor_parallel_size(70.6e9 * 2, 64, h100) == 4
    assert candidates.tensor_parallel_size(8.03e9 * 2, 32, h100) == 1  # Llama-3-8B: 15 GiB
    assert candidates.tensor_parallel_size(60 * 2**30, 32, h100) == 1  # exactly the per-GPU share fits
    assert candidates.tensor_parallel_size(60 * 2**30 + 1, 32, h100) == 2
    assert candidates.tensor_parallel_size(30e9 * 2, 6, h100) == 1  # 55.9 GiB: one GPU, whatever the heads
    with pytest.raises(candidates.Rejected, match=r"too large .*8 GPUs x 80 GiB x 0.75 = 480.0 GiB"):
        candidates.tensor_parallel_size(405e9 * 2, 128, h100)  # Llama-3.1-405B in bf16: 754 GiB
    assert candidates.tensor_parallel_size(400 * 2**30, 64, h100) == 8  # 6.7 GPUs' worth -> 8
    with pytest.raises(candidates.Rejected, match="divides its 12 attention heads"):
        candidates.tensor_parallel_size(400 * 2**30, 12, h100)  # 8 GPUs needed, 12 heads do not split 8 ways
    # Weights as stored (dtype auto): per-dtype counts; a cast: every parameter at the dtype's size.
    assert candidates.weights_bytes({"BF16": 10, "F32": 3}, "auto") == 10 * 2 + 3 * 4
    assert candidates.weights_bytes({"BF16": 10, "F32": 3}, "float32") == 13 * 4
    with pytest.raises(candidates.Rejected, match="weights stored as \\['Q4'\\]"):
        candidates.weights_bytes({"Q4": 10}, "auto")


# --- against the local hub ---------------------------------------------------------------------------


NO_REPLY_TEMPLATE = (
    b"{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    b"{% if add_generation_prompt %}A:{% endif %}"
)


def publish_candidates(server: FakeHub, tiny: str, big: str) -> dict[str, str]:
    """One model per outcome; returns repo id -> commit sha."""
    remote = json.loads((Path(tiny) / "config.json").read_text())
    remote["auto_map"] = {
        "AutoConfig": "configuration_tiny.TinyConfig",
        "AutoModelForCausalLM": "modeling_tiny.Tiny",
    }
    variants = {
        "org/tiny-chat": {},
        "org/tiny-big": {"folder": big},
        "org/tiny-gpl": {"tags": ["text-generation", "license:gpl-3.0"]},
        "org/other-chat": {},
        "org/tiny-denied": {},
        "org/tiny-unpopular": {"downloads": 5},
        "org/tiny-fresh": {"at": NOW - dt.timedelta(hours=3)},
        "org/tiny-unknown-arch": {"files": {"config.json": b'{"model_type": "no-such-architecture"}'}},
        "org/tiny-no-template": {"without": ("chat_template.jinja",)},
        # Renders a prompt, but never writes the assistant's reply: no end-of-turn token to find.
        "org/tiny-no-reply": {"files": {"chat_template.jinja": NO_REPLY_TEMPLATE}},
        "org/tiny-remote": {"files": {"config.json": json.dumps(remote).encode()}},
        "org/tiny-no-weights": {"without": ("model.safetensors",)},
        "org/tiny-untagged": {"tags": ["license:mit"]},  # the hub's tag filter never lists it
    }
    shas = {}
    for repo_id, variant in variants.items():
        folder = variant.pop("folder", tiny)
        shas[repo_id] = server.push(
            repo_id, folder, tags=variant.pop("tags", OK_TAGS), downloads=variant.pop("downloads", 100),
            at=variant.pop("at", OLD), **variant,
        )  # fmt: skip
    return shas


def test_a_new_model_is_checked_and_registered_with_its_revision_and_the_others_rejected_with_reasons(
    hub_server, tiny_model_dir, big_model_dir, fusion_config
):
    shas = publish_candidates(hub_server, tiny_model_dir, big_model_dir)
    watch = rules(name_pattern="org/tiny-.*", licenses=["mit", "apache-2.0"], min_downloads=10, min_age_days=1,
                  deny=["org/*-denied"])  # fmt: skip
    storage = registry.open_registry(fusion_config.storage.url)

    dry = discovery.discover_sources(fusion_config, watch, storage, dry_run=True, now=NOW).to_dict()
    assert [r["path"] for r in dry["registered"]] == ["org/tiny-chat"] and dry["dry_run"]
    assert registry.read_sources(storage)["version"] == 0  # a dry run registers nothing

    report = discovery.discover_sources(fusion_config, watch, storage, now=NOW).to_dict()
    (added,) = report["registered"]
    assert added["path"] == "org/tiny-chat" and added["revision"] == shas["org/tiny-chat"]
    assert added["name"] == "org--tiny-chat" and added["action"] == "add" and "previous_revision" not in added
    assert (
        added["parameters"] == stored_parameters(tiny_model_dir) == 138_048
    )  # the hub's count = the tensors'
    assert added["tensor_parallel_size"] == 2 and report["version"] == added["version"] == 1
    (spec,) = registry.registered_sources(storage)
    assert (
        spec.revision == shas["org/tiny-chat"]
        and spec.path == "org/tiny-chat"
        and spec.tensor_parallel_size == 2
    )
    assert spec.sampling.n == 2 and not spec.trust_remote_code
    assert registry.read_sources(storage)["history"][-1]["rule"] == "tiny"

    reasons = {r["path"]: " ".join(r["reasons"]) for r in report["rejected"]}
    expected = {
        "org/tiny-big": "too large for the sampling cluster",
        "org/tiny-gpl": "license gpl-3.0 is not one of mit, apache-2.0",
        "org/other-chat": "name does not match 'org/tiny-.*'",
        "org/tiny-denied": "on the deny-list (org/*-denied)",
        "org/tiny-unpopular": "5 downloads, fewer than 10",
        "org/tiny-fresh": "revision is 0.1 days old, younger than 1",
        "org/tiny-unknown-arch": "config does not load",
        "org/tiny-no-template": "no chat template",
        "org/tiny-no-reply": "does not write the assistant message's content",
        "org/tiny-remote": "needs its repository's code (auto_map",
        "org/tiny-no-weights": "no weights",
    }
    assert set(reasons) == set(expected)  # org/tiny-untagged: not listed (the hub filters tags)
    for repo_id, reason in expected.items():
        assert reason in reasons[repo_id], (repo_id, reasons[repo_id])
        assert reasons[repo_id].startswith("tiny: ")  # the rule that rejected it
    assert {r["revision"] for r in report["rejected"]} <= set(shas.values())
    markdown = discovery.report_markdown(report)
    assert "| org--tiny-chat | `org/tiny-chat` |" in markdown and "no chat template" in markdown
    assert "## Rejected: 11" in markdown

    # A rerun with nothing new registers nothing.
    again = discovery.discover_sources(fusion_config, watch, storage, now=NOW).to_dict()
    assert again["registered"] == [] and again["version"] == 1
    assert again["unchanged"] == [
        {"path": "org/tiny-chat", "revision": shas["org/tiny-chat"], "names": ["org--tiny-chat"]}
    ]
    assert again["rejected"] == report["rejected"]


def test_remote_code_only_when_the_rule_allows_it(
    hub_server, tiny_model_dir, fusion_config, tmp_path, monkeypatch
):
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))  # transformers appends the modules cache
    config = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    config |= {"model_type": "tiny-remote", "auto_map": {"AutoConfig": "configuration_tiny.TinyConfig",
                                                         "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}}  # fmt: skip
    code = b"from transformers import LlamaConfig\n\nclass TinyConfig(LlamaConfig):\n    model_type = 'tiny-remote'\n"
    sha = hub_server.push("org/tiny-remote", tiny_model_dir, tags=OK_TAGS, at=OLD,
                          files={"config.json": json.dumps(config).encode(), "configuration_tiny.py": code})  # fmt: skip
    storage = registry.open_registry(fusion_config.storage.url)

    refused = discovery.discover_sources(fusion_config, rules(), storage, now=NOW)
    assert "the rule does not allow trust_remote_code" in refused.rejected[0]["reasons"][0]
    report = discovery.discover_sources(fusion_config, rules(trust_remote_code=True), storage, now=NOW)
    (added,) = report.registered
    assert added.spec.trust_remote_code and added.spec.revision == sha


def test_a_source_of_the_config_without_a_revision_is_pinned_under_its_own_name(
    hub_server, tiny_model_dir, fusion_config
):
    sha = hub_server.push("org/tiny-chat", tiny_model_dir, tags=OK_TAGS, at=OLD)
    pinned_later = fusion_config.sources[1].model_copy(update={"path": "org/tiny-chat", "revision": None})
    cfg = fusion_config.model_copy(update={"sources": [fusion_config.sources[0], pinned_later]})
    storage = registry.open_registry(cfg.storage.url)
    (added,) = discovery.discover_sources(cfg, rules(), storage, now=NOW).to_dict()["registered"]
    assert (added["name"], added["revision"], added["previous_revision"]) == ("src-b", sha, None)
    (spec,) = registry.registered_sources(storage)
    assert spec.sampling == pinned_later.sampling  # the source's own settings, now pinned
    merged = registry.with_registered_sources(cfg, [spec])
    assert [(s.name, s.revision) for s in merged.sources] == [("src-a", None), ("src-b", sha)]


def test_the_hub_failing_fails_the_run_instead_of_rejecting_models(
    hub_server, tiny_model_dir, fusion_config, tmp_path, monkeypatch, capsys
):
    from huggingface_hub import constants

    sha = hub_server.push("org/tiny-chat", tiny_model_dir, tags=OK_TAGS, at=OLD)
    storage = registry.open_registry(fusion_config.storage.url)
    hub_server.failing.append(
        "/api/models/org/tiny-chat/revision"
    )  # the listing works, the model's info fails
    with pytest.raises(hub.HubError, match=f"cannot read org/tiny-chat@{sha} at {hub_server.url}: .*500"):
        discovery.discover_sources(fusion_config, rules(), storage, now=NOW)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    config, watch = tmp_path / "fusion.json", tmp_path / "rules.json"
    config.write_text(fusion_config.model_dump_json())
    watch.write_text(rules().model_dump_json())
    assert cli.main(["sources", "discover", "--config", str(config), "--rules", str(watch)]) == 1
    assert "offline mode is on (HF_HUB_OFFLINE); unset it" in capsys.readouterr().err
    assert registry.read_sources(storage)["version"] == 0


def test_the_cli_registers_sends_one_event_per_source_and_then_nothing(hub_server, tiny_model_dir, fusion_config,
                                                                       tmp_path, monkeypatch, capsys):  # fmt: skip
    hub_server.push("org/tiny-chat", tiny_model_dir, tags=OK_TAGS, at=OLD)
    hub_server.push(
        "org/tiny-two", tiny_model_dir, tags=OK_TAGS, at=OLD + dt.timedelta(hours=1)
    )  # listed first
    config, watch = tmp_path / "fusion.json", tmp_path / "rules.json"
    config.write_text(fusion_config.model_dump_json())
    watch.write_text(rules().model_dump_json())
    sent = []
    hooks = cli.CliHooks(send_registry_event=lambda *event: sent.append(event) or type(
        "Event", (), {"event": f"wrpo.source.{event[0]}", "id": len(sent)})())  # fmt: skip
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # --event auto: send

    def discover(*extra):
        code = cli.main(
            ["sources", "discover", "--config", str(config), "--rules", str(watch), *extra], hooks=hooks
        )
        out, err = capsys.readouterr()
        assert code == 0, err
        return json.loads(out), err

    dry, err = discover("--dry-run")
    assert len(dry["registered"]) == 2 and "events" not in dry and sent == []
    assert "2 to register, 0 unchanged, 0 rejected" in err
    result, _ = discover()
    registry_url = str(Path(fusion_config.storage.url).resolve())
    assert sent == [("added", "org--tiny-two", "org/tiny-two", registry_url, 1),
                    ("added", "org--tiny-chat", "org/tiny-chat", registry_url, 2)]  # fmt: skip
    assert result["events"] == ["sent wrpo.source.added (1)", "sent wrpo.source.added (2)"]
    again, err = discover()
    assert again["registered"] == [] and again["events"] == [] and len(sent) == 2
    assert "0 registered, 2 unchanged" in err


def test_the_cli_reaches_the_hub_through_hf_endpoint(hub_server, tiny_model_dir, fusion_config, tmp_path):
    """As users run it: only HF_ENDPOINT (and the cache) set in the environment, in a fresh process."""
    hub_server.push("org/tiny-chat", tiny_model_dir, tags=OK_TAGS, at=OLD)
    config, watch = tmp_path / "fusion.json", tmp_path / "rules.json"
    config.write_text(fusion_config.model_dump_json())
    watch.write_text(rules().model_dump_json())
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "PREFECT_API_URL")}
    env |= {"HF_ENDPOINT": hub_server.url, "HF_HOME": str(tmp_path / "hf-home")}
    done = subprocess.run([sys.executable, "-m", "wrpo_core.cli", "sources", "discover", "--config", str(config),
                           "--rules", str(watch)], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["hub"] == hub_server.url and result["registered"][0]["path"] == "org/tiny-chat"
    assert result["events"] == [
        "not sent: PREFECT_API_URL is not set (a scheduled re-fusion picks the change up)"
    ]
    assert (tmp_path / "hf-home" / "hub" / "models--org--tiny-chat").is_dir()  # the user's cache, not ours


def test_a_discovered_source_and_its_new_revision_are_each_the_only_source_sampled_again(
    hub_server, tiny_model_dir, fusion_config, tmp_path, monkeypatch
):
    first_sha = hub_server.push("org/tiny-chat", tiny_model_dir, tags=OK_TAGS, at=OLD)
    storage = registry.open_registry(fusion_config.storage.url)
    pipeline.run_pipeline(fusion_config)  # the fusion before anything was discovered
    sampled = []
    real_sample = data.sample
    monkeypatch.setattr(data, "sample", lambda spec, *a, **k: sampled.append((spec.name, spec.revision))
                        or real_sample(spec, *a, **k))  # fmt: skip

    def refusion() -> dict:
        cfg = registry.with_registered_sources(fusion_config, registry.registered_sources(storage))
        return pipeline.run_pipeline(cfg)  # what the re-fusion deployment runs

    discovery.discover_sources(fusion_config, rules(), storage, now=NOW)
    refusion()
    assert sampled == [
        ("org--tiny-chat", first_sha),
        (pipeline.TARGET_SFT, None),
    ]  # the others' samples reused

    # The model is updated in place on the hub: a new commit with other weights.
    tokenizer = build_char_tokenizer()
    updated = save_tiny_model(build_tiny_llama(tokenizer, seed=7), tokenizer, tmp_path / "updated")
    second_sha = hub_server.push("org/tiny-chat", updated, at=OLD + dt.timedelta(days=1))
    sampled.clear()
    (replaced,) = discovery.discover_sources(fusion_config, rules(), storage, now=NOW).to_dict()["registered"]
    assert (replaced["action"], replaced["previous_revision"], replaced["revision"]) == (
        "replace",
        first_sha,
        second_sha,
    )
    summaries = refusion()
    assert sampled == [("org--tiny-chat", second_sha), (pipeline.TARGET_SFT, None)]
    run = pipeline.layout_for(
        registry.with_registered_sources(fusion_config, registry.registered_sources(storage))
    )
    for source in ("src-a", "src-b"):
        assert run.read_manifest(f"sample-{source}")["reused_from"]
    fused = {row["model"] for row in summaries["select-source"]["per_model"]}
    assert fused == {"src-a", "src-b", "org--tiny-chat"}


def test_without_the_hubs_parameter_count_the_model_is_counted_from_its_config(
    hub_server, tiny_model_dir, fusion_config, tmp_path
):
    """A .bin-only model has no safetensors metadata on the hub: its size comes from the config."""
    import torch

    weights = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    torch.save(weights, tmp_path / "pytorch_model.bin")
    hub_server.push("org/tiny-bin", tiny_model_dir, tags=OK_TAGS, at=OLD, without=("model.safetensors",),
                    files={"pytorch_model.bin": (tmp_path / "pytorch_model.bin").read_bytes()})  # fmt: skip
    storage = registry.open_registry(fusion_config.storage.url)
    (added,) = discovery.discover_sources(fusion_config, rules(), storage, dry_run=True, now=NOW).to_dict()[
        "registered"
    ]
    assert added["parameters"] == sum(t.numel() for t in weights.values())  # tied embeddings counted once
    assert added["weights_gib"] == round(added["parameters"] * 4 / 2**30, 3)  # float32, as its config says
    assert added["tensor_parallel_size"] == 2
