"""Engine units: config, optimizer groups and schedule, precision, gradient cache, checkpoint RNG and atomicity."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import yaml

from florence.engine import checkpoint as ckpt
from florence.engine.config import ConfigError, config_from_dict, load_config, save_config
from florence.engine.grad_cache import grad_cache_backward
from florence.engine.optim import WarmupDecay, build_optimizer, param_groups, warmup_decay
from florence.engine.precision import build_precision

BASE = {"model": {"name": "unicl_test"}, "schedule": {"steps": 10}}
WORDS = ("shirt", "shoe", "bag", "coat", "dress", "boot", "trouser", "sandal", "sneaker", "pullover")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from florence.tokenizer import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_bpe_tokenizer([f"a photo of a {w}." for w in WORDS] * 4, out, vocab_size=300)
    return out


def _unicl_task():
    from florence.adapters.pretrain import UniCLTask, UniCLOptions

    return UniCLTask(config_from_dict(BASE), UniCLOptions())


def _tiny(tokenizer_dir, **overrides):
    import florence

    torch.manual_seed(0)
    return florence.create_model("unicl_test", tokenizer=str(tokenizer_dir), context_length=16, **overrides)


@pytest.fixture()
def unicl_model(tokenizer_dir):
    return _tiny(tokenizer_dir)


@pytest.fixture()
def unicl_model_dropout(tokenizer_dir):
    return _tiny(tokenizer_dir, image={"drop_path_rate": 0.3, "drop_rate": 0.1},
                 text={"hidden_dropout_prob": 0.2, "attention_probs_dropout_prob": 0.1})


# -- config -----------------------------------------------------------------------------------------------------


def test_config_overrides_and_roundtrip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**BASE, "optim": {"lr": 0.001}, "data": {"source": "x"}}))
    cfg = load_config(path, ["optim.lr=2e-3", "optim.betas=[0.9, 0.98]", "data.batch_extra.a=1",
                             "model.overrides={embed_dim: 16}", "checkpoint.resume=null"])
    assert cfg.optim.lr == pytest.approx(2e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.9, 0.98)
    assert cfg.data == {"source": "x", "batch_extra": {"a": 1}}
    assert cfg.model.overrides == {"embed_dim": 16}
    assert cfg.checkpoint.resume is None
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize("override, key", [("optim.lrr=1", "optim.lrr"), ("bogus.x=1", "bogus"),
                                           ("schedule.steps=ten", "schedule.steps")])
def test_config_errors_name_the_key(tmp_path, override, key):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(BASE))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(path, [override])


def test_config_cross_field_checks():
    with pytest.raises(ConfigError, match="precision.dtype"):
        config_from_dict({**BASE, "precision": {"dtype": "fp8"}})
    with pytest.raises(ConfigError, match="schedule"):
        config_from_dict({"model": {"name": "unicl_test"}})
    with pytest.raises(ConfigError, match="model"):
        config_from_dict({"schedule": {"steps": 1}})


# -- optimizer and schedule -------------------------------------------------------------------------------------


def test_no_weight_decay_groups(unicl_model):
    decay, no_decay = param_groups(unicl_model, 0.1)
    names = {id(p): n for n, p in unicl_model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "logit_scale" in skipped
    assert any(n.endswith("relative_position_bias_table") for n in skipped)
    assert not any(n.endswith("relative_position_bias_table") or n.endswith(".bias") for n in decayed)
    assert all(unicl_model.get_parameter(n).ndim >= 2 for n in decayed)
    assert "image_projection.weight" in decayed
    assert len(decayed) + len(skipped) == len(list(unicl_model.parameters()))


def test_cosine_warmup_schedule():
    f = [warmup_decay(s, total_steps=10, warmup_steps=2, min_lr_ratio=0.1) for s in range(10)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0)
    assert f[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[2:], f[3:]))
    assert warmup_decay(10, total_steps=10, warmup_steps=2, min_lr_ratio=0.1) == pytest.approx(0.1)
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, lr=1.0, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    sched = WarmupDecay(opt, total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx(f)
    state = sched.state_dict()
    other = WarmupDecay(opt, total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    other.load_state_dict(state)
    assert other.last_epoch == sched.last_epoch


def test_precision_choices():
    cpu = torch.device("cpu")
    assert build_precision("fp32", cpu).scaler is None
    bf16 = build_precision("bf16", cpu)
    with bf16.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        build_precision("fp16", cpu)


# -- gradient cache ---------------------------------------------------------------------------------------------


def _batch(model, n: int, seed: int = 0, size: int = 32):
    g = torch.Generator().manual_seed(seed)
    texts = [f"a photo of a {w}." for w in WORDS]
    labels = torch.randint(0, len(texts), (n,), generator=g)
    tokens = model.tokenize([texts[i] for i in labels])
    return {"images": torch.randn(n, 3, size, size, generator=g), "labels": labels, **tokens}


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _full_batch_grads(model, loss_fn, batch):
    model.zero_grad(set_to_none=True)
    out = model(images=batch["images"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss = loss_fn(out.image_embeds, out.text_embeds, batch["labels"], out.logit_scale)
    loss.backward()
    return loss.detach(), _grads(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grad_cache_equals_full_batch(unicl_model, dtype):
    """Every parameter gradient (logit scale included) of the gradient-cached step equals the full-batch gradient:
    max abs difference <= 1e-5 in fp32, <= 1e-10 in fp64 (the algorithm itself is exact).

    The logit multiplier is set to 5 so that the gradients are O(1) (largest ~1-2.5, asserted > 1e-2): the absolute
    fp32 criterion is then meaningful, neither trivially met by tiny gradients nor below one fp32 ulp of huge ones
    (with CLIP's initial multiplier 14.3 or 20 the embedding gradients reach ~20, where one ulp is already 2e-6)."""
    from florence.backbone.loss import UniCLLoss

    model, loss_fn = unicl_model.to(dtype), UniCLLoss()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(5.0))
    batch = _batch(model, 12)
    batch["images"] = batch["images"].to(dtype)
    full_loss, full = _full_batch_grads(model, loss_fn, batch)
    model.zero_grad(set_to_none=True)
    loss, _ = grad_cache_backward(_unicl_task(), model, batch, chunk_size=5,
                                  precision=build_precision("fp32", torch.device("cpu")))
    cached = _grads(model)
    assert torch.allclose(loss, full_loss, atol=1e-6)
    assert cached.keys() == full.keys() and "logit_scale" in cached
    assert full["logit_scale"].abs().item() > 1e-4  # the logit-scale gradient takes part in the comparison
    largest = max(g.abs().max().item() for g in full.values())
    worst = max((cached[n] - full[n]).abs().max().item() for n in full)
    assert worst <= (1e-5 if dtype == torch.float32 else 1e-10), (worst, largest)
    assert largest > 1e-2  # not a trivially small comparison


