"""``florence report``: our numbers beside the paper's as Markdown."""
from __future__ import annotations

import json

import pytest

from florence.benchmarks import paper, report


def _result(task, dataset, metrics, protocol="p"):
    return {"task": task, "dataset": dataset, "protocol": protocol, "metrics": metrics,
            "model": {"path": "runs/m", "sha256": "ab" * 32}}


def test_paper_tables_have_the_spec_values():
    assert paper.ZERO_SHOT[paper.FLORENCE]["imagenet"] == 83.7
    assert paper.ZERO_SHOT["FILIP-ViT-L/14"].get("voc2007") is None  # "–" in the paper
    assert len(paper.ZERO_SHOT[paper.FLORENCE]) == 12 and len(paper.LINEAR_PROBE[paper.FLORENCE]) == 11
    assert paper.LINEAR_PROBE["CLIP-ViT-L/14@336"]["fgvc_aircraft"] == 71.6
    assert paper.RETRIEVAL_ZERO_SHOT["Florence"]["coco"]["text_to_image_R@5"] == 71.4
    assert paper.RETRIEVAL_FINE_TUNED["Florence"]["flickr30k"]["image_to_text_R@1"] == 97.2
    assert "coco" not in paper.RETRIEVAL_ZERO_SHOT["UNITER"]


def test_markdown_rows_and_differences(tmp_path, capsys):
    (tmp_path / "zs.json").write_text(json.dumps(_result("zeroshot", "cifar10", {"top1": 0.9, "top5": 0.99})))
    lp_metrics = {"top1": 0.8, "mean_per_class": 0.95}
    (tmp_path / "lp.json").write_text(json.dumps(_result("linear-probe", "pets", lp_metrics)))
    (tmp_path / "rt.json").write_text(json.dumps(_result("retrieval", "flickr30k", {"image_to_text_R@1": 0.5})))
    out = tmp_path / "report.md"
    assert report.main([str(tmp_path / "zs.json"), str(tmp_path / "lp.json"), str(tmp_path / "rt.json"),
                        "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert text == out.read_text()
    rows = {tuple(cell.strip() for cell in line.strip("|").split("|")[:3]): line for line in text.splitlines()
            if line.startswith("| ") and "---" not in line}
    # CIFAR-10 zero-shot: paper 94.6 (Florence), 86.8 / 95.7 (CLIP)
    line = rows[("zeroshot", "cifar10", "top1")]
    assert "| 90.00 | 94.60 | -4.60 |" in line
    assert "CLIP-RN50x64 86.8 (+3.20)" in line and "CLIP-ViT-L/14@336 95.7 (-5.70)" in line
    # top-5 is not a Table-1 number for CIFAR-10: no reference
    assert "| 99.00 | – | – | – |" in rows[("zeroshot", "cifar10", "top5")]
    # Pets reports mean-per-class: 96.4 for Florence's linear probe
    assert "| 95.00 | 96.40 | -1.40 |" in rows[("linear-probe", "pets", "mean_per_class")]
    assert "| 80.00 | – |" in rows[("linear-probe", "pets", "top1")]
    assert "| 50.00 | 90.90 | -40.90 | CLIP 88.0 (-38.00) |" in rows[("retrieval", "flickr30k", "image_to_text_R@1")]
    assert "abababababababab" in text


def test_directory_input_and_bad_files(tmp_path, capsys):
    (tmp_path / "a.json").write_text(json.dumps(_result("zeroshot", "imagenet", {"top1": 0.5, "top5": 0.75})))
    assert report.main([str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "| 50.00 | 83.70 | -33.70 |" in text and "| 75.00 | 97.18 | -22.18 |" in text
    few = {**_result("few-shot", "imagenet", {"5shot_top1": 0.4}), "metrics_std": {"5shot_top1": 0.0125}}
    (tmp_path / "c.json").write_text(json.dumps(few))
    (tmp_path / "b.json").write_text(json.dumps({"metrics": {}}))  # not a result: skipped inside a directory
    assert report.main([str(tmp_path)]) == 0
    assert "| few-shot | imagenet | 5shot_top1 | 40.00 ± 1.25 | – |" in capsys.readouterr().out
    assert report.main([str(tmp_path / "b.json")]) == 2
    assert "b.json" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="nope.json"):
        report.load_results([tmp_path / "nope.json"])


def test_classify_results_beside_table_3(tmp_path, capsys):
    """Fine-tuned ImageNet classification is shown beside Florence's Table 3 (90.05 / 99.02) and its baselines;
    other datasets have no paper row."""
    (tmp_path / "a.json").write_text(json.dumps(_result("classify", "imagenet", {"top1": 0.8, "top5": 0.95})))
    (tmp_path / "b.json").write_text(json.dumps(_result("classify", "fashion_mnist", {"top1": 0.93})))
    assert report.main([str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "| classify | imagenet | top1 | 80.00 | 90.05 | -10.05 | BiT-L-ResNet152x4 87.5 (-7.54);" in text
    assert "CoAtNet-7 90.9 (-10.88)" in text
    assert "| classify | imagenet | top5 | 95.00 | 99.02 | -4.02 |" in text
    assert "| classify | fashion_mnist | top1 | 93.00 | – | – | – |" in text
