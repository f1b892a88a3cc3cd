"""The ``action`` task end to end on tiny Moving Fashion-MNIST clips: inflation, training, multi-view evaluation,
resume, the per-frame baseline, ``florence eval action`` / ``predict-video``, the packaged recipe and the report."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import florence
from florence.adapters.action_eval import evaluate_action
from florence.adapters.video_classifier import VideoClassifier, build_video_classifier
from florence.benchmarks import detection_canvas, moving_fmnist, report, video_cli, video_demo
from florence.benchmarks.demo_steps import packaged_config
from florence.benchmarks.paper import reference_rows
from florence.data.video import read_video_annotations, video_eval_loader
from florence.engine import train
from florence.engine.config import ConfigError, load_config
from florence.tokenizer import train_bpe_tokenizer

TOWER = {"window_size": [2, 8, 8]}


@pytest.fixture(scope="module")
def clips(tmp_path_factory, fake_fmnist) -> Path:
    root = tmp_path_factory.mktemp("clips")
    moving_fmnist.generate(root, "train", 16, seed=0, frames=8, size=32, root=fake_fmnist)
    moving_fmnist.generate(root, "test", 8, seed=1, frames=8, size=32, root=fake_fmnist)
    return root


@pytest.fixture(scope="module")
def tower_2d(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    tower = florence.create_model("coswin_test")
    tower.preprocess = dict(tower.default_preprocess, input_size=[3, 32, 32])
    return tower.save_pretrained(tmp_path_factory.mktemp("tower") / "b")


def _config(tmp_path: Path, clips: Path, backbone: Path, **task) -> Path:
    source = {"annotations": str(clips / "train.txt"), "videos": str(clips / "train"),
              "classes": str(clips / "classes.txt")}
    config = {
        "task": {"name": "action", "clip_len": 4, "frame_interval": 1, "size": 32, "eval_clips": 2, "eval_crops": 1,
                 **task},
        "model": {"name": "video_coswin_test", "backbone": str(backbone), "overrides": {**TOWER,
                                                                                      "drop_path_rate": 0.1}},
        "data": {"sources": [source], "augment": {"scale": [0.7, 1.0], "hflip": 0.0}},
        "optim": {"lr": 1e-3, "batch_size": 4},
        "schedule": {"steps": 4, "warmup_steps": 1},
        "checkpoint": {"every_steps": 2},
        "output": {"dir": str(tmp_path / "run"), "log_every": 1},
        "eval": {"source": {"type": "video", "annotations": str(clips / "test.txt"), "videos": str(clips / "test"),
                            "classes": str(clips / "classes.txt")}, "every_steps": 2, "best_metric": "top1",
                 "batch_size": 8},
        "num_threads": 1,
    }
    path = tmp_path / "action.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, clips, tower_2d) -> Path:
    tmp = tmp_path_factory.mktemp("action_run")
    assert train.main([str(_config(tmp, clips, tower_2d))]) == 0
    return tmp / "run"


@pytest.mark.slow
def test_training_writes_a_video_classifier_with_multiview_metrics(trained, clips):
    model = florence.from_pretrained(trained / "final")
    assert isinstance(model, VideoClassifier) and not model.frames_mode
    assert model.class_names == list(moving_fmnist.ACTIONS)
    assert model.preprocess["input_size"] == [3, 4, 32, 32]
    lines = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(line["loss"]) for line in lines if "loss" in line) and "train_top1" in lines[0]
    evaluated = [line for line in lines if "eval/top1" in line]
    assert len(evaluated) == 2 and {"eval/top5", "eval/mean_per_class"} <= set(evaluated[-1])
    assert (trained / "best" / "manifest.json").is_file()


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path, clips, tower_2d):
    """Stopped after step 3 (last checkpoint: step 2) and run again: the uninterrupted run's losses (drop path and
    head dropout on, random crops: the RNG state and the data position must both come back)."""
    overrides = ["eval.source=null", "eval.every_steps=null", "eval.best_metric=null"]
    path = _config(tmp_path, clips, tower_2d)
    full = train.run(load_config(path, [*overrides, f"output.dir={tmp_path / 'full'}"]))
    cfg = load_config(path, [*overrides, f"output.dir={tmp_path / 'cut'}"])
    train.run(cfg, stop_after_steps=3)
    resumed = train.run(cfg)
    assert sorted(resumed.losses) == [3, 4]
    assert {k: full.losses[k] for k in (3, 4)} == resumed.losses


def test_multiview_scores_are_view_averaged_probabilities(clips, tower_2d, one_thread):
    """evaluate_action against a direct computation: softmax of each view's logits, averaged over the 2 x 3 views."""
    torch.manual_seed(0)
    model = build_video_classifier("video_coswin_test", 8, inflate=tower_2d, tower_overrides=TOWER, clip_len=4,
                                   frame_interval=1, size=24).eval()
    videos = read_video_annotations(clips / "test.txt", clips / "test", classes=clips / "classes.txt")
    loader = video_eval_loader(videos, preprocess=model.preprocess, num_clips=2, num_crops=3, batch_size=3,
                               max_videos=5)
    out = evaluate_action(model, loader, view_batch=4)
    assert out["probs"].shape == (5, 8) and list(out["index"]) == [0, 1, 2, 3, 4]
    batch = next(iter(video_eval_loader(videos, preprocess=model.preprocess, num_clips=2, num_crops=3,
                                        batch_size=1)))
    with torch.no_grad():
        views = torch.stack([model(batch["videos"][0, v:v + 1])[0].softmax(-1) for v in range(6)])
    np.testing.assert_allclose(out["probs"][0], views.mean(0).numpy(), atol=1e-6)
    top1 = float(np.mean(out["probs"].argmax(1) == videos.labels[:5]))
    assert out["metrics"]["top1"] == pytest.approx(top1)


