"""worker/report_html.py: the HTML report has its three plots and escapes what the client sent."""

from __future__ import annotations

from worker.report_html import render_report_html


def test_report_html_has_the_three_plots():
    report = {
        "model": {"id": "fmnist-vit-tiny"},
        "w_bits": 4,
        "a_bits": 4,
        "method": "isvit",
        "preset": "smoke",
        "fp": {"top1": 0.84, "top5": 0.99, "n": 64},
        "quant": {"top1": 0.8, "top5": 0.98, "n": 64, "agreement": 0.9},
        "layers": [{"name": "blocks.0.attn.qkv", "sqnr_db": 21.5}, {"name": "head", "sqnr_db": 12.0}],
        "reconstruction": [{"stage": "stage1", "unit": "blocks.0", "loss_start": 40.0, "loss_end": 3.0}],
        "seconds": {"calibrate": 1.5, "total": 3.0},
        "device": "cpu",
    }
    html = render_report_html(report, job_id="job_x")
    assert html.count("<svg") == 3
    assert "84.00%" in html and "80.00%" in html and "blocks.0.attn.qkv" in html and "stage1" in html
    hostile = dict(report, model={"id": "<script>alert(1)</script>"})
    assert "<script>" not in render_report_html(hostile)
