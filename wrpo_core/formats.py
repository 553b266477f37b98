"""Import and export of QUADRUPLES in the WRPO authors' released format and in TRL's preference format.

Authors' row: {prompt_id, prompt: {role: user, content: x},
chosen: [{assistant: y_ws}, {assistant: y_wt}], rejected: [{assistant: y_l}]} — source first in `chosen`.

TRL conversational row: {prompt_id, prompt: [{user: x}], chosen: [{assistant: y_wt}],
rejected: [{assistant: y_l}], source_chosen: [{assistant: y_ws}]} — a standard DPO pair plus y_ws.

Neither format carries scores or the source model: imported tables have null scores (QUADRUPLES
allows that; null means "unknown") and y_ws_model "". An imported row keeps its own `prompt_id`
when it has one, else the id is computed from the prompt text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import pyarrow as pa

from wrpo_core.prompts import prompt_id_of
from wrpo_core.schemas import QUADRUPLES, DataError, atomic_write, conform, iter_jsonl, quote

_TEXT_COLUMNS = ["prompt_id", "prompt", "y_ws", "y_wt", "y_l"]


def _message(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def _content(value: Any, role: str, *, at: str, name: str) -> str:
    """The content of one {role, content} message in field `name` of row `at`, checked."""
    if not isinstance(value, dict):
        raise DataError(
            f"{at}, field '{name}': expected a {{role, content}} message, got {type(value).__name__}"
        )
    if "role" not in value:
        raise DataError(f"{at}, field '{name}': message has no 'role' (expected {role!r})")
    if value.get("role") != role:
        raise DataError(
            f"{at}, field '{name}': message role is {quote(value.get('role'))}, expected {role!r}"
        )
    content = value.get("content")
    if not isinstance(content, str):
        problem = "missing" if "content" not in value else f"expected a string, got {type(content).__name__}"
        raise DataError(f"{at}, field '{name}.content': {problem}")
    return content


def _messages(value: Any, count: int, *, at: str, name: str) -> list[str]:
    """Contents of a list of exactly `count` assistant messages."""
    if not isinstance(value, list) or len(value) != count:
        got = f"a list of {len(value)}" if isinstance(value, list) else type(value).__name__
        raise DataError(
            f"{at}, field '{name}': expected a list of exactly {count} assistant message(s), got {got}"
        )
    return [_content(m, "assistant", at=at, name=f"{name}[{i}]") for i, m in enumerate(value)]


def _prompt(value: Any, *, at: str, name: str = "prompt") -> str:
    """Prompt text from a plain string, a user message dict or a list holding one user message."""
    if isinstance(value, list):
        if len(value) != 1:
            raise DataError(
                f"{at}, field '{name}': expected a list of exactly 1 user message, got a list of {len(value)}"
            )
        value, name = value[0], f"{name}[0]"
    text = value if isinstance(value, str) else _content(value, "user", at=at, name=name)
    if not text.strip():
        raise DataError(f"{at}, field '{name}': prompt is empty or whitespace only")
    return text


def _prompt_id(record: dict[str, Any], prompt: str, *, where: str) -> str:
    given = record.get("prompt_id")
    if given is None:
        return prompt_id_of(prompt)
    if not isinstance(given, str) or not given:
        raise DataError(f"{where}, field 'prompt_id': expected a non-empty string, got {quote(given)}")
    return given


def _require(record: Any, fields: list[str], *, where: str) -> None:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [f for f in fields if f not in record]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}; found {quote(sorted(record))}")


def _table(rows: list[tuple[str, str, str, str, str]], *, where: str) -> pa.Table:
    columns = list(zip(*rows, strict=True)) if rows else [(), (), (), (), ()]
    n = len(rows)
    data: dict[str, Any] = {
        name: pa.array(list(col), pa.string()) for name, col in zip(_TEXT_COLUMNS, columns, strict=True)
    }
    data["y_ws_model"] = pa.array([""] * n, pa.string())
    for name in ("y_ws_score", "y_wt_score", "y_l_score", "ref_logp_ws", "ref_logp_wt", "ref_logp_l"):
        data[name] = pa.nulls(n, pa.float64())
    return conform(pa.table(data).select(QUADRUPLES.names), QUADRUPLES, where=where)


def _text_rows(quadruples: pa.Table) -> list[dict[str, str]]:
    return conform(quadruples, QUADRUPLES, where="quadruples").select(_TEXT_COLUMNS).to_pylist()


def to_authors_records(quadruples: pa.Table) -> list[dict[str, Any]]:
    """QUADRUPLES -> rows of the authors' released format (chosen = [y_ws, y_wt], rejected = [y_l])."""
    return [
        {
            "prompt_id": row["prompt_id"],
            "prompt": _message("user", row["prompt"]),
            "chosen": [_message("assistant", row["y_ws"]), _message("assistant", row["y_wt"])],
            "rejected": [_message("assistant", row["y_l"])],
        }
        for row in _text_rows(quadruples)
    ]


