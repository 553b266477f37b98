"""`wrpo demo --quick`: the whole toy pipeline through the production stages, in seconds."""

import json

from wrpo_core.cli import main


def test_quick_demo_writes_the_four_row_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WRPO_CACHE", str(tmp_path / "cache"))
    import wrpo_core.demo as demo

    monkeypatch.setattr(demo, "DEFAULT_CACHE", tmp_path / "cache" / "toy-world")
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["results"]) == ["Target", "Target-SFT", "Target-SFT-DPO", "Target-SFT-WRPO"]
    for by_skill in report["results"].values():
        assert set(by_skill) == {*report["skills"], "all"}
        assert all(0.0 <= v["accuracy"] <= 1.0 for v in by_skill.values())
    assert report["held_out_prompts"] == 24
    markdown = (out / "report.md").read_text()
    assert markdown.count("| Target") == 4
    assert "dpo" in report["stages"] and "wrpo" in report["stages"]
    assert len(report["sources"]) == 3
    capsys.readouterr()
