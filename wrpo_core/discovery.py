"""Discovery of new source models on the Hugging Face Hub: watch rules -> checked models -> the registry.

    report = discover_sources(cfg, rules, registry)   # a FusionConfig, a DiscoveryConfig, the registry
    report.registered   # registered now (or, with dry_run, that would be): name, hub id, revision, TP size
    report.rejected     # hub id, revision and every rule's reason
    report.unchanged    # watched models already a source at their current revision

For each watch rule, and each of its authors, the hub lists the models with the rule's tags and
search text, newest revision first (`wrpo_core.hub`, i.e. huggingface_hub: `HF_ENDPOINT` and tokens
apply). A model that a source of the config or of the registry already pins at its current commit
is unchanged. Any other is tested against the rules that listed it, in order, until one accepts it
(`wrpo_core.candidates`: the listing's facts, then loading its config and tokenizer at that commit,
its chat template, remote code, and whether it fits the sampling cluster).

An accepted model is registered pinned to its commit sha: a new hub id as a new source named
`<author>--<name>` with the rule's sampling settings; a new commit of a known source (or one that
was not pinned) under that source's name with its settings and the new revision. The revision is
part of the source's sample-stage key, so a re-fusion samples that source again and reuses every
other source's samples. Discovery never unregisters a source. It emits no event itself: the CLI
(through `CliHooks`) and the `wrpo-discover` flow send `wrpo.source.added` for each registration.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from wrpo_core import hub
from wrpo_core.candidates import CheckedModel, Rejected, check_revision, listing_problem
from wrpo_core.config import DiscoveryConfig, FusionConfig, ModelSpec, WatchRule
from wrpo_core.registry import add_source, read_sources
from wrpo_core.storage import Storage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Registration:
    """A source registered (or, in a dry run, to be registered) by discovery."""

    spec: ModelSpec
    rule: str
    checked: CheckedModel
    previous: ModelSpec | None
    """The known source this is a new revision of (None: a new source)."""
    replaces: bool
    """Whether a registered entry of that name is replaced (False: added to the registry)."""
    version: int | None = None
    """Registry version right after this registration (None in a dry run)."""

    def to_dict(self) -> dict[str, Any]:
        data = {
            "name": self.spec.name, "path": self.spec.path, "revision": self.spec.revision, "rule": self.rule,
            "action": "replace" if self.replaces else "add", "parameters": self.checked.parameters,
            "weights_gib": self.checked.weights_gib, "tensor_parallel_size": self.spec.tensor_parallel_size,
            "trust_remote_code": self.spec.trust_remote_code, "version": self.version,
        }  # fmt: skip
        if self.previous is not None:
            data["previous_revision"] = self.previous.revision
        return data


@dataclass
class DiscoveryReport:
    """What one discovery run found; `to_dict()` is the CLI's output and the flow's artifact data."""

    registry: str
    endpoint: str
    dry_run: bool
    version: int
    registered: list[Registration] = field(default_factory=list)
    unchanged: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "registry": self.registry, "hub": self.endpoint, "dry_run": self.dry_run, "version": self.version,
            "registered": [r.to_dict() for r in self.registered], "unchanged": self.unchanged,
            "rejected": self.rejected,
        }  # fmt: skip


def source_name(repo_id: str) -> str:
    """The source name of a newly discovered hub model: `author--name` (unique per hub id, a valid key)."""
    return repo_id.replace("/", "--")


def _known_sources(cfg: FusionConfig, registry: Mapping[str, Any]) -> dict[str, ModelSpec]:
    """The sources a re-fusion fuses, by name: the config's, replaced by registered ones of the same name."""
    known = {s.name: s for s in cfg.sources}
    known.update({s["name"]: ModelSpec.model_validate(s) for s in registry["sources"]})
    return known


def _listed(rules: list[WatchRule]) -> dict[str, tuple[hub.HubModel, list[WatchRule]]]:
    """Every model a rule lists, once, with the rules that listed it (in config order)."""
    found: dict[str, tuple[hub.HubModel, list[WatchRule]]] = {}
    for rule in rules:
        for author in rule.authors or [None]:
            models = hub.list_models(author=author, tags=rule.tags, search=rule.search, limit=rule.limit)
            logger.info("rule %s: %d models listed for %s", rule.name, len(models), author or "any author")
            for model in models:
                entry = found.setdefault(model.repo_id, (model, []))
                if rule not in entry[1]:
                    entry[1].append(rule)
    return found


def _current(model: hub.HubModel) -> hub.HubModel:
    if model.sha:
        return model
    current, _ = hub.model_at(model.repo_id)  # the listing gave no commit: ask for the default branch
    return current


def _accept(
    model: hub.HubModel, rules: list[WatchRule], cfg: DiscoveryConfig, now: dt.datetime, dtype: str | None
) -> tuple[WatchRule, CheckedModel] | list[str]:
    """The first rule that accepts the model with its checks, or every rule's reason."""
    reasons = []
    for rule in rules:
        problem = listing_problem(rule, model, now)
        if problem is None:
            try:
                checked = check_revision(
                    rule, model.repo_id, model.sha, cfg.cluster, dtype=dtype or rule.dtype
                )
            except Rejected as rejected:
                problem = str(rejected)
            else:
                return rule, checked
        reasons.append(f"{rule.name}: {problem}")
    return reasons


