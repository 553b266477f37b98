"""Headless-Chromium helpers to check what the Prefect 3.9 UI shows (used by integration tests).

Checked against Prefect 3.9.1 and Debian's Chromium 150 on a local server started with
``PREFECT_SERVER_API_HOST=127.0.0.1 PREFECT_SERVER_API_PORT=$P prefect server start``. With those
variables ``/ui-settings`` reports ``api_url=http://127.0.0.1:$P/api``, so the UI needs no
``PREFECT_UI_URL``/``PREFECT_UI_API_URL``.

The server serves two UIs:

* ``v1`` (Vue) at ``/``: ``/deployments/deployment/<id>`` (the "View Deployment in UI" link that
  ``prefect deploy`` prints) and ``/deployments/deployment/<id>/run`` (the "Custom run" form).
  Deep links are served as is; only a navigation to ``/`` itself is redirected to the default UI.
* ``v2`` (React, the default UI in 3.9.1: ``/`` redirects to ``/v2/``) under ``/v2``, with the same
  paths. It also prints the current parameter values as text; v1 keeps them in input properties,
  which a DOM dump does not show.

``chromium --headless --dump-dom`` with ``--virtual-time-budget`` is enough: virtual time does not
advance while requests are pending, so the dump comes after the app has fetched from the API.
A render takes about 2-3 s (v1) or 4-9 s (v2) on 2 cores.

Typical use in a test::

    chromium = find_chromium() or pytest.skip("no chromium")
    dom = deployment_form_dom(ui_url, str(dep.id), chromium=chromium)
    expected = [dep.name, *expected_form_strings(dep.parameter_openapi_schema, dep.parameters)]
    assert not missing_strings(dom, expected)
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from html.parser import HTMLParser
from typing import Any, Literal

CHROMIUM_NAMES = (
    "chromium",
    "chromium-browser",
    "google-chrome",
    "google-chrome-stable",
    "chrome",
    "chrome-headless-shell",
    "headless_shell",
)

# Flags that matter here: --no-sandbox (we run as root), --disable-dev-shm-usage (small /dev/shm
# in containers), a throwaway --user-data-dir per call (no profile lock between calls), and
# --virtual-time-budget (the dump waits for the app's fetches and timers).
BASE_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-extensions",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    "--mute-audio",
    "--hide-scrollbars",
)

UiVersion = Literal["v1", "v2"]

_FORM_READY_MARKERS = ("Parameters", "Submit")
_RUN_TITLE = re.compile(r"<title>\s*Create Flow Run for Deployment: .+?</title>", re.S)


class ChromiumError(RuntimeError):
    """Chromium failed, timed out, or could not load the page."""


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary: ``$CHROME_BIN`` if set and executable, else the first on PATH."""
    env = os.environ.get("CHROME_BIN")
    if env:
        found = shutil.which(env)
        if found:
            return found
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def chromium_command(
    chromium: str,
    url: str,
    *,
    user_data_dir: str,
    wait_ms: int,
    screenshot: str | None = None,
    window_size: tuple[int, int] = (1280, 2400),
    extra_flags: Sequence[str] = (),
) -> list[str]:
    """The argv that dumps the DOM of ``url`` (or takes a screenshot if ``screenshot`` is a path)."""
    if wait_ms < 0:
        raise ValueError(f"wait_ms must be >= 0, got {wait_ms}")
    cmd = [
        chromium,
        *BASE_FLAGS,
        f"--user-data-dir={user_data_dir}",
        f"--window-size={window_size[0]},{window_size[1]}",
        f"--virtual-time-budget={wait_ms}",
        *extra_flags,
    ]
    cmd.append(f"--screenshot={screenshot}" if screenshot else "--dump-dom")
    cmd.append(url)
    return cmd


def is_chromium_error_page(dom: str) -> bool:
    """True for Chromium's own "This site can't be reached" page (e.g. ERR_CONNECTION_REFUSED)."""
    return 'id="main-frame-error"' in dom or bool(re.search(r'<body[^>]*class="neterror', dom))


