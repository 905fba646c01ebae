"""The text side of image-text learning: the caption tokenizer and the two text encoders.

A tokenizer learned from a few dozen made-up captions and encoders of width 32 keep the file to
seconds; the ONNX checks use the dynamo exporter, as the image encoders do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models

from contrastive.config import ConfigError, TextConfig, parse_params
from contrastive.text import (
    EOS_ID,
    PAD_ID,
    SOS_ID,
    clean,
    decode,
    encode,
    for_model,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from contrastive.text_models import TextGRU, TextTransformer, build_text_encoder

CAPTIONS = [
    f"A {colour} {animal} {verb} on the {place}."
    for colour, animal, verb, place in product(
        ("black", "white", "brown"), ("dog", "cat", "horse"), ("runs", "sleeps"),
        ("grass", "sofa", "beach"),
    )
]
VOCAB = 320
CONTEXT = 16
WIDTH = 32
EMBEDDING = 24


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(CAPTIONS, VOCAB)


# --- tokenizer ---------------------------------------------------------------------------------


def test_decode_gives_back_the_cleaned_caption(tok: Tokenizer) -> None:
    captions = ["  A Black DOG\truns   on the Grass. ", "a café by the sea 🚀", "", "Zebra!"]
    decoded = decode(tok, encode(tok, captions, context_length=64))
    assert decoded == [clean(tok, c) for c in captions]
    assert decoded[0] == "a black dog runs on the grass."
    assert decoded[1] == "a café by the sea 🚀"  # never seen in training: bytes, not [UNK]


def test_encode_is_sos_tokens_eos_then_zero_padding(tok: Tokenizer) -> None:
    tokens = encode(tok, ["a dog", "A white horse sleeps on the beach."], CONTEXT)
    assert tokens.dtype == torch.int64 and tokens.shape == (2, CONTEXT)
    for row in tokens:
        length = int((row != PAD_ID).sum())
        assert row[0] == SOS_ID and row[length - 1] == EOS_ID
        assert (row[length:] == PAD_ID).all() and (row[:length] != PAD_ID).all()
    # The saved JSON alone (its post-processor) gives the same ids to a non-Python consumer.
    short = tokens[0][tokens[0] != PAD_ID].tolist()
    assert tok.encode("a dog").ids == short


def test_truncation_keeps_eos_last(tok: Tokenizer) -> None:
    caption = "a black dog runs on the grass and a white cat sleeps on the sofa"
    full = encode(tok, [caption], 64)[0]
    full = full[full != PAD_ID]
    cut = encode(tok, [caption], 6)[0]
    assert len(full) > 6
    assert cut.tolist() == [SOS_ID, *full[1:5].tolist(), EOS_ID]
    assert encode(tok, [caption], 2)[0].tolist() == [SOS_ID, EOS_ID]
    with pytest.raises(ValueError, match="context_length"):
        encode(tok, [caption], 1)


def test_the_exported_tokenizer_truncates_and_pads_as_encode_does(tok: Tokenizer,
                                                                 tmp_path: Path) -> None:
    """The tokenizer saved beside the text tower gives its input with the tokenizers library
    alone (a service, another language): short, empty, over-long and unseen-character texts."""
    texts = ["a photo of a dog.", "", "word " * 40, "Ünïcødé 🐕 text"]
    save_tokenizer(for_model(tok, 12), tmp_path / "tokenizer.json")
    alone = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ids = [e.ids for e in alone.encode_batch(texts)]
    assert ids == encode(tok, texts, 12).tolist()
    assert tok.truncation is None and tok.padding is None  # the original is left as it was


def test_training_is_deterministic_across_processes(tok: Tokenizer, tmp_path: Path) -> None:
    """The trainer's hash maps are seeded per process: same captions, same JSON regardless."""
    assert train_tokenizer(CAPTIONS, VOCAB).to_str() == tok.to_str()
    path = tmp_path / "other.json"
    code = ("import json, sys; from contrastive.text import save_tokenizer, train_tokenizer; "
            "save_tokenizer(train_tokenizer(json.loads(sys.argv[1]), int(sys.argv[2])), "
            "sys.argv[3])")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    subprocess.run([sys.executable, "-c", code, json.dumps(CAPTIONS), str(VOCAB), str(path)],
                   check=True, env=env)
    assert path.read_text() == tok.to_str(pretty=True)
    assert train_tokenizer(CAPTIONS[::-1], VOCAB).get_vocab_size() <= VOCAB


