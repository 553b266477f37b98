"""Loading remote-code reward models (`trust_remote_code`) under transformers 5: stand-ins for removed names.

ArmoRM (RLHFlow/ArmoRM-Llama3-8B-v0.1), the paper's reward model, ships its own modelling file
(`modeling_custom.py`, named by config.json's `auto_map`) that imports `LLAMA_INPUTS_DOCSTRING` from
`transformers.models.llama.modeling_llama`; transformers 5 removed it, so the file fails at import.
Before `from_pretrained(..., trust_remote_code=True)`, `prepare_remote_code` reads the remote modules
(the files `auto_map` names and the files they import relatively, from the local folder or the hub
cache at the model's revision), lists the names they import from `transformers` that the installed
version lacks, and supplies only stand-ins that cannot change what the model computes: docstring
constants (`*_DOCSTRING` -> "") and docstring decorators (identity). Any other missing name is a
`RemoteCodeError`, which is permanent (a retry cannot fix it): it subclasses ConfigError, a
ValueError, which the stage runner counts as permanent, and says so in `permanent` too.
`check_remote_code` is the entry point: it also refuses such a model without `trust_remote_code`.

A compatibility layer rather than a native reimplementation: it runs the authors' published forward
unchanged (the score definition and the gating-token search), and a reimplementation could not be
checked against the real weights offline.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wrpo_core.config import ConfigError

logger = logging.getLogger(__name__)

TESTED_TRANSFORMERS = ("5.20.2", "5.24.0")
"""The transformers versions this layer is tested under (the GPU locks' and the CPU constraints')."""

DOCSTRING_DECORATORS = frozenset(
    {
        "add_start_docstrings",
        "add_start_docstrings_to_model_forward",
        "add_end_docstrings",
        "add_code_sample_docstrings",
        "replace_return_docstrings",
    }
)
"""transformers' docstring decorator factories: they only edit `__doc__`, so an identity stand-in is safe."""

_SUPPLIED: set[tuple[str, str]] = set()
"""(module, name) pairs this process has supplied, so each is set and logged once."""


class RemoteCodeError(ConfigError):
    """A remote-code model that cannot be loaded with the installed transformers; retrying cannot help."""

    permanent = True


@dataclass(frozen=True)
class ImportedName:
    """One name a remote module imports from transformers: `from MODULE import NAME` at FILE:LINE."""

    file: str
    line: int
    module: str
    name: str | None
    """None for `import MODULE` (the module itself)."""

    def __str__(self) -> str:
        what = self.module if self.name is None else f"{self.module}.{self.name}"
        return f"{what} ({self.file}:{self.line})"


def _docstring_decorator(*args: Any, **kwargs: Any) -> Callable[[Any], Any]:
    """Stand-in for a removed transformers docstring decorator factory: leaves the function as it is."""
    return lambda fn: fn


def stand_in_for(name: str) -> object | None:
    """The safe stand-in for a removed transformers name, or None when there is none."""
    if name.endswith("_DOCSTRING") or name.endswith("_DOCSTRINGS"):
        return ""
    if name in DOCSTRING_DECORATORS:
        return _docstring_decorator
    return None


def _auto_map_files(path: str, auto_map: dict[str, Any]) -> list[tuple[str, str]]:
    """(repository or folder, file name) of each module that config.json's `auto_map` names."""
    files: list[tuple[str, str]] = []
    for value in auto_map.values():
        for reference in value if isinstance(value, list | tuple) else [value]:
            if not reference:  # a tokenizer entry's slow or fast class may be None
                continue
            # "org/repo--module.Class" names code in another repository.
            repo, _, reference = reference.rpartition("--")
            item = (repo or path, reference.rsplit(".", 1)[0].replace(".", "/") + ".py")
            if item not in files:
                files.append(item)
    return files


def _read_code(repo: str, filename: str, revision: str | None, model: str) -> str:
    """The text of one remote module, from a local folder or the hub (cache) at `revision`."""
    if Path(repo).is_dir():
        file = Path(repo) / filename
        if not file.is_file():
            raise RemoteCodeError(
                f"reward model {model}: {file} is named by config.json auto_map but missing"
            )
        return file.read_text(encoding="utf-8")
    from transformers.utils import cached_file  # as from_pretrained fetches it (hub.py is discovery's)

    found = cached_file(repo, filename, revision=revision)
    if found is None:
        raise RemoteCodeError(f"reward model {model}: {repo}@{revision or 'main'} has no {filename}")
    return Path(found).read_text(encoding="utf-8")


def _guarded(tree: ast.AST) -> set[int]:
    """ids of the nodes inside `try:` blocks that handle an ImportError themselves (optional imports)."""
    handled = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            handler.type is None
            or any(isinstance(n, ast.Name) and n.id in handled for n in ast.walk(handler.type))
            for handler in node.handlers
        ):
            guarded.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return guarded


