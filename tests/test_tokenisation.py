"""Token ids of the tiny CLIP tokenizer and the prompt-encoding path, hard-coded and derived by hand.

The vocabulary ``write_tiny_clip_tokenizer`` writes (``vocab.json``), in id order:

- 0–255: the 256 byte-level characters in the GPT-2/CLIP ``bytes_to_unicode`` order: ``!``…``~``
  (bytes 33–126) are ids 0–93, so a printable ASCII character ``c`` has id ``ord(c) − 33``:
  ``a`` = 64, ``b`` = 65, ``e`` = 68, ``r`` = 81, ``z`` = 89;
- 256–511: the same characters with the end-of-word mark ``</w>``: ``a</w>`` = 256 + 64 = 320,
  ``!</w>`` = 256, ``,</w>`` = 256 + 11 = 267;
- 512…: one token per new merge, words taken longest first (``TINY_WORDS`` order among equal
  lengths), each word adding the chain of its prefixes and then ``word</w>``. ``background`` (10
  letters, the longest) comes first: ``ba`` 512, ``bac`` 513, …, ``background</w>`` 520. From the
  other end: the 2-letter words an, of, on, in add one token each (``a n`` already exists), just
  before the specials: ``an</w>`` 635, ``of</w>`` 636, ``on</w>`` 637, ``in</w>`` 638; before them
  the 3-letter words the, and, big, red, cat, dog add two each (``th`` 623, ``the</w>`` 624, ``an``
  625, ``and</w>`` 626, ``bi`` 627, ``big</w>`` 628, ``re`` 629, ``red</w>`` 630, …, ``dog</w>``
  634). Read off vocab.json: ``circle</w>`` 559, ``blue</w>`` 610, ``square</w>`` 564,
  ``green</w>`` 589;
- 639 ``<|startoftext|>`` (BOS), 640 ``<|endoftext|>`` (EOS, also the padding token): 641 in all.

CLIP lower-cases, splits punctuation off, and spells a word without a merge chain in characters.
The model's maximum length is 16: BOS + at most 14 tokens + EOS, padded with EOS.
"""

import json

import pytest
import torch
from transformers import AutoTokenizer

from diffusion_dpo.models.loading import encode_prompts, load_components
from diffusion_dpo.models.tiny import write_tiny_clip_tokenizer

BOS, EOS = 639, 640
A, RED, CIRCLE, ON, BLUE, BACKGROUND, SQUARE, GREEN = 320, 630, 559, 637, 610, 520, 564, 589


def _padded(ids: list[int]) -> list[int]:
    return ids + [EOS] * (16 - len(ids))


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    path = write_tiny_clip_tokenizer(tmp_path_factory.mktemp("tok"))
    return json.loads((path / "vocab.json").read_text())


@pytest.fixture(scope="module")
def tokenizer(tiny_sd_path):
    # what load_components uses: AutoTokenizer on the saved pipeline's tokenizer folder
    return AutoTokenizer.from_pretrained(tiny_sd_path, subfolder="tokenizer")


def test_vocab_layout_by_hand(vocab):
    assert len(vocab) == 641
    assert [vocab[c] for c in '!"#abez~'] == [0, 1, 2, 64, 65, 68, 89, 93]
    assert vocab["a</w>"] == A and vocab["!</w>"] == 256 and vocab[",</w>"] == 267
    assert [vocab[t] for t in ("ba", "bac", "backgroun", "background</w>")] == [512, 513, 519, BACKGROUND]
    assert [vocab[f"{w}</w>"] for w in ("an", "of", "on", "in")] == [635, 636, ON, 638]
    assert [vocab[t] for t in ("th", "the</w>", "re", "red</w>", "dog</w>")] == [623, 624, 629, RED, 634]
    assert [vocab[f"{w}</w>"] for w in ("circle", "blue", "square", "green")] == [CIRCLE, BLUE, SQUARE, GREEN]
    assert vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS


def test_special_tokens_agree_with_the_text_encoders(tokenizer, tiny_sdxl_path, tiny_sd_path):
    """CLIP pools at the first EOS id of its config: the encoders must use the tokenizer's ids."""
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (BOS, EOS, EOS)
    assert tokenizer.model_max_length == 16
    for path, names in (
        (tiny_sd_path, ["text_encoder"]),
        (tiny_sdxl_path, ["text_encoder", "text_encoder_2"]),
    ):
        for name in names:
            config = json.loads((path / name / "config.json").read_text())
            assert (config["bos_token_id"], config["eos_token_id"]) == (BOS, EOS), (path, name)


@pytest.mark.parametrize(
    "caption,ids",
    [
        ("a red circle on a blue background", [BOS, A, RED, CIRCLE, ON, A, BLUE, BACKGROUND, EOS]),
        # lower-cased; "zebra" has no merges: z e b r a</w>; "!" is its own word
        ("Zebra!", [BOS, 89, 68, 65, 81, A, 256, EOS]),
        # the comma splits off; RED == red
        ("a red, RED circle", [BOS, A, RED, 267, RED, CIRCLE, EOS]),
        ("", [BOS, EOS]),
    ],
    ids=["words", "unknown-word", "punctuation-case", "empty"],
)
def test_caption_ids_by_hand(tokenizer, caption, ids):
    got = tokenizer(caption, padding="max_length", max_length=16, truncation=True).input_ids
    assert got == _padded(ids)


def test_long_caption_is_truncated_before_eos(tokenizer):
    caption = " ".join(["red green"] * 10)  # 20 tokens
    got = tokenizer(caption, padding="max_length", max_length=16, truncation=True).input_ids
    assert got == [BOS] + [RED, GREEN] * 7 + [EOS]


def test_encode_prompts_feeds_padded_ids_and_returns_the_last_states(tiny_sd_path):
    """SD1.5: the text encoder receives the ids above, padded to 16 even when every caption is
    shorter and truncated to 16 with EOS last, and its last hidden state (not the penultimate one,
    that is SDXL) is the conditioning; no pooled output."""
    comps = load_components(str(tiny_sd_path))
    encoder = comps.text_encoders[0]
    seen = []
    encoder.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(args[0] if args else kwargs["input_ids"]), with_kwargs=True
    )
    hidden, pooled = encode_prompts(comps, ["a red circle on a blue background", ""], "cpu")
    assert pooled is None
    assert seen[0].tolist() == [
        _padded([BOS, A, RED, CIRCLE, ON, A, BLUE, BACKGROUND, EOS]),
        _padded([BOS, EOS]),
    ]
    with torch.no_grad():
        out = encoder(seen[0], output_hidden_states=True)
    assert hidden.shape == (2, 16, 32)
    torch.testing.assert_close(hidden, out.last_hidden_state, rtol=0, atol=0)
    assert not torch.allclose(hidden, out.hidden_states[-2], atol=1e-3)

    encode_prompts(comps, [" ".join(["red green"] * 10)], "cpu")
    assert seen[-1].tolist() == [[BOS] + [RED, GREEN] * 7 + [EOS]]