@pytest.mark.slow
def test_frames_baseline_trains_from_a_2d_bundle(tmp_path, clips, tower_2d):
    path = _config(tmp_path, clips, tower_2d, frames=True)
    result = train.run(load_config(path, ["model.overrides={}", "schedule.steps=2", "eval.every_steps=null",
                                          "eval.best_metric=null"]))
    model = florence.from_pretrained(result.run_dir / "final")
    assert isinstance(model, VideoClassifier) and model.frames_mode


@pytest.mark.slow
def test_eval_action_and_predict_video_cli(trained, clips, tmp_path, capsys):
    bundle = trained / "final"
    code = video_cli.eval_main(["--model", str(bundle), "--annotations", str(clips / "test.txt"), "--videos",
                                str(clips / "test"), "--classes", str(clips / "classes.txt"), "--clips", "2",
                                "--crops", "3", "--output", str(tmp_path), "--name", "mfm", "--workers", "0"])
    assert code == 0
    result = json.loads((tmp_path / "action_mfm.json").read_text())
    assert result["task"] == "action" and result["views"]["clips"] == 2 and result["views"]["crops"] == 3
    assert result["data"]["evaluated"] == 8 and set(result["metrics"]) == {"top1", "top5", "mean_per_class"}
    assert result["model"]["sha256"] and result["data"]["annotations_sha256"]
    assert (tmp_path / "action_mfm_confusion.png").is_file()
    assert "action" in report.render_markdown(report.load_results([tmp_path / "action_mfm.json"]))
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    first = sorted((clips / "test").glob("*.mp4"))[0]
    capsys.readouterr()
    assert video_cli.predict_main(["--model", str(bundle), str(first), str(tmp_path / "broken.mp4"), "--strip",
                                   str(tmp_path / "strips"), "--clips", "1", "--crops", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(str(first)) and out[0].count("%") == 5
    assert "broken.mp4: skipped" in out[1]
    assert (tmp_path / "strips" / f"{first.stem}.png").is_file()


def test_config_errors_name_the_key(tmp_path, clips, tower_2d):
    path = _config(tmp_path, clips, tower_2d)
    with pytest.raises(ConfigError, match="eval.source"):
        train.resolve_task(load_config(path, ["eval.source={type: coco, annotations: a, images: b}"])).validate()
    with pytest.raises(ConfigError, match="task.eval_crops"):
        train.resolve_task(load_config(path, ["task.eval_crops=2"])).validate()
    with pytest.raises(ConfigError, match="model.backbone"):
        train.resolve_task(load_config(path, ["task.frames=true", "model.backbone=null"])).validate()


def test_packaged_recipe_is_valid():
    cfg = load_config(packaged_config("video", "moving_fashion_mnist.yaml"))
    task = train.resolve_task(cfg)
    assert task.options.clip_len == 8 and cfg.data["augment"]["hflip"] == 0.0
    task.validate_data()


def test_report_places_kinetics_results_beside_table_10():
    assert reference_rows("action", "kinetics400_val", "top1")[0] == ("Florence", 86.5)
    assert reference_rows("action", "k600", "top5")[0] == ("Florence", 97.8)
    assert reference_rows("action", "moving_fmnist", "top1") == []
    assert reference_rows("video-retrieval", "msrvtt_1ka", "text_to_video_R@1")[0] == ("Florence", 37.6)
    assert reference_rows("video-retrieval", "moving_fmnist", "text_to_video_R@1") == []


@pytest.mark.slow
@pytest.mark.skipif(not Path(detection_canvas.FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="needs the Debian package dataset-fashion-mnist")
def test_video_demo_end_to_end_tiny(tmp_path, capsys):
    train_bpe_tokenizer(["a video of a Sandal", "a photo of a Bag."] * 5, tmp_path / "tok", vocab_size=300,
                        min_frequency=1)
    torch.manual_seed(0)
    dual = florence.create_model("unicl_test", tokenizer=str(tmp_path / "tok")).save_pretrained(tmp_path / "dual")
    code = video_demo.main(["--workdir", str(tmp_path / "demo"), "--backbone", str(dual), "--baseline",
                            "--train-videos", "8", "--test-videos", "4", "schedule.steps=2", "optim.batch_size=4",
                            "checkpoint.every_steps=1000", "eval.batch_size=12"])
    assert code == 0
    results = tmp_path / "demo" / "results"
    for name in ("video_coswin", "frames_2d"):
        for views in ("4x3", "1x1"):
            result = json.loads((results / f"action_moving_fmnist_{name}_{views}.json").read_text())
            assert result["data"]["evaluated"] == 4
    assert florence.from_pretrained(tmp_path / "demo" / "finetune_frames_2d" / "final").frames_mode
    assert (results / "video_retrieval_moving_fmnist_test.json").is_file()
    assert len(list((results / "strips").glob("*.png"))) == 3
    assert "video demo finished" in capsys.readouterr().out
