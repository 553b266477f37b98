"""The deployments against a real Prefect server (started here) and a process worker.

deployments/prefect.yaml is deployed as shipped except for its default `config`, which points at
the smallest toy world and a temporary storage folder. Covered: a `prefect deployment run` of
`wrpo-fusion/default` completes with its artifacts; bad parameters are rejected before a run
exists; `wrpo sources add` starts `wrpo-fusion/refusion`, which samples only the new source; a run
killed mid-flow resumes without redoing finished stages; the UI shows the deployment's form; a
`wrpo-discover/default` run finds a new model on a local hub (tests/hubserver.py, the stack's
HF_ENDPOINT), registers it and so starts a re-fusion that completes.
"""

import datetime as dt
import json
import os
import re
import subprocess
from contextlib import contextmanager

import psutil
import pytest
import yaml
from hubserver import FakeHub
from prefect import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    DeploymentFilter,
    DeploymentFilterName,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import StateType
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect_stack import BIN, REPO, PrefectStack
from prefect_ui import deployment_form_dom, expected_form_strings, find_chromium, missing_strings

from wrpo_core.toy.paths import toy_fusion_parameters

pytestmark = pytest.mark.integration
TERMINAL = {StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED}
RUN_TIMEOUT = 900


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prefect-stack")
    config = toy_fusion_parameters("smallest")
    config["storage"]["url"] = str(folder / "runs")
    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    for deployment in spec["deployments"]:
        deployment["parameters"]["config"] = config
    (folder / "prefect.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    hub = FakeHub.start()  # the Hugging Face Hub of every flow run (wrpo-discover)
    hub_env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(folder / "hf-home"), "HF_HUB_OFFLINE": None}
    stack = PrefectStack.start(folder, folder / "prefect.yaml", env_overrides=hub_env)
    stack.config = config
    stack.runs = folder / "runs"
    stack.hub = hub
    yield stack
    stack.stop()
    hub.stop()


@contextmanager
def client(stack):
    with (
        temporary_settings({PREFECT_API_URL: stack.env["PREFECT_API_URL"]}),
        get_client(sync_client=True) as c,
    ):
        yield c


def run_id_of(output: str) -> str:
    found = re.search(r"UUID:\s*([0-9a-f-]{36})", output)
    assert found, output
    return found.group(1)


def deployment_run(stack, *params: str, watch: bool = True) -> tuple[subprocess.CompletedProcess, str]:
    args = ["deployment", "run", "wrpo-fusion/default", *params]
    if watch:
        args += ["--watch", "--watch-timeout", str(RUN_TIMEOUT)]
    done = stack.prefect(*args, timeout=RUN_TIMEOUT + 60, check=False)
    return done, run_id_of(done.stdout)


def manifests(root) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (root / "manifests").glob("*.json")}


def run_logs(stack, run_id) -> str:
    messages: list[str] = []
    with client(stack) as c:
        while True:  # the API returns at most 200 per call
            page = c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])),
                               limit=200, offset=len(messages))  # fmt: skip
            messages += [log.message for log in page]
            if len(page) < 200:
                return "\n".join(messages)


@pytest.fixture(scope="module")
def default_run(stack):
    done, run_id = deployment_run(stack)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{stack.log_tail()}"
    return run_id


def test_the_default_deployment_completes_on_the_toy_world_with_its_artifacts(stack, default_run):
    with client(stack) as c:
        assert c.read_flow_run(default_run).state_type == StateType.COMPLETED
        artifacts = c.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[default_run]))
        )
    by_key = {a.key: a for a in artifacts}
    assert {"wrpo-fusion-summary", "wrpo-fusion-sources", "wrpo-fusion-training-curves",
            "wrpo-fusion-evaluation"} <= set(by_key)  # fmt: skip
    summary = by_key["wrpo-fusion-summary"].data
    assert str(stack.runs / "toy-smallest") in summary and "| register | ran |" in summary
    sources = json.loads(by_key["wrpo-fusion-sources"].data)
    assert sorted(row["source"] for row in sources) == sorted(s["name"] for s in stack.config["sources"])
    assert sum(row["ws_share"] for row in sources) == pytest.approx(1.0, abs=1e-3)
    assert "data:image/png;base64," in by_key["wrpo-fusion-training-curves"].data
    evaluation = json.loads(by_key["wrpo-fusion-evaluation"].data)
    assert [row["model"] for row in evaluation] == ["target", "target-sft", "wrpo"]
    assert all(row["exact_accuracy"] is not None for row in evaluation)
    assert (stack.runs / "toy-smallest" / "evaluation" / "alpaca_eval" / "wrpo.json").exists()


