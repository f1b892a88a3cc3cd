"""``florence`` command line: a thin dispatcher; each sub-command lives with the code it drives.

    florence train CONFIG [key=value ...]          any task by the config's task: key (florence.engine.train)
    florence eval TASK --model DIR --dataset NAME  evaluation protocols (florence.benchmarks.eval_cli)
    florence eval detection --model DIR --annotations ANN.json --images DIR   COCO detection metrics
    florence eval vqa --model DIR --questions Q.json --annotations A.json --images DIR   official VQA accuracy
    florence eval action --model DIR --annotations ANN --videos DIR   multi-view action recognition (4x3 views)
    florence eval video-retrieval --model DIR --captions CSV --videos DIR   zero-shot text->video retrieval
    florence predict --model DIR IMAGE...          classify your own images (florence.benchmarks.predict)
    florence detect --model DIR IMAGE...           detect objects in your own images (florence.benchmarks.detect)
    florence vqa --model DIR IMAGE "question"      answer questions about an image (florence.benchmarks.vqa_predict)
    florence predict-video --model DIR VIDEO...    top-5 actions of your own videos (florence.benchmarks.video_cli)
    florence report RESULTS...                     our numbers beside the paper's (florence.benchmarks.report)
    florence demo [--workdir DIR]                  the end-to-end Fashion-MNIST demo (florence.benchmarks.demo)
    florence demo detection [--workdir DIR]        the Fashion-MNIST detection demo (florence.benchmarks.detection_demo)
    florence demo vqa [--workdir DIR]              the Fashion-MNIST VQA demo (florence.benchmarks.vqa_demo)
    florence demo video [--workdir DIR]            the Moving Fashion-MNIST video demo (florence.benchmarks.video_demo)
    florence demo search [--workdir DIR]           Fashion-MNIST search on Milvus Lite (florence.benchmarks.search_demo)
    florence index --model DIR --source DIR|CSV|TAR --db PATH.db|URI --collection NAME   embed files into Milvus
    florence search --db ... --collection ... "a red motorcycle" [--image PATH]   search by text and/or image
    florence tag --db ... --collection ... --labels-file F   zero-shot / kNN tags (florence.search.cli)
    florence dedup --db ... --collection ... [--threshold 0.95]   exact and near-duplicate groups
    florence serve --db ... --collection ... [--port 8000]   a local search web page
    florence convert --from FORMAT SRC OUT         a bundle from timm / microsoft / unicl / open_clip / hf / mmdet /
                                                   dynamichead / mmaction2 weights (florence.benchmarks.convert_cli)
    florence export --model DIR --part image|text|classifier|detector|vqa|video --format torch-export|onnx OUT
                    [--dynamic-size] [--image-size H W] [--opset N] [--no-optimize] [--no-check]
                                                   a tower or adapter model as a torch.export program or ONNX graph
                                                   with a JSON sidecar (florence.benchmarks.export_cli)
    florence models [PATTERN]                      list model names
"""
from __future__ import annotations

import importlib
import sys

_COMMANDS = {
    "train": "florence.engine.train",
    "eval": "florence.benchmarks.eval_cli",
    "report": "florence.benchmarks.report",
    "demo": "florence.benchmarks.demo",
    "predict": "florence.benchmarks.predict",
    "detect": "florence.benchmarks.detect",
    "vqa": "florence.benchmarks.vqa_predict",
    "predict-video": "florence.benchmarks.video_cli",
    "index": "florence.search.cli:index_main",
    "search": "florence.search.cli:search_main",
    "tag": "florence.search.cli:tag_main",
    "dedup": "florence.search.cli:dedup_main",
    "serve": "florence.search.cli:serve_main",
    "convert": "florence.benchmarks.convert_cli",
    "export": "florence.benchmarks.export_cli",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "models":
        from florence.factory import list_models

        print("\n".join(list_models(rest[0] if rest else None)))
        return 0
    if command not in _COMMANDS:
        print(f"florence: unknown command {command!r}\n{__doc__}", file=sys.stderr)
        return 2
    module, _, function = _COMMANDS[command].partition(":")
    result = getattr(importlib.import_module(module), function or "main")(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
