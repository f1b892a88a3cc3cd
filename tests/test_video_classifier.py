"""VideoClassifier: inflated towers, the per-frame 2D baseline, bundles, mmaction2 recognizer checkpoints."""
from __future__ import annotations

import pytest
import torch

from florence import create_model, from_pretrained
from florence.adapters.video_classifier import VideoClassifier, build_video_classifier
from florence.weights import WeightsError

TOWER = dict(window_size=(2, 7, 7))


@pytest.fixture
def image_tower_2d(one_thread):
    torch.manual_seed(0)
    tower = create_model("coswin_test")
    tower.preprocess = dict(tower.default_preprocess, mean=[0.3, 0.3, 0.3], std=[0.4, 0.4, 0.4])
    return tower


def test_inflated_classifier_takes_the_2d_weights_and_normalisation(image_tower_2d):
    model = build_video_classifier("video_coswin_test", 5, inflate=image_tower_2d, tower_overrides=TOWER,
                                   clip_len=4, frame_interval=3, size=32, class_names=list("abcde"))
    assert not model.frames_mode
    assert model.preprocess["input_size"] == [3, 4, 32, 32] and model.preprocess["frame_interval"] == 3
    assert model.preprocess["mean"] == [0.3, 0.3, 0.3]
    report = model.backbone.inflate_report
    assert "patch_embed.proj.weight" in report.inflated and not report.missing
    kt = model.backbone.patch_embed.proj.weight.shape[2]
    torch.testing.assert_close(model.backbone.patch_embed.proj.weight.sum(2), image_tower_2d.patch_embed.proj.weight)
    assert kt == 2
    logits = model.eval()(torch.randn(2, 3, 4, 32, 32))
    assert logits.shape == (2, 5)


def test_frames_mode_averages_the_2d_features_over_frames(image_tower_2d):
    model = build_video_classifier(image_tower_2d, 3, frames=True, clip_len=4).eval()
    assert model.frames_mode
    clip = torch.randn(2, 3, 4, 28, 28)
    per_frame = torch.stack([image_tower_2d.forward_head(image_tower_2d.forward_features(clip[:, :, t]),
                                                         pre_logits=True) for t in range(4)], 1)  # B, T, F
    torch.testing.assert_close(model.features(clip), per_frame.mean(1))
    # order-blind: reversing the frames changes nothing (why it cannot tell the direction of motion)
    torch.testing.assert_close(model(clip), model(clip.flip(2)))


def test_bundle_round_trip(tmp_path, image_tower_2d):
    model = build_video_classifier("video_coswin_test", 4, inflate=image_tower_2d, tower_overrides=TOWER,
                                   clip_len=4, class_names=["w", "x", "y", "z"], drop_rate=0.3).eval()
    model.save_pretrained(tmp_path / "b")
    again = from_pretrained(tmp_path / "b").eval()
    assert isinstance(again, VideoClassifier) and again.class_names == ["w", "x", "y", "z"]
    assert again.preprocess == model.preprocess and again.drop_rate == 0.3
    clip = torch.randn(1, 3, 4, 28, 28)
    torch.testing.assert_close(again(clip), model(clip))
    frames = build_video_classifier(image_tower_2d, 2, frames=True, clip_len=4).eval()
    frames.save_pretrained(tmp_path / "f")
    torch.testing.assert_close(from_pretrained(tmp_path / "f").eval()(clip), frames(clip))


def test_mmaction2_recognizer_checkpoint(one_thread):
    torch.manual_seed(0)
    source = build_video_classifier("video_swin_tiny", 6, tower_overrides=dict(embed_dim=16, depths=(1, 1),
                                                                               num_heads=(1, 2),
                                                                               window_size=(2, 3, 3)))
    ours = source.state_dict()
    # our keys -> mmaction2's: downsampling at the end of the previous stage, cls_head.fc_cls, index buffers present
    mm = {}
    for k, v in ours.items():
        if k.startswith("fc."):
            mm[k.replace("fc.", "cls_head.fc_cls.")] = v
            continue
        k = k.replace("layers.1.downsample.", "layers.0.downsample.")
        mm[k] = v
    mm["backbone.layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(18, 18, dtype=torch.long)
    target = build_video_classifier("video_swin_tiny", 6, tower_overrides=dict(embed_dim=16, depths=(1, 1),
                                                                               num_heads=(1, 2),
                                                                               window_size=(2, 3, 3)))
    report = target.load_foreign_weights(mm, format="mmaction2")
    assert "fc.weight" in report.loaded and not report.missing
    clip = torch.randn(1, 3, 4, 24, 24)
    torch.testing.assert_close(target.eval()(clip), source.eval()(clip))
    wrong = {k: v for k, v in mm.items() if "cls_head" not in k} | {"cls_head.fc_cls.weight": torch.zeros(3, 32),
                                                                    "cls_head.fc_cls.bias": torch.zeros(3)}
    with pytest.raises(WeightsError, match="cls_head.fc_cls"):
        target.load_foreign_weights(wrong, format="mmaction2")


def test_a_2d_tower_is_refused_where_a_video_tower_is_needed(image_tower_2d):
    with pytest.raises(ValueError, match="not a video tower"):
        build_video_classifier("coswin_test", 3)
    with pytest.raises(ValueError, match="nothing to inflate"):
        build_video_classifier(image_tower_2d, 3, frames=True, inflate=image_tower_2d)
