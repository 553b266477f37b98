"""Fast tests of tests/prefect_ui.py: its pure logic, a fake chromium, and one real-Chromium render (skipped without one)."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal

import pytest
from prefect_ui import (
    ChromiumError,
    chromium_command,
    deployment_url,
    expected_form_strings,
    find_chromium,
    is_chromium_error_page,
    missing_strings,
    render_dom,
    visible_text,
)
from pydantic import BaseModel, ConfigDict, Field


def _executable(path: Path, body: str = "#!/bin/sh\nexit 0\n") -> Path:
    path.write_text(body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


# ---------------------------------------------------------------- find_chromium / command line


def test_find_chromium_searches_path_in_name_order(tmp_path, monkeypatch):
    monkeypatch.delenv("CHROME_BIN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_chromium() is None
    (tmp_path / "chromium").write_text("not executable")
    assert find_chromium() is None
    chrome = _executable(tmp_path / "google-chrome")
    assert find_chromium() == str(chrome)
    browser = _executable(tmp_path / "chromium-browser")
    assert find_chromium() == str(browser)  # chromium-browser comes before google-chrome


def test_find_chromium_prefers_chrome_bin(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    _executable(tmp_path / "chromium")
    custom = _executable(tmp_path / "my-chrome")
    monkeypatch.setenv("CHROME_BIN", str(custom))
    assert find_chromium() == str(custom)
    monkeypatch.setenv("CHROME_BIN", str(tmp_path / "missing"))
    assert find_chromium() == str(tmp_path / "chromium")


def test_chromium_command_dump_dom_and_screenshot():
    cmd = chromium_command("/x/chromium", "http://h/p", user_data_dir="/tmp/prof", wait_ms=1234)
    assert cmd[0] == "/x/chromium"
    assert cmd[-2:] == ["--dump-dom", "http://h/p"]
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        assert flag in cmd
    assert "--virtual-time-budget=1234" in cmd
    assert "--user-data-dir=/tmp/prof" in cmd
    shot = chromium_command(
        "c", "u", user_data_dir="d", wait_ms=0, screenshot="/o/a.png", window_size=(800, 600)
    )
    assert shot[-2:] == ["--screenshot=/o/a.png", "u"]
    assert "--dump-dom" not in shot
    assert "--window-size=800,600" in shot
    with pytest.raises(ValueError):
        chromium_command("c", "u", user_data_dir="d", wait_ms=-1)


def test_deployment_url():
    assert (
        deployment_url("http://127.0.0.1:4731/", "abc")
        == "http://127.0.0.1:4731/deployments/deployment/abc/run"
    )
    assert deployment_url("http://h:1", "abc", page="") == "http://h:1/deployments/deployment/abc"
    assert deployment_url("http://h:1", "abc", ui="v2") == "http://h:1/v2/deployments/deployment/abc/run"
    assert deployment_url("http://h:1/v2/", "abc", ui="v2") == "http://h:1/v2/deployments/deployment/abc/run"
    with pytest.raises(ValueError):
        deployment_url("http://h:1", "abc", ui="v3")  # type: ignore[arg-type]


# ---------------------------------------------------------------- DOM text


DOM = """<html><head><title>Create Flow Run for Deployment: my-dep • Prefect Server</title>
<style>.x{content:"Hidden Style"}</style><script>var s = "Hidden Script";</script></head>
<body><div data-label="Attr Only"><label>Run   Label
 (Optional)</label><p>Tom &amp; Jerry</p><svg><text>Svg Text</text></svg>
