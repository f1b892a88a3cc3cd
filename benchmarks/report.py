"""``florence report RESULTS...``: our numbers beside the Florence paper's and the CLIP baselines, as Markdown.

RESULTS are ``florence eval`` JSON files or directories holding them. For each result and metric the table shows our
value (percent), the paper's Florence value and the CLIP rows of SPEC §8 where the paper reports that dataset and
metric, and our difference to each. ``florence eval vqa`` results (official VQA accuracy, already in percent) get
their own table (overall, yes/no, number, other) beside the paper's Table 8 (VQAv2 test-dev / test-std).
``florence eval action`` and ``florence eval video-retrieval`` results sit in the main table (median ranks as ranks),
with the paper's Tables 10 and 9 under it.
``--output FILE`` also writes the Markdown to a file.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from florence.benchmarks.paper import ACTION, VIDEO_RETRIEVAL, VQA, reference_rows

REQUIRED_KEYS = ("task", "dataset", "protocol", "metrics", "model")


def load_results(paths: list[str | Path]) -> list[dict[str, Any]]:
    """Read result JSON files, and every result JSON directly inside a directory (sorted; other JSON files in a
    directory are skipped). A file named explicitly must be a result: ValueError naming it otherwise."""
    files: list[tuple[Path, bool]] = []
    for item in map(Path, paths):
        if item.is_dir():
            files += [(p, False) for p in sorted(item.glob("*.json"))]
        elif item.is_file():
            files.append((item, True))
        else:
            raise FileNotFoundError(f"{item}: no such result file or directory")
    results = []
    for f, explicit in files:
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            if not explicit:
                continue
            raise ValueError(f"{f}: not JSON ({e})") from None
        missing = [k for k in REQUIRED_KEYS if k not in data] if isinstance(data, dict) else list(REQUIRED_KEYS)
        if missing:
            if not explicit:
                continue
            raise ValueError(f"{f}: not a florence eval result (missing {missing})")
        data["_file"] = str(f)
        results.append(data)
    if not results:
        raise ValueError(f"no result files found in {[str(p) for p in paths]}")
    return results


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _vqa_lines(results: list[dict[str, Any]]) -> list[str]:
    """The VQA table (ours, percent as the official evaluator prints) and the paper's Table 8 below it."""
    lines = ["", "VQA, official VQA accuracy (%):", "",
             "| dataset | questions | overall | yes/no | number | other | Florence test-dev (%) | Δ vs Florence "
             "| protocol |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m = r["metrics"]
        types = m.get("perAnswerType", {})
        cells = [_pct(m.get("overall"))] + [_pct(types.get(t)) for t in ("yes/no", "number", "other")]
        refs = dict(reference_rows("vqa", r["dataset"], "overall"))
        florence = refs.get("Florence")
        delta = "–" if florence is None else f"{float(m['overall']) - florence:+.2f}"
        lines.append(f"| {r['dataset']} | {m.get('num_questions', '–')} | {' | '.join(cells)} | {_pct(florence)} "
                     f"| {delta} | {r['protocol']} |")
    lines += ["", "Table 8 (VQAv2, scored on EvalAI): " + "; ".join(
        f"{model} {dev:.2f} / {std:.2f}" for model, (dev, std) in VQA.items()) + " (test-dev / test-std). "
        "Δ only for results on VQAv2 data (val / minival differ from test-dev; other data has no paper number)."]
    return lines


def _video_lines(tasks: set[str]) -> list[str]:
    """The paper's Tables 9 and 10 in one line each, under video results (their Δ column is filled only for results
    on MSR-VTT / Kinetics)."""
    lines = []
    if "video-retrieval" in tasks:
        lines += ["", "Table 9 (MSR-VTT 1K-A zero-shot text->video R@1 / R@5 / R@10): " + "; ".join(
            f"{m} " + " / ".join(f"{v:.1f}" for v in row.values()) for m, row in VIDEO_RETRIEVAL.items()) + "."]
    if "action" in tasks:
        lines += ["", "Table 10 (top-1 / top-5, 4x3 views): " + "; ".join(
            f"{split} {m} {row['top1']:.1f} / {row['top5']:.1f}" for split, rows in ACTION.items()
            for m, row in rows.items()) + "."]
    return lines


def render_markdown(results: list[dict[str, Any]]) -> str:
    """One Markdown table: task, dataset, metric, ours, then ``model: value (ours - value)`` per reference; VQA
    results in a table of their own beside Table 8."""
    vqa = [r for r in results if r["task"] == "vqa"]
    lines = [
        "| task | dataset | metric | ours (%) | Florence paper (%) | Δ vs Florence | CLIP baselines (%) (Δ) "
        "| protocol |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in results if r["task"] != "vqa"):
        stds = r.get("metrics_std", {})
        for metric, value in r["metrics"].items():
            if "median_rank" in metric:  # a rank, not a fraction
                lines.append(f"| {r['task']} | {r['dataset']} | {metric} | {float(value):g} (rank) | – | – | – "
                             f"| {r['protocol']} |")
                continue
            if float(value) < 0:  # COCO's -1: no ground truth in that area range
                lines.append(f"| {r['task']} | {r['dataset']} | {metric} | – (no ground truth) | – | – | – "
                             f"| {r['protocol']} |")
                continue
            ours = 100.0 * float(value)
            shown = f"{ours:.2f}" + (f" ± {100.0 * float(stds[metric]):.2f}" if metric in stds else "")
            refs = reference_rows(r["task"], r["dataset"], metric)
            florence = [(m, v) for m, v in refs if m.startswith("Florence")]
            others = [(m, v) for m, v in refs if not m.startswith("Florence")]
            f_value = florence[0][1] if florence else None
            f_delta = "–" if f_value is None else f"{ours - f_value:+.2f}"
            clip = "; ".join(f"{m} {v:.1f} ({ours - v:+.2f})" for m, v in others) or "–"
            lines.append(
                f"| {r['task']} | {r['dataset']} | {metric} | {shown} | {_pct(f_value)} | {f_delta} | {clip} "
                f"| {r['protocol']} |"
            )
    if len(vqa) == len(results):
        lines = _vqa_lines(vqa)[1:]  # only VQA results: no general table
    elif vqa:
        lines += _vqa_lines(vqa)
    lines += _video_lines({r["task"] for r in results})
    models = sorted({(r["model"].get("path") or r["model"].get("predictions", "?"), r["model"].get("sha256", "?"))
                     for r in results})
    lines.append("")
    for path, digest in models:
        lines.append(f"Model `{path}` (bundle SHA-256 `{str(digest)[:16]}…`).")
    lines.append("Paper numbers: Florence Tables 1 (zero-shot), 2 (linear probe), 3 (ImageNet fine-tuning: "
                 "`classify` results, baselines in the last column), 5 (retrieval), 6 (detection), 8 (VQA), 9 "
                 "(MSR-VTT text->video, `video-retrieval`), 10 (Kinetics, `action`); the difference is ours minus "
                 "theirs, in points.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="florence report", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="result JSON files or directories")
    parser.add_argument("--output", default=None, help="also write the Markdown to this file")
    args = parser.parse_args(argv)
    try:
        markdown = render_markdown(load_results(args.results))
    except (FileNotFoundError, ValueError) as err:
        print(f"florence report: {err}", file=sys.stderr)
        return 2
    print(markdown, end="")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