def _imports(source: str, filename: str) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement of a module, with whether a `try` around it handles its ImportError."""
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as error:
        raise RemoteCodeError(f"{filename} is not valid Python: {error}") from error
    guarded = _guarded(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, id(node) in guarded


def transformers_imports(source: str, filename: str) -> list[ImportedName]:
    """The names a module imports from `transformers` outside a `try` that handles ImportError."""
    names: list[ImportedName] = []
    for node, guarded in _imports(source, filename):
        if guarded:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and node.module.split(".")[0] == "transformers":
                names += [ImportedName(filename, node.lineno, node.module, a.name) for a in node.names]
        else:
            names += [
                ImportedName(filename, node.lineno, a.name, None)
                for a in node.names
                if a.name.split(".")[0] == "transformers"
            ]
    return [n for n in names if n.name != "*"]


def _relative_imports(source: str, filename: str) -> list[str]:
    """File names (beside `filename`) of the modules it imports relatively (`from .x import y`)."""
    folder = filename.rsplit("/", 1)[0] + "/" if "/" in filename else ""
    files: list[str] = []
    for node, _ in _imports(source, filename):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            modules = [node.module] if node.module else [a.name for a in node.names]
            files += [folder + m.replace(".", "/") + ".py" for m in modules]
    return files


def is_available(imported: ImportedName) -> bool:
    """Whether the installed transformers has what `imported` names (a module attribute or submodule)."""
    try:
        module = importlib.import_module(imported.module)
    except Exception:  # ImportError, or transformers' RuntimeError for a lazy module that fails to import
        return False
    if imported.name is None:
        return True
    try:
        getattr(module, imported.name)
        return True
    except AttributeError:
        pass
    except Exception:  # a lazy attribute whose own import fails (a missing optional package)
        return False
    # `from package import submodule` names a module that is not an attribute until imported.
    return (
        hasattr(module, "__path__")
        and importlib.util.find_spec(f"{imported.module}.{imported.name}") is not None
    )


def remote_modules(path: str, revision: str | None, auto_map: dict[str, Any]) -> dict[str, str]:
    """Source of every remote module `auto_map` names, and of the files they import relatively, by file."""
    pending = _auto_map_files(path, auto_map)
    sources: dict[str, str] = {}
    while pending:
        repo, filename = pending.pop(0)
        shown = filename if repo == path else f"{repo}/{filename}"
        if shown in sources:
            continue
        sources[shown] = _read_code(repo, filename, revision if repo == path else None, path)
        pending += [(repo, f) for f in _relative_imports(sources[shown], filename)]
    return sources


def missing_names(path: str, revision: str | None, auto_map: dict[str, Any]) -> list[ImportedName]:
    """The transformers names the model's remote modules import that the installed transformers lacks.

    A name this process already supplied a stand-in for still counts as missing, so every load of
    the same model reports the same stand-ins.
    """
    found: list[ImportedName] = []
    for filename, source in remote_modules(path, revision, auto_map).items():
        found += [
            n
            for n in transformers_imports(source, filename)
            if (n.module, n.name) in _SUPPLIED or not is_available(n)
        ]
    return found


def _module_exists(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:  # as in is_available
        return False
    return True


def _versions_note() -> str:
    import transformers

    return (
        f"installed transformers is {transformers.__version__}; remote-code reward models are supported "
        f"under transformers {' and '.join(TESTED_TRANSFORMERS)} (missing docstring constants and "
        f"docstring decorators are supplied, nothing else)"
    )


def prepare_remote_code(path: str, revision: str | None, auto_map: dict[str, Any]) -> list[str]:
    """Supplies safe stand-ins for the removed names the model's remote code imports; the names supplied.

    Each stand-in is set on its transformers module only while that name is missing (idempotent) and
    logged once per process. Raises RemoteCodeError naming the model, the file and the names when a
    missing name has no safe stand-in (or its module is gone altogether).
    """
    missing = missing_names(path, revision, auto_map)
    safe = [
        (n, n.name, stand_in_for(n.name))
        for n in missing
        if n.name is not None and stand_in_for(n.name) is not None and _module_exists(n.module)
    ]
    if len(safe) < len(missing):
        unsafe = [n for n in missing if n not in {item[0] for item in safe}]
        raise RemoteCodeError(
            f"reward model {path}: its remote code imports names the installed transformers does not have "
            f"and that have no safe stand-in: {', '.join(map(str, unsafe))}; {_versions_note()}"
        )
    for imported, name, stand_in in safe:
        if (imported.module, name) not in _SUPPLIED:
            setattr(importlib.import_module(imported.module), name, stand_in)
            _SUPPLIED.add((imported.module, name))
            logger.info(
                "reward model %s: supplied a docstring-only stand-in for %s.%s (removed from transformers), "
                "imported at %s:%d",
                path, imported.module, name, imported.file, imported.line,
            )  # fmt: skip
    return sorted({f"{imported.module}.{name}" for imported, name, _ in safe})


def check_remote_code(path: str, revision: str | None, *, trusted: bool) -> list[str]:
    """Makes a reward model's remote code loadable, or refuses it; the stand-ins supplied (see module doc).

    Reads config.json (through transformers, so a missing model fails in its usual words). A model
    whose `auto_map` names its own sequence-classifier or config class needs `trusted`: without it
    transformers would quietly load its native class for the `model_type` (a randomly initialised
    score head, so garbage scores) or refuse, so it is refused here, naming the setting to change.
    """
    from transformers import PretrainedConfig

    auto_map = PretrainedConfig.get_config_dict(path, revision=revision)[0].get("auto_map") or {}
    remote = sorted(set(auto_map) & {"AutoModelForSequenceClassification", "AutoConfig"})
    if not trusted:
        if remote:
            raise RemoteCodeError(
                f"reward model {path}: config.json auto_map names its own code for {', '.join(remote)}; "
                "set `trust_remote_code: true` on reward_model to run it (only for authors you trust)"
            )
        return []
    return prepare_remote_code(path, revision, auto_map) if auto_map else []


def remote_code_import_error(path: str, error: ImportError) -> RemoteCodeError:
    """The permanent error for an ImportError raised while loading a model's remote code."""
    return RemoteCodeError(
        f"reward model {path}: its remote code failed to import: {error}; {_versions_note()}"
    )
