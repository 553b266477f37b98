"""Training-curve PNGs from metrics.jsonl rows: a real, decodable image of the expected size."""

import base64
import io

import pytest
from matplotlib.image import imread

from wrpo_core.plots import PNG_SIGNATURE, png_data_uri, training_curves_png


def wrpo_rows(steps: int = 8) -> list[dict]:
    """Rows as JsonlMetricsCallback writes them for a WRPO run, with the final summary row."""
    rows = [
        {
            "step": step,
            "time": 1000.0 + step,
            "loss": 0.69 - 0.02 * step,
            "grad_norm": 1.0,
            "learning_rate": 3e-7,
            "epoch": step / steps,
            "alpha": 0.1 * step / steps,
            "rewards/margins": 0.01 * step,
            "rewards/accuracies": 0.5,
        }
        for step in range(1, steps + 1)
    ]
    rows.append({"step": steps, "time": 2000.0, "train_runtime": 12.0, "train_loss": 0.6, "epoch": 1.0})
    return rows


def decode(png: bytes):
    return imread(io.BytesIO(png), format="png")


def test_png_decodes_with_the_expected_size():
    png = training_curves_png(wrpo_rows())
    assert png.startswith(PNG_SIGNATURE)
    assert len(png) < 300_000
    image = decode(png)
    assert image.shape[:2] == (350, 1200)
    assert image.std() > 0.01, "the image should not be blank"


def test_png_decodes_with_pillow_when_installed():
    pil = pytest.importorskip("PIL.Image")
    with pil.open(io.BytesIO(training_curves_png(wrpo_rows()))) as image:
        assert image.format == "PNG" and image.size == (1200, 350)


def test_rows_without_a_metric_are_skipped():
    rows = wrpo_rows()
    noisy = [
        *rows,
        {"step": 3, "loss": float("nan")},
        {"step": 4, "loss": "n/a", "alpha": None},
        {"loss": 0.1},  # no step
        {"step": 5, "eval_loss": 0.3},
    ]
    assert decode(training_curves_png(noisy)).tolist() == decode(training_curves_png(rows)).tolist()


def test_sft_rows_without_alpha_or_margins_still_plot():
    rows = [{"step": s, "loss": 2.0 / s, "learning_rate": 7e-6} for s in range(1, 5)]
    assert decode(training_curves_png(rows)).shape[:2] == (350, 1200)
    assert training_curves_png(rows) != training_curves_png(wrpo_rows(4))


def test_no_training_rows_is_a_clear_error():
    with pytest.raises(ValueError, match="no training rows to plot"):
        training_curves_png([])
    with pytest.raises(ValueError, match="none of 1 metrics rows"):
        training_curves_png([{"step": 8, "train_runtime": 12.0, "train_loss": 0.6}])


def test_png_data_uri_round_trips():
    png = training_curves_png(wrpo_rows(3))
    uri = png_data_uri(png)
    assert uri.startswith("data:image/png;base64,")
    assert base64.b64decode(uri.split(",", 1)[1]) == png
    with pytest.raises(ValueError, match="not a PNG"):
        png_data_uri(b"GIF89a")