def test_invalid_parameters_are_rejected_before_a_run_exists(stack):
    bad = {**stack.config, "wrpo": {**stack.config["wrpo"], "alpha": 2.5}}
    done = stack.prefect("deployment", "run", "wrpo-fusion/default", "--param", f"config={json.dumps(bad)}",
                         check=False, timeout=120)  # fmt: skip
    assert done.returncode != 0
    assert "alpha" in done.stdout + done.stderr and "UUID" not in done.stdout


def test_registering_a_source_starts_a_refusion_that_samples_only_it(stack, default_run):
    with client(stack) as c:
        dep_filter = DeploymentFilter(name=DeploymentFilterName(any_=["refusion"]))
        before = {r.id for r in c.read_flow_runs(deployment_filter=dep_filter)}
    added = subprocess.run(
        [str(BIN / "wrpo"), "sources", "add", "extra", "toy-world:smallest/src-upper", "--n", "2",
         "--storage", str(stack.runs), "--event", "always"],
        env=stack.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["event"].startswith("sent wrpo.source.added")

    def finished_refusion():
        with client(stack) as c:
            runs = [r for r in c.read_flow_runs(deployment_filter=dep_filter) if r.id not in before]
        return runs[0] if runs and runs[0].state_type in TERMINAL else None

    run = stack.wait_for(finished_refusion, RUN_TIMEOUT, "the re-fusion run started by the event")
    assert run.state_type == StateType.COMPLETED, f"{run.state.message}\n{run_logs(stack, run.id)}"
    assert run.parameters["use_source_registry"] is True
    (root,) = stack.runs.glob("toy-smallest-sources-*")
    done = manifests(root)
    assert "reused_from" not in done["sample-extra"]  # the new source was sampled...
    for source in stack.config["sources"]:  # ...the others' samples and scores were copied
        for stage in (f"sample-{source['name']}", f"score-{source['name']}"):
            assert done[stage]["reused_from"] == str(stack.runs / "toy-smallest"), stage
    fused = {row["model"] for row in done["select-source"]["summary"]["per_model"]}
    assert fused == {"extra", *(s["name"] for s in stack.config["sources"])}
    assert "register" in done


def test_a_run_killed_mid_flow_resumes_without_repeating_finished_stages(stack, default_run):
    config = {
        **stack.config,
        "run_name": "killed",
        "wrpo": {**stack.config["wrpo"], "max_steps": 400, "logging_steps": 100},
    }
    root = stack.runs / "killed"
    started, first_id = deployment_run(stack, "--param", f"config={json.dumps(config)}", watch=False)
    assert started.returncode == 0, started.stderr
    # Kill the flow's process while WRPO trains (400 steps: a window of several seconds).
    stack.wait_for(lambda: (root / "manifests" / "select-target.json").exists(), RUN_TIMEOUT,
                   "the killed run to reach WRPO training", every=0.5)  # fmt: skip
    for child in psutil.Process(stack.worker.pid).children(recursive=True):
        child.kill()
    before = {name: m["completed_at"] for name, m in manifests(root).items()}
    assert "wrpo" not in before and "select-target" in before

    done, second_id = deployment_run(stack, "--param", f"config={json.dumps(config)}")
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{stack.log_tail()}"
    after = {name: m["completed_at"] for name, m in manifests(root).items()}
    assert {name: after[name] for name in before} == before  # finished stages were not redone
    assert {"wrpo", "evaluate", "register"} <= set(after)
    logs = run_logs(stack, second_id)
    for name in before:
        assert f"stage {name}: skipped" in logs, name
    assert "stage wrpo: ran" in logs
    with client(stack) as c:
        assert c.read_flow_run(first_id).state_type != StateType.COMPLETED


def test_the_ui_shows_the_deployment_and_its_parameter_form(stack):
    chromium = find_chromium()
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium in CI: deployments/install-chromium.sh should have installed it")
        pytest.skip("no chromium (deployments/install-chromium.sh installs it)")
    with client(stack) as c:
        deployment = c.read_deployment_by_name("wrpo-fusion/default")
    form = expected_form_strings(deployment.parameter_openapi_schema, deployment.parameters)
    expected = ["default", *(text.replace("`", "") for text in form)]  # descriptions render as markdown
    # The form shows what users set: sources, target, reward model, storage URL, alpha, beta, sample counts.
    wanted = ("config", "Source models", "Target model", "Reward model", "Url", "Alpha", "Beta",
              "Responses sampled per prompt.", "use_source_registry")  # fmt: skip
    assert set(wanted) <= set(expected), set(wanted) - set(expected)
    dom = deployment_form_dom(stack.ui_url, str(deployment.id), chromium=chromium, expect=expected)
    assert not missing_strings(dom, expected), missing_strings(dom, expected)


def test_a_discovery_run_registers_a_new_hub_model_and_its_event_starts_a_completed_refusion(
    stack, default_run, tiny_model_dir
):
    """The scheduled discovery, started by hand: a new model on the hub -> registered -> re-fusion."""
    sha = stack.hub.push("wrpo-test/tiny-chat", tiny_model_dir, tags=["text-generation", "license:mit"],
                         downloads=50, at=dt.datetime.now(dt.UTC) - dt.timedelta(days=30))  # fmt: skip
    rules = {"watch": [{"name": "test-org", "authors": ["wrpo-test"], "tags": ["text-generation"],
                        "licenses": ["mit"], "min_age_days": 7, "min_downloads": 10,
                        "sampling": stack.config["sources"][0]["sampling"]}]}  # fmt: skip
    with client(stack) as c:
        dep_filter = DeploymentFilter(name=DeploymentFilterName(any_=["refusion"]))
        before = {r.id for r in c.read_flow_runs(deployment_filter=dep_filter)}
    done = stack.prefect("deployment", "run", "wrpo-discover/default", "--param", f"discovery={json.dumps(rules)}",
                         "--watch", "--watch-timeout", str(RUN_TIMEOUT), timeout=RUN_TIMEOUT + 60, check=False)  # fmt: skip
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{stack.log_tail()}"
    discover_id = run_id_of(done.stdout)
    with client(stack) as c:
        run = c.read_flow_run(discover_id)
        artifacts = c.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[discover_id]))
        )
    assert run.state_type == StateType.COMPLETED
    (report,) = [a for a in artifacts if a.key == "wrpo-discover-report"]
    assert f"| wrpo-test--tiny-chat | `wrpo-test/tiny-chat` | `{sha}` |" in report.data
    registered = json.loads((stack.runs / "registry" / "sources.json").read_text())["sources"]
    assert {"name": "wrpo-test--tiny-chat", "revision": sha} in [
        {"name": s["name"], "revision": s["revision"]} for s in registered
    ]

    def finished_refusion():
        with client(stack) as c:
            runs = [r for r in c.read_flow_runs(deployment_filter=dep_filter) if r.id not in before]
        return runs[0] if runs and runs[0].state_type in TERMINAL else None

    refusion = stack.wait_for(finished_refusion, RUN_TIMEOUT, "the re-fusion run started by the discovery")
    assert refusion.state_type == StateType.COMPLETED, (
        f"{refusion.state.message}\n{run_logs(stack, refusion.id)}"
    )
    (root,) = [p.parents[1] for p in stack.runs.glob("*/manifests/sample-wrpo-test--tiny-chat.json")]
    done_stages = manifests(root)
    assert (
        "reused_from" not in done_stages["sample-wrpo-test--tiny-chat"]
    )  # the discovered model was sampled...
    for source in stack.config["sources"]:  # ...the config's sources were not
        assert done_stages[f"sample-{source['name']}"]["reused_from"], source["name"]
    assert "register" in done_stages