<span>split</span><span>text</span></div></body></html>"""


def test_visible_text_skips_markup_and_normalizes():
    text = visible_text(DOM)
    assert text[0] == "Create Flow Run for Deployment: my-dep • Prefect Server"
    assert "Run Label (Optional)" in text
    assert "Tom & Jerry" in text
    joined = " ".join(text)
    for hidden in ("Hidden Style", "Hidden Script", "Svg Text", "Attr Only"):
        assert hidden not in joined


def test_missing_strings():
    assert missing_strings(DOM, ["my-dep", "Run Label", "Tom & Jerry", "split text", "Run\n Label"]) == []
    assert missing_strings(DOM, ["Attr Only", "Hidden Script", "nope", "my-dep"]) == [
        "Attr Only",
        "Hidden Script",
        "nope",
    ]


def test_is_chromium_error_page():
    assert is_chromium_error_page('<html><body class="neterror" style="x"><div id="x"></div></body></html>')
    assert is_chromium_error_page('<div id="main-frame-error" class="interstitial-wrapper">')
    assert not is_chromium_error_page(DOM)


# ---------------------------------------------------------------- expected_form_strings


class Sampler(BaseModel):
    """Sampling settings."""

    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(0.7, ge=0, title="Sampling Temperature", description="Softmax temperature.")
    top_k: int = 50


class Judge(BaseModel):
    judge_path: str = Field("j", description="Judge checkpoint.")


class Source(BaseModel):
    name: str = Field(..., description="Model id.")
    n_samples: int = Field(4, ge=1)
    role: Literal["teacher", "student"] = "teacher"


class Cfg(BaseModel):
    run_label: str = Field("x", title="Run Label Title")
    mode: Literal["fast", "full"] = "fast"
    sampler: Sampler = Sampler()
    judge: Judge | None = Field(None, description="Optional judge.")
    note: str | None = Field(None, description="Nullable note.")
    sources: list[Source] = Field(default_factory=lambda: [Source(name="a")])


DEFAULT_CFG = Cfg()


def _flow_schema() -> dict:
    """The parameter schema `prefect deploy` stores for a flow whose only parameter is a Cfg."""
    from prefect.utilities.callables import parameter_schema

    def probe(cfg: Cfg = DEFAULT_CFG, other: int = 3) -> None:
        """Probe.

        Args:
            cfg: The whole configuration.
            other: Another number.
        """

    return parameter_schema(probe).model_dump_for_openapi()


def test_expected_form_strings_defaults():
    got = expected_form_strings(_flow_schema())
    assert got == [
        "cfg",
        "The whole configuration.",
        "Run Label Title",
        "Mode",
        "Sampler",  # untitled $ref property: the model's title ...
        "Sampling settings.",  # ... and its docstring
        "Sampling Temperature",
        "Softmax temperature.",
        "Top K",
        "Optional judge.",  # untitled anyOf: description only; judge is None, so no Judge fields
        "Note",
        "Nullable note.",
        "Sources",
        "Name",  # the default list has one item, so the item model's fields show
        "Model id.",
        "N Samples",
        "Role",
        "other",
        "Another number.",
    ]


def test_expected_form_strings_follows_parameters():
    schema = _flow_schema()
    got = expected_form_strings(schema, {"cfg": {"sources": [], "judge": {"judge_path": "p"}}})
    assert "Judge Path" in got and "Judge checkpoint." in got  # non-null anyOf value: branch fields
    assert "Name" not in got and "Model id." not in got  # empty list: no item fields
    assert "Sampling Temperature" in got  # a nested model shows even when the value omits it
    # Shallow merge like the server: a given top-level value replaces the default wholesale.
    assert "Name" in expected_form_strings(schema, {"cfg": {"sources": [{"name": "b"}]}})
    assert "Name" not in expected_form_strings(schema, {"cfg": {}})


def test_expected_form_strings_rejects_cycles():
    schema = {
        "properties": {"n": {"$ref": "#/definitions/Node"}},
        "definitions": {"Node": {"title": "Node", "properties": {"child": {"$ref": "#/definitions/Node"}}}},
    }
    with pytest.raises(ValueError, match="deeper"):
        expected_form_strings(schema)
    with pytest.raises(ValueError, match="unsupported"):
        expected_form_strings({"properties": {"x": {"$ref": "other.json#/X"}}})


# ---------------------------------------------------------------- render_dom with a fake chromium


def _fake_chromium(tmp_path: Path, script: str) -> str:
    return str(_executable(tmp_path / "fake-chromium", "#!/bin/sh\n" + script))


def test_render_dom_returns_stdout_and_passes_url(tmp_path):
    fake = _fake_chromium(
        tmp_path, 'for a in "$@"; do last="$a"; done\necho "<html><body>$last</body></html>"\n'
    )
    dom = render_dom("http://h/page", chromium=fake, timeout_s=10)
    assert visible_text(dom) == ["http://h/page"]


@pytest.mark.parametrize(
    ("script", "match"),
    [
        ("echo boom >&2; exit 3\n", "exited 3"),
        ("exit 0\n", "exited 0"),
        (
            'echo \'<body class="neterror"><div id="main-frame-error">ERR_CONNECTION_REFUSED</div>\'\n',
            "REFUSED",
        ),
    ],
)
def test_render_dom_errors(tmp_path, script, match):
    with pytest.raises(ChromiumError, match=match):
        render_dom("http://h/", chromium=_fake_chromium(tmp_path, script), timeout_s=10)


def test_render_dom_timeout_kills_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    fake = _fake_chromium(tmp_path, f"sleep 30 &\necho $! > {pid_file}\nwait\n")
    start = time.monotonic()
    with pytest.raises(ChromiumError, match="timed out"):
        render_dom("http://h/", chromium=fake, timeout_s=1)
    assert time.monotonic() - start < 10
    child = int(pid_file.read_text())
    for _ in range(50):  # the process group got SIGKILL; the reparented child is reaped shortly
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"child process {child} of the fake chromium survived the timeout")


# ---------------------------------------------------------------- one real render (needs chromium)


class _SlowApi(BaseHTTPRequestHandler):
    PAGE = b"""<!doctype html><html><body><div id="app">loading</div><script>
fetch('/api/data').then(r => r.json()).then(d => {
  document.getElementById('app').textContent = 'loaded ' + d.name;
});
</script></body></html>"""

    def do_GET(self):
        if self.path == "/api/data":
            time.sleep(1.5)  # slower than the virtual-time budget below
            body, ctype = json.dumps({"name": "dep-xyz"}).encode(), "application/json"
        else:
            body, ctype = self.PAGE, "text/html"
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.skipif(find_chromium() is None, reason="no chromium (deployments/install-chromium.sh)")
def test_render_dom_waits_for_pending_fetch_with_real_chromium():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        dom = render_dom(url, chromium=find_chromium(), timeout_s=60, wait_ms=200)
    finally:
        server.shutdown()
        server.server_close()
    assert missing_strings(dom, ["loaded dep-xyz"]) == []
    assert "loading" not in visible_text(dom)