def test_grad_cache_replays_dropout(unicl_model_dropout):
    """With dropout / drop-path on, the re-forward must reuse each chunk's masks: the gradient equals that of the
    loss over the chunk-wise forward with grad (same RNG stream)."""
    from florence.backbone.loss import UniCLLoss

    model, loss_fn = unicl_model_dropout, UniCLLoss()
    model.train()
    batch = _batch(model, 8, seed=1)
    torch.manual_seed(123)
    model.zero_grad(set_to_none=True)
    outs = [model(images=batch["images"][i:i + 3], input_ids=batch["input_ids"][i:i + 3],
                  attention_mask=batch["attention_mask"][i:i + 3]) for i in range(0, 8, 3)]
    ref_loss = loss_fn(torch.cat([o.image_embeds for o in outs]), torch.cat([o.text_embeds for o in outs]),
                       batch["labels"], outs[-1].logit_scale)
    ref_loss.backward()
    ref = _grads(model)
    after_ref = torch.rand(1)
    torch.manual_seed(123)
    model.zero_grad(set_to_none=True)
    loss, _ = grad_cache_backward(_unicl_task(), model, batch, chunk_size=3,
                                  precision=build_precision("fp32", torch.device("cpu")))
    assert torch.rand(1) == after_ref  # RNG continues as after one pass
    cached = _grads(model)
    assert torch.allclose(loss, ref_loss.detach(), atol=1e-6)
    scale = max(g.abs().max().item() for g in ref.values())
    assert max((cached[n] - ref[n]).abs().max().item() for n in ref) <= 1e-5 * max(1.0, scale)


def test_train_step_clamps_logit_scale(unicl_model):
    """After the optimizer step the stored log multiplier is clamped to [0, ln 100] (the model's own
    ``clamp_logit_scale_``; the torchrun DDP/FSDP test covers the wrapped models)."""
    from florence.engine.step import StepContext, train_step

    with torch.no_grad():
        unicl_model.logit_scale.fill_(7.0)  # above ln 100 = 4.6; the step (lr 0) does not move it
    opt = build_optimizer(unicl_model, lr=0.0, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    ctx = StepContext(model=unicl_model, task=_unicl_task(), optimizer=opt,
                      scheduler=WarmupDecay(opt, total_steps=2, warmup_steps=0, min_lr_ratio=0.0),
                      precision=build_precision("fp32", torch.device("cpu")), device=torch.device("cpu"))
    result = train_step(ctx, [_batch(unicl_model, 4)])
    assert result.finite
    assert unicl_model.logit_scale.item() == pytest.approx(math.log(100.0))


# -- checkpoint pieces ------------------------------------------------------------------------------------------


def test_rng_state_roundtrip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = ckpt.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_checkpoint_keep_last_and_atomic(tmp_path, unicl_model):
    from florence.engine.distributed import DistEnv

    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    opt = build_optimizer(unicl_model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)
    sched = WarmupDecay(opt, total_steps=10, warmup_steps=1, min_lr_ratio=0.0)
    (tmp_path / "checkpoints" / ".tmp_step_00000009").mkdir(parents=True)  # a save killed half-way
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step=step, model=unicl_model, optimizer=opt, scheduler=sched, scaler=None,
                             data_state={"epoch": 0, "offset": step}, counters={"skipped": 0}, env=env, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000003"
    meta, data = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), model=unicl_model, optimizer=opt,
                                      scheduler=sched, scaler=None, env=env)
    assert meta["step"] == 3 and data == {"epoch": 0, "offset": 3}