class JsonlRecords(list):
    """The records of a JSONL file (a list) with `lines`, each record's 1-based line in the file."""

    def __init__(self, records: Iterable[tuple[int, dict[str, Any]]] = ()):
        pairs = list(records)
        super().__init__(record for _, record in pairs)
        self.lines = [line for line, _ in pairs]


def _located(records: Iterable[dict[str, Any]], where: str) -> Iterable[tuple[str, dict[str, Any]]]:
    """(location for errors, record): 'line N' for records read by `read_jsonl`, else 'row i' (0-based)."""
    lines = getattr(records, "lines", None)
    for index, record in enumerate(records):
        yield (f"{where}: line {lines[index]}" if lines is not None else f"{where}: row {index}"), record


def _refuse_empty(rows: list, *, where: str, shape: str) -> None:
    if not rows:
        raise DataError(f"{where}: no rows; expected one {shape} row per line")


def from_authors_records(records: Iterable[dict[str, Any]], *, where: str) -> pa.Table:
    """Rows of the authors' released format -> QUADRUPLES (null scores, y_ws_model "").

    Errors name `where`, the row (its line for records from `read_jsonl`) and the field; no rows is an error.
    """
    rows = []
    for at, record in _located(records, where):
        _require(record, ["prompt", "chosen", "rejected"], where=at)
        prompt = _prompt(record["prompt"], at=at)
        y_ws, y_wt = _messages(record["chosen"], 2, at=at, name="chosen")
        (y_l,) = _messages(record["rejected"], 1, at=at, name="rejected")
        rows.append((_prompt_id(record, prompt, where=at), prompt, y_ws, y_wt, y_l))
    _refuse_empty(rows, where=where, shape="authors'-format {prompt, chosen, rejected}")
    return _table(rows, where=where)


def to_trl_records(quadruples: pa.Table) -> list[dict[str, Any]]:
    """QUADRUPLES -> TRL conversational rows (chosen y_wt, rejected y_l) plus `source_chosen` (y_ws)."""
    return [
        {
            "prompt_id": row["prompt_id"],
            "prompt": [_message("user", row["prompt"])],
            "chosen": [_message("assistant", row["y_wt"])],
            "rejected": [_message("assistant", row["y_l"])],
            "source_chosen": [_message("assistant", row["y_ws"])],
        }
        for row in _text_rows(quadruples)
    ]


def from_trl_records(records: Iterable[dict[str, Any]], *, where: str) -> pa.Table:
    """TRL conversational preference rows with `source_chosen` -> QUADRUPLES (null scores, y_ws_model "").

    Errors name `where`, the row (its line for records from `read_jsonl`) and the field; no rows is an error.
    """
    rows = []
    for at, record in _located(records, where):
        _require(record, ["prompt", "chosen", "rejected", "source_chosen"], where=at)
        prompt = _prompt(record["prompt"], at=at)
        (y_wt,) = _messages(record["chosen"], 1, at=at, name="chosen")
        (y_l,) = _messages(record["rejected"], 1, at=at, name="rejected")
        (y_ws,) = _messages(record["source_chosen"], 1, at=at, name="source_chosen")
        rows.append((_prompt_id(record, prompt, where=at), prompt, y_ws, y_wt, y_l))
    _refuse_empty(rows, where=where, shape="TRL {prompt, chosen, rejected, source_chosen}")
    return _table(rows, where=where)


def write_jsonl(records: Iterable[dict[str, Any]], url: str) -> None:
    """Write records as UTF-8 JSON lines to `url` (any fsspec URL), atomically."""

    def write(handle: Any) -> None:
        for record in records:
            handle.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))

    atomic_write(url, write)


def read_jsonl(url: str) -> JsonlRecords:
    """Read JSON-lines records from `url`; blank lines are skipped, a bad line raises DataError naming it.

    The list's `lines` hold each record's line, so `from_authors_records` / `from_trl_records` name lines.
    A missing file or one that is not UTF-8 raises DataError naming it (and the line).
    """
    return JsonlRecords(iter_jsonl(url))