def test_saved_vocabulary_reloads_to_identical_ids(tok: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "models" / "tokenizer.json"
    save_tokenizer(tok, path)
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temporary left
    again = load_tokenizer(path)
    captions = [*CAPTIONS[:5], "A zebra 🦓 on ice"]
    assert torch.equal(encode(again, captions, CONTEXT), encode(tok, captions, CONTEXT))
    assert again.to_str() == tok.to_str()


def test_a_bad_tokenizer_file_is_one_clear_line(tok: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.json: tokenizer file not found"):
        load_tokenizer(tmp_path / "missing.json")
    garbage = tmp_path / "garbage.json"
    garbage.write_text('{"model": "not a tokenizer"')
    with pytest.raises(ConfigError, match=r"garbage\.json: not a tokenizer file") as bad:
        load_tokenizer(garbage)
    assert "\n" not in str(bad.value)
    # A real tokenizer, but not one of ours: no [PAD] at id 0.
    other = Tokenizer(models.WordLevel({"[UNK]": 0, "dog": 1}, unk_token="[UNK]"))
    foreign = tmp_path / "foreign.json"
    foreign.write_text(other.to_str())
    with pytest.raises(ConfigError, match=r"foreign\.json: the special tokens must have the ids"):
        load_tokenizer(foreign)


def test_vocab_size_below_the_byte_alphabet_is_refused() -> None:
    with pytest.raises(ValueError, match="vocab_size must be at least 260"):
        train_tokenizer(CAPTIONS, 100)


# --- encoders ----------------------------------------------------------------------------------


def make_encoder(kind: str, vocab_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = TextConfig(context_length=CONTEXT, width=WIDTH, layers=2, heads=4)
    return build_text_encoder(kind, cfg, vocab_size, embedding_dim=EMBEDDING).eval()


@pytest.fixture(scope="module")
def tokens(tok: Tokenizer) -> torch.Tensor:
    """Captions of different lengths, one cut to the context, one empty."""
    captions = ["a dog", "A white horse sleeps on the beach.", "",
                "a black dog runs on the grass and a white cat sleeps on the sofa"]
    return encode(tok, captions, 12)


ENCODERS = ("transformer", "gru")


@pytest.mark.parametrize("kind", ENCODERS)
def test_output_shape_and_embedding_dim(kind: str, tok: Tokenizer, tokens: torch.Tensor) -> None:
    model = make_encoder(kind, tok.get_vocab_size())
    assert isinstance(model, TextTransformer if kind == "transformer" else TextGRU)
    assert model.embedding_dim == EMBEDDING
    with torch.no_grad():
        out = model(tokens)
    assert out.shape == (len(tokens), EMBEDDING) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    with torch.no_grad():  # padding alone (encode never makes it): finite, not NaN
        assert torch.isfinite(model(torch.zeros(2, CONTEXT, dtype=torch.int64))).all()


@pytest.mark.parametrize("kind", ENCODERS)
def test_appended_padding_does_not_change_the_embedding(kind: str, tok: Tokenizer,
                                                         tokens: torch.Tensor) -> None:
    model = make_encoder(kind, tok.get_vocab_size())
    padded = torch.cat([tokens, torch.zeros(len(tokens), CONTEXT - 12, dtype=torch.int64)], 1)
    with torch.no_grad():
        short, long = model(tokens), model(padded)
        # Each row alone, too: a batch's longest caption does not leak into the others.
        rows = torch.cat([model(padded[i : i + 1]) for i in range(len(padded))])
        changed = tokens.clone()
        changed[0, 1] = changed[0, 1] + 1  # a real token: the embedding must move
        moved = model(changed)
    torch.testing.assert_close(long, short, atol=1e-5, rtol=0)
    torch.testing.assert_close(rows, short, atol=1e-5, rtol=0)
    assert (moved[0] - short[0]).abs().max() > 1e-4
    torch.testing.assert_close(moved[1:], short[1:], atol=1e-5, rtol=0)
    # Training mode with gradients takes the transformer's other (non-fused) attention path.
    model.train()
    torch.testing.assert_close(model(padded), model(tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ENCODERS)
def test_gradients_reach_every_parameter(kind: str, tok: Tokenizer, tokens: torch.Tensor) -> None:
    model = make_encoder(kind, tok.get_vocab_size()).train()
    model(tokens).pow(2).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


@pytest.mark.filterwarnings("ignore:_check_is_size will be removed:FutureWarning")
@pytest.mark.filterwarnings("ignore:The tensor attributes .* were assigned during export")
@pytest.mark.parametrize("kind", ENCODERS)
def test_exports_to_onnx_with_a_dynamic_batch(kind: str, tok: Tokenizer, tmp_path: Path) -> None:
    import onnxruntime as ort

    model = make_encoder(kind, tok.get_vocab_size())
    example = encode(tok, CAPTIONS[:2], CONTEXT)
    path = tmp_path / f"{kind}.onnx"
    # The dynamo exporter (the legacy TorchScript one is deprecated). Opset 17 is below its
    # implementations (18+): it exports at 18 and converts. An output named "embedding" would
    # clash with the name of the aten.embedding node (an invalid model), hence "embeddings".
    torch.onnx.export(model, (example,), str(path), dynamo=True, external_data=False,
                      opset_version=17, input_names=["tokens"], output_names=["embeddings"],
                      dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] != 2  # a symbolic batch axis, not the example's
    for batch in (1, 5):
        x = encode(tok, [*CAPTIONS[:batch - 1], "a zebra sleeps 🦓"], CONTEXT)
        with torch.no_grad():
            expected = model(x).numpy()
        (got,) = session.run(None, {"tokens": x.numpy()})
        assert got.shape == (batch, EMBEDDING)
        assert np.abs(got - expected).max() <= 1e-4


# --- config ------------------------------------------------------------------------------------


def test_text_config_defaults_and_heads_must_divide_width() -> None:
    cfg = TextConfig()
    assert (cfg.context_length, cfg.width, cfg.layers, cfg.heads) == (32, 128, 2, 4)
    assert parse_params({}).data.vocab_size == 1000
    odd = {"text": {"width": 32, "heads": 3}}
    with pytest.raises(ConfigError, match=r"model\.text\.heads: 3 does not divide model\.text"):
        parse_params({"model": {"text_encoder": "transformer", **odd},
                      "train": {"method": "clip"}})
    # heads is the transformer's alone
    parse_params({"model": {"text_encoder": "gru", **odd}, "train": {"method": "clip"}})
    with pytest.raises(ValueError, match="no text encoder"):
        build_text_encoder("none", TextConfig(), 300)


@pytest.mark.parametrize(("model", "method", "fragment"), [
    ({"text_encoder": "gru"}, "simclr", "model.text_encoder: 'gru', but train.method 'simclr'"),
    ({}, "clip", "model.text_encoder: 'none', but train.method 'clip'"),
])
def test_a_text_encoder_goes_with_clip_alone(model: dict, method: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as failure:
        parse_params({"model": model, "train": {"method": method}})
    assert fragment in str(failure.value) and "\n" not in str(failure.value)