def _run_chromium(cmd: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    # Own session, so a timeout kills the renderer/GPU/zygote children too.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise ChromiumError(f"chromium timed out after {timeout_s} s: {cmd[-1]}\n{err[-2000:]}") from None
    finally:
        if proc.poll() is None:  # pragma: no cover - only on unexpected exceptions
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def render_dom(url: str, *, chromium: str, timeout_s: float = 60, wait_ms: int = 5000) -> str:
    """The serialized DOM of ``url`` after its JavaScript ran (``chromium --headless --dump-dom``).

    ``wait_ms`` is Chromium's *virtual* time budget: it costs little wall time, and virtual time
    stops while network requests are pending. Raises ``ChromiumError`` if Chromium fails, times
    out, or shows its network error page (server not reachable).
    """
    with tempfile.TemporaryDirectory(prefix="prefect-ui-chromium-") as profile:
        cmd = chromium_command(chromium, url, user_data_dir=profile, wait_ms=wait_ms)
        res = _run_chromium(cmd, timeout_s)
    if res.returncode != 0 or not res.stdout.strip():
        raise ChromiumError(f"chromium exited {res.returncode} for {url}\n{res.stderr[-2000:]}")
    if is_chromium_error_page(res.stdout):
        codes = sorted(set(re.findall(r"ERR_[A-Z_]+", res.stdout)))
        raise ChromiumError(f"chromium could not load {url}: {', '.join(codes) or 'network error page'}")
    return res.stdout


def screenshot(
    url: str,
    path: str | os.PathLike[str],
    *,
    chromium: str,
    timeout_s: float = 60,
    wait_ms: int = 5000,
    window_size: tuple[int, int] = (1280, 2400),
) -> str:
    """Save a PNG of ``url`` (after its JavaScript ran) to ``path``; returns the path."""
    path = os.path.abspath(os.fspath(path))
    with tempfile.TemporaryDirectory(prefix="prefect-ui-chromium-") as profile:
        cmd = chromium_command(
            chromium, url, user_data_dir=profile, wait_ms=wait_ms, screenshot=path, window_size=window_size
        )
        res = _run_chromium(cmd, timeout_s)
    if res.returncode != 0 or not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise ChromiumError(f"chromium screenshot failed ({res.returncode}) for {url}\n{res.stderr[-2000:]}")
    return path


def deployment_url(ui_url: str, deployment_id: str, *, page: str = "run", ui: UiVersion = "v1") -> str:
    """URL of a deployment's UI page: ``page="run"`` (the Custom run form) or ``""`` (details)."""
    if ui not in ("v1", "v2"):
        raise ValueError(f"ui must be 'v1' or 'v2', got {ui!r}")
    base = ui_url.rstrip("/")
    if ui == "v2" and not base.endswith("/v2"):
        base += "/v2"
    url = f"{base}/deployments/deployment/{deployment_id}"
    return f"{url}/{page.strip('/')}" if page else url


def deployment_form_dom(
    ui_url: str,
    deployment_id: str,
    *,
    chromium: str,
    ui: UiVersion = "v1",
    expect: Iterable[str] = (),
    attempts: int = 3,
    timeout_s: float = 60,
    wait_ms: int = 5000,
) -> str:
    """The rendered "Custom run" page of a deployment, with its parameter form.

    ``ui_url`` is the server root (``http://127.0.0.1:PORT``). Re-renders (doubling ``wait_ms``)
    up to ``attempts`` times until the form is rendered (its title names the deployment, and
    "Parameters" and "Submit" show) and every string in ``expect`` is in the visible text. Returns
    the last DOM either way: assert on it with :func:`missing_strings` for a readable failure.
    """
    url = deployment_url(ui_url, deployment_id, ui=ui)
    wanted = [*_FORM_READY_MARKERS, *expect]
    dom = ""
    for i in range(max(1, attempts)):
        dom = render_dom(url, chromium=chromium, timeout_s=timeout_s, wait_ms=wait_ms * 2**i)
        if _RUN_TITLE.search(dom) and not missing_strings(dom, wanted):
            break
    return dom


class _TextExtractor(HTMLParser):
    _SKIP = frozenset({"script", "style", "noscript", "template", "svg"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self._skip_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skip_depth += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP and self._skip_depth:
            self._skip_depth -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip_depth:
            text = " ".join(data.split())
            if text:
                self.chunks.append(text)


def visible_text(dom: str) -> list[str]:
    """The text nodes of ``dom`` (title included; script/style/svg skipped), whitespace-normalized."""
    parser = _TextExtractor()
    parser.feed(dom)
    parser.close()
    return parser.chunks


def missing_strings(dom: str, expected: Iterable[str]) -> list[str]:
    """The strings of ``expected`` that do not occur in the visible text of ``dom``.

    Whitespace is normalized on both sides; a string may span text nodes (they are joined with a
    space), but it is never matched inside markup or attribute values.
    """
    text = " ".join(visible_text(dom))
    return [s for s in expected if " ".join(s.split()) not in text]


def _resolve(node: Mapping[str, Any], schema: Mapping[str, Any]) -> Mapping[str, Any]:
    """Follow a local ``$ref`` (``#/definitions/X`` or ``#/$defs/X``), or a single-``$ref`` ``allOf``."""
    seen = 0
    while True:
        if "$ref" not in node and len(node.get("allOf", ())) == 1:
            node = node["allOf"][0]
        ref = node.get("$ref")
        if not isinstance(ref, str):
            return node
        if not ref.startswith("#/") or seen > 32:
            raise ValueError(f"unsupported or cyclic $ref: {ref!r}")
        target: Any = schema
        for part in ref[2:].split("/"):
            target = target[part]
        node, seen = target, seen + 1


def expected_form_strings(
    schema: Mapping[str, Any], parameters: Mapping[str, Any] | None = None
) -> list[str]:
    """Field labels and descriptions that both UIs (v1 and v2) show in a deployment's run form.

    ``schema`` is the deployment's ``parameter_openapi_schema``, ``parameters`` its default
    ``parameters`` (which win over the schema defaults, shallowly, like the server does). Rules,
    as observed in Prefect 3.9.1:

    * a property shows its ``title``; one without a title shows the title of the model its bare
      ``$ref`` points to. For an untitled ``anyOf`` (``Model | None`` fields) the UIs differ
      (v1: the capitalized name, v2: "Field"), so no label is expected;
    * its ``description`` (or, if it has none, the referenced model's docstring) shows;
    * the fields of a nested model show (recursively);
    * the fields of an ``anyOf`` branch show only when the value is an object (not ``None``);
    * the fields of a list's item model show only when the list is not empty.

    Returns unique strings in form order.
    """
    out: dict[str, None] = {}

    def add(s: Any) -> None:
        if isinstance(s, str) and s.strip():
            out[" ".join(s.split())] = None

    def walk_property(prop: Mapping[str, Any], value: Any, depth: int) -> None:
        if depth > 32:
            raise ValueError("schema nests deeper than 32 levels (cyclic model?)")
        target = _resolve(prop, schema)
        add(prop.get("title") or (target.get("title") if target is not prop else None))
        add(prop.get("description") or (target.get("description") if target is not prop else None))
        walk_body(target, value, depth)

    def walk_body(node: Mapping[str, Any], value: Any, depth: int) -> None:
        props = node.get("properties")
        if isinstance(props, Mapping):
            for name, sub in props.items():
                sub_value = (
                    value[name] if isinstance(value, Mapping) and name in value else sub.get("default")
                )
                walk_property(sub, sub_value, depth + 1)
        if "anyOf" in node and isinstance(value, Mapping):
            for branch in node["anyOf"]:
                branch_node = _resolve(branch, schema)
                if isinstance(branch_node.get("properties"), Mapping):
                    walk_body(branch_node, value, depth + 1)
                    break
        items = node.get("items")
        if isinstance(items, Mapping) and isinstance(value, list) and value:
            item_node = _resolve(items, schema)
            if isinstance(item_node.get("properties"), Mapping):
                for item in value:
                    walk_body(item_node, item, depth + 1)

    params = dict(parameters or {})
    top = schema.get("properties") or {}
    order = sorted(top, key=lambda k: (top[k].get("position", 1 << 30), k))
    for name in order:
        prop = top[name]
        walk_property(prop, params[name] if name in params else prop.get("default"), 0)
    return list(out)