def discover_sources(
    cfg: FusionConfig,
    rules: DiscoveryConfig,
    storage: Storage,
    *,
    dry_run: bool = False,
    now: dt.datetime | None = None,
) -> DiscoveryReport:
    """Lists, checks and (unless `dry_run`) registers the new models and revisions `rules` accept.

    `cfg` is the fusion config the re-fusion runs (its sources count as known, so a watched model
    that is already one of them gets pinned rather than added twice); `storage` holds the registry
    (`registry.open_registry(cfg.storage.url, ...)`). Raises `hub.HubError` when the hub cannot be
    asked; a model that fails a check is in `rejected`, with the reason.
    """
    now = now or dt.datetime.now(dt.UTC)
    document = read_sources(storage)
    registered_names = {s["name"] for s in document["sources"]}
    known = _known_sources(cfg, document)
    report = DiscoveryReport(storage.display(), hub.endpoint(), dry_run, document["version"])
    for repo_id, (listed, listing_rules) in _listed(rules.watch).items():
        try:
            model = _current(listed)
        except hub.ModelUnavailable as error:
            report.rejected.append({"path": repo_id, "revision": None, "reasons": [str(error)]})
            continue
        sources = [s for s in known.values() if s.path == repo_id]
        outdated = [s for s in sources if s.revision != model.sha]
        if sources and not outdated:
            report.unchanged.append(
                {"path": repo_id, "revision": model.sha, "names": [s.name for s in sources]}
            )
            continue
        if not sources:
            name = source_name(repo_id)
            if name in known:
                report.rejected.append({"path": repo_id, "revision": model.sha, "reasons": [
                    f"source name {name} is taken by {known[name].path}"]})  # fmt: skip
                continue
        for spec in outdated or [None]:
            accepted = _accept(model, listing_rules, rules, now, spec.dtype if spec else None)
            if isinstance(accepted, list):
                logger.info("rejected %s@%s: %s", repo_id, model.sha, "; ".join(accepted))
                report.rejected.append({"path": repo_id, "revision": model.sha, "reasons": accepted})
                break
            rule, checked = accepted
            report.registered.append(_registration(rule, checked, spec, registered_names))
    if not dry_run:
        for index, registration in enumerate(report.registered):
            note = {"by": "discovery", "rule": registration.rule, "revision": registration.spec.revision}
            document = add_source(storage, registration.spec, replace=registration.replaces, note=note)
            report.registered[index] = replace(registration, version=document["version"])
            logger.info("registered %s = %s@%s (registry version %d)", registration.spec.name,
                        registration.spec.path, registration.spec.revision, document["version"])  # fmt: skip
        report.version = document["version"]
    return report


def _registration(
    rule: WatchRule, checked: CheckedModel, known: ModelSpec | None, registered_names: set[str]
) -> Registration:
    if known is None:
        spec = ModelSpec(
            path=checked.repo_id, name=source_name(checked.repo_id), revision=checked.revision,
            backend=rule.backend, dtype=rule.dtype, tensor_parallel_size=checked.tensor_parallel_size,
            trust_remote_code=checked.needs_remote_code, sampling=rule.sampling,
        )  # fmt: skip
        return Registration(spec, rule.name, checked, None, False)
    spec = known.model_copy(
        update={
            "revision": checked.revision,
            "tensor_parallel_size": max(known.tensor_parallel_size, checked.tensor_parallel_size),
            "trust_remote_code": known.trust_remote_code or checked.needs_remote_code,
        }
    )
    return Registration(spec, rule.name, checked, known, known.name in registered_names)


def _cell(value: object) -> str:
    """A markdown table cell: pipes escaped, angle brackets spelled out (the UI renders HTML tags)."""
    return str(value).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")


def report_markdown(report: Mapping[str, Any]) -> str:
    """A discovery report (`DiscoveryReport.to_dict()`) as markdown: registered, rejected, unchanged."""
    verb = "Would register" if report["dry_run"] else "Registered"
    lines = [
        f"# Source discovery{' (dry run)' if report['dry_run'] else ''}",
        "",
        f"Hub `{report['hub']}`, registry `{report['registry']}` (version {report['version']}).",
        "",
        f"## {verb}: {len(report['registered'])}",
    ]
    if report["registered"]:
        lines += ["", "| source | hub id | revision | previous revision | rule | parameters | TP |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        lines += [
            f"| {_cell(r['name'])} | `{_cell(r['path'])}` | `{r['revision']}` | "
            f"{_cell(r.get('previous_revision', 'new source'))} | {_cell(r['rule'])} | {r['parameters']:,} | "
            f"{r['tensor_parallel_size']} |"
            for r in report["registered"]
        ]
    lines += ["", f"## Rejected: {len(report['rejected'])}"]
    if report["rejected"]:
        lines += ["", "| hub id | revision | reasons |", "|---|---|---|"]
        lines += [
            f"| `{_cell(r['path'])}` | `{r['revision']}` | {_cell('; '.join(r['reasons']))} |"
            for r in report["rejected"]
        ]
    lines += ["", f"## Unchanged (already a source at this revision): {len(report['unchanged'])}"]
    lines += [
        f"- `{_cell(u['path'])}` @ `{u['revision']}` ({_cell(', '.join(u['names']))})"
        for u in report["unchanged"]
    ]
    return "\n".join(lines) + "\n"
