"""Tiny Stable-Diffusion-shaped models with random weights, built locally (no downloads).

They have the real architectures (UNet2DConditionModel, AutoencoderKL, CLIP text encoders and a
CLIP BPE tokenizer) at toy sizes, are saved with ``save_pretrained`` and are loaded back by the same
``from_pretrained`` code path as real Stable Diffusion weights. Used by the embedded default
(``configs/tiny.yaml``), the tests and the synthetic experiment.

Why one module of ~460 lines: the three families' builders share the tokenizers, the text-encoder
configs and the word-embedding separation, and the embedded default, the tests and the benchmark
reach them through :func:`save_tiny_pipeline`. With a fourth family (Flux, Qwen-Image) it becomes a
package ``models/tiny/`` with one module per family beside the shared text parts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

#: Whole words that get one BPE token each, so captions of the synthetic world are short sequences.
TINY_WORDS = (
    "a an the of on in with and photo picture image small big large red green blue yellow white "
    "black orange purple pink gray cyan magenta circle square triangle cross ring star stripe "
    "background shape cat dog"
).split()

TEXT_HIDDEN = 32
TEXT_MAX_LENGTH = 16


def _bytes_to_unicode() -> dict[int, str]:
    # The byte -> printable-character table every byte-level BPE (GPT-2, CLIP) uses.
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def write_tiny_clip_tokenizer(path: str | Path, words: tuple[str, ...] | list[str] = TINY_WORDS) -> Path:
    """Write a CLIP BPE tokenizer (vocab.json + merges.txt) whose merges make each of ``words`` one token.

    Every other word falls back to byte-level characters, exactly as a real CLIP tokenizer would for
    unseen words, so any caption can be tokenized.
    """
    from transformers import CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab_tokens = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    # Longer words first: BPE applies the lowest-ranked merge first, so a short word's merge (e.g.
    # "g r" of "green") must not outrank a longer word's chain ("backg r" of "background").
    for word in sorted(words, key=len, reverse=True):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merged = parts[0] + parts[1]
            merge = f"{parts[0]} {parts[1]}"
            if merge not in merges:
                merges.append(merge)
                vocab_tokens.append(merged)
            parts = [merged] + parts[2:]
    special = ["<|startoftext|>", "<|endoftext|>"]

    def build():
        vocab = {tok: i for i, tok in enumerate(list(dict.fromkeys(vocab_tokens)) + special)}
        (path / "vocab.json").write_text(json.dumps(vocab))
        (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(
            str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=TEXT_MAX_LENGTH
        )

    tokenizer = build()
    # Merges of different words can still cut across each other ("m a" of "magenta" inside "image");
    # chain whatever pieces a word ends up in into the whole word, until every word is one token.
    for _ in range(4):
        broken = [w for w in words if len(tokenizer.tokenize(w)) > 1]
        if not broken:
            break
        for word in broken:
            parts = tokenizer.tokenize(word)
            while len(parts) > 1:
                merges.append(f"{parts[0]} {parts[1]}")
                vocab_tokens.append(parts[0] + parts[1])
                parts = [parts[0] + parts[1]] + parts[2:]
        tokenizer = build()
    tokenizer.save_pretrained(path)
    return path


def _text_config(vocab_size: int, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    kwargs = dict(
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=TEXT_MAX_LENGTH,
        vocab_size=vocab_size,
        hidden_act="gelu",
    )
    if projection_dim is not None:
        kwargs["projection_dim"] = projection_dim
    return CLIPTextConfig(**kwargs)


def _separate_word_embeddings(text_encoder) -> None:
    """Re-draw a random CLIP text encoder's token (std 1) and position (std 0.5) embeddings.

    At the default init (std 0.02) the random layers' output swamps them: captions that differ in one
    word get states with cosine similarity 0.92-0.98 at that word, so a UNet can hardly tell "red" from
    "green" and learns to ignore its captions. A trained CLIP encoder separates words; with unit-scale
    embeddings the random one does too (every word and its position stay visible in the output).
    """
    with torch.no_grad():
        for name, module in text_encoder.named_modules():
            if name.endswith("token_embedding"):
                module.weight.normal_(0.0, 1.0)
            elif name.endswith("position_embedding"):
                module.weight.normal_(0.0, 0.5)


def tiny_unet_config(sdxl: bool = False, sample_size: int = 16) -> dict:
    """A two-level UNet2DConditionModel config (≈0.4M parameters; SDXL-shaped when ``sdxl``)."""
    config = dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    if sdxl:
        config.update(
            cross_attention_dim=2 * TEXT_HIDDEN,  # penultimate states of both encoders, concatenated
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            # 6 micro-conditioning numbers × 8 + pooled embedding of the second encoder
            projection_class_embeddings_input_dim=6 * 8 + TEXT_HIDDEN,
            use_linear_projection=True,
        )
    return config


def tiny_vae_config() -> dict:
    """A one-downsample AutoencoderKL config: 32 px images ↔ 4×16×16 latents."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


@torch.no_grad()
def _latent_std(vae, resolution: int) -> float:
    import numpy as np

    from diffusion_dpo import synthetic

    rng = np.random.default_rng(0)
    images = [synthetic.render(synthetic.sample_spec(rng), rng, resolution) for _ in range(32)]
    pixels = torch.stack(
        [torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1 for im in images]
    )
    return float(vae.encode(pixels).latent_dist.mean.std())


def build_tiny_pipeline(sdxl: bool = False, seed: int = 0, resolution: int = 32):
    """Build a tiny SD1.5-shaped (or SDXL-shaped) diffusers pipeline with random weights, in memory."""
    import tempfile

    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(tmp))
    vocab_size = len(tokenizer)
    unet = UNet2DConditionModel(**tiny_unet_config(sdxl, sample_size=resolution // 2))
    vae = AutoencoderKL(**tiny_vae_config())
    with torch.no_grad():
        # A random encoder predicts log-variances near 0, i.e. posterior samples that are mostly noise;
        # a trained SD VAE is nearly deterministic. Give the random one that property: std ≈ 0.002.
        latent = vae.config.latent_channels
        vae.quant_conv.weight[latent:].zero_()
        vae.quant_conv.bias[latent:].fill_(-12.0)
    # As SD chose 0.18215: scale latents to unit variance on the images this model is for, so image
    # content is not drowned by the unit-variance diffusion noise.
    vae.register_to_config(scaling_factor=1.0 / _latent_std(vae, resolution))
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    if not sdxl:
        from diffusers import StableDiffusionPipeline

        text_encoder = CLIPTextModel(_text_config(vocab_size))
        _separate_word_embeddings(text_encoder)
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    from diffusers import StableDiffusionXLPipeline

    text_encoders = (
        CLIPTextModel(_text_config(vocab_size)),
        CLIPTextModelWithProjection(_text_config(vocab_size, projection_dim=TEXT_HIDDEN)),
    )
    for encoder in text_encoders:
        _separate_word_embeddings(encoder)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoders[0],
        text_encoder_2=text_encoders[1],
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


#: ``save_tiny_pipeline(arch=...)`` values and the names they are logged under.
TINY_ARCHS = {"sd15": "SD1.5", "sdxl": "SDXL", "sd3": "SD3", "qwen_image": "Qwen-Image"}


def save_tiny_pipeline(
    path: str | Path, sdxl: bool = False, seed: int = 0, resolution: int = 32, arch: str | None = None
) -> Path:
    """Build a tiny pipeline and write it as a diffusers folder that ``from_pretrained`` loads.

    ``arch`` is one of :data:`TINY_ARCHS` ("sd15", "sdxl", "sd3", "qwen_image"); without it, ``sdxl`` chooses
    between SDXL and SD1.5 as before.
    """
    if arch is None:
        arch = "sdxl" if sdxl else "sd15"
    elif arch not in TINY_ARCHS:
        raise ValueError(f"arch must be one of {tuple(TINY_ARCHS)}, got {arch!r}")
    elif sdxl and arch != "sdxl":
        raise ValueError(f"sdxl=True contradicts arch={arch!r}")
    path = Path(path)
    if arch == "qwen_image":  # diffusion_dpo/models/tiny_qwen_image.py
        from diffusion_dpo.models.tiny_qwen_image import build_tiny_qwen_image_pipeline as build

        pipe = build(seed=seed, resolution=resolution)
    elif arch == "sd3":
        pipe = build_tiny_sd3_pipeline(seed=seed, resolution=resolution)
    else:
        pipe = build_tiny_pipeline(sdxl=arch == "sdxl", seed=seed, resolution=resolution)
    pipe.save_pretrained(path)
    logger.info("wrote a tiny %s pipeline to %s", TINY_ARCHS[arch], path)
    return path


# --- Stable Diffusion 3 --------------------------------------------------------------------------

#: Width of the tiny T5 encoder, and so the transformer's ``joint_attention_dim``. SD3 pads the two
#: CLIP encoders' concatenated states (2 × TEXT_HIDDEN wide) with zeros to T5's width; a narrower T5
#: would make ``encode_prompt`` crop them instead (``F.pad`` with a negative pad), dropping the second
#: CLIP encoder's states, so T5 is at least as wide as both CLIP encoders together.
T5_HIDDEN = 2 * TEXT_HIDDEN
#: Longest T5 sequence the tokenizer accepts without warnings (a real T5 tokenizer's 512). SD3 pads T5
#: ids to the pipeline's ``max_sequence_length`` (default 256); pass a short one (e.g.
#: ``TEXT_MAX_LENGTH``) for fast tiny runs.
T5_MODEL_MAX_LENGTH = 512


def write_tiny_t5_tokenizer(path: str | Path, words: tuple[str, ...] | list[str] = TINY_WORDS) -> Path:
    """Write a T5 (Unigram, SentencePiece-style) tokenizer in which each of ``words`` is one token.

    The vocabulary is T5's layout (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2), then "▁word" pieces and single
    ASCII characters: a whole word outscores its spelling, and any other word falls back to characters
    (non-ASCII ones to ``<unk>``), so every caption can be tokenized. ``</s>`` is appended to each
    sequence, as T5 does. Built from a ``tokenizers.Tokenizer`` so that it works with transformers 4
    (``T5TokenizerFast``) and 5 (where that name is the tokenizers-backed ``T5Tokenizer``).
    """
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + word, -1.0) for word in dict.fromkeys(words)]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    # The pre-tokenizer and decoder of transformers' own T5 tokenizer.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    T5TokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,  # no <extra_id_N> sentinels: they are for span corruption, not for encoding prompts
        model_max_length=T5_MODEL_MAX_LENGTH,
    ).save_pretrained(path)
    return path


def tiny_sd3_transformer_config(sample_size: int = 16) -> dict:
    """A two-block SD3Transformer2DModel config (≈0.3M parameters) for 16-channel latents.

    The inner width (4 heads × 16) equals T5_HIDDEN: SD3 projects the joint text states to it
    (``caption_projection_dim`` must be the inner width), and the pooled input is the two CLIP
    encoders' projections concatenated.
    """
    patch_size = 2
    return dict(
        sample_size=sample_size,
        patch_size=patch_size,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=T5_HIDDEN,
        caption_projection_dim=4 * 16,
        pooled_projection_dim=2 * TEXT_HIDDEN,
        # Position embeddings are cropped from a max_size² grid; leave room for twice the resolution.
        pos_embed_max_size=max(32, 2 * sample_size // patch_size),
    )


def tiny_sd3_vae_config() -> dict:
    """:func:`tiny_vae_config` with SD3's 16 latent channels and no quant convolutions (as SD3's VAE)."""
    config = tiny_vae_config()
    config.update(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
    return config


@torch.no_grad()
def _latent_mean_std(vae, resolution: int) -> tuple[float, float]:
    """Mean and std of the VAE's posterior means over synthetic renders (the images of :func:`_latent_std`)."""
    import numpy as np

    from diffusion_dpo import synthetic

    rng = np.random.default_rng(0)
    images = [synthetic.render(synthetic.sample_spec(rng), rng, resolution) for _ in range(32)]
    pixels = torch.stack(
        [torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1 for im in images]
    )
    means = vae.encode(pixels).latent_dist.mean
    return float(means.mean()), float(means.std())


def _build_tiny_sd3_vae(resolution: int):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**tiny_sd3_vae_config())
    with torch.no_grad():
        # Nearly deterministic posterior, as in build_tiny_pipeline; without quant_conv the
        # log-variance rows are those of the encoder's last convolution.
        latent = vae.config.latent_channels
        vae.encoder.conv_out.weight[latent:].zero_()
        vae.encoder.conv_out.bias[latent:].fill_(-12.0)
    # SD3 normalises latents as (z - shift_factor) * scaling_factor (its VAE: 0.0609, 1.5305): centre
    # and scale them to zero mean and unit variance on the images this model is for.
    mean, std = _latent_mean_std(vae, resolution)
    vae.register_to_config(shift_factor=mean, scaling_factor=1.0 / std)
    return vae


def _tiny_t5_encoder(tokenizer):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=T5_HIDDEN,
        d_ff=2 * T5_HIDDEN,
        d_kv=T5_HIDDEN // 4,
        num_heads=4,
        num_layers=2,
        feed_forward_proj="gated-gelu",  # T5 v1.1, SD3's text_encoder_3
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    encoder = T5EncoderModel(config)
    with torch.no_grad():
        # Unit-scale token embeddings so that the random encoder keeps words apart (see
        # _separate_word_embeddings). T5 has no position embeddings (relative attention biases), and
        # transformers already draws T5's at std 1; re-draw anyway so this does not hang on its init.
        encoder.get_input_embeddings().weight.normal_(0.0, 1.0)
    return encoder


def build_tiny_sd3_pipeline(seed: int = 0, resolution: int = 32, t5: bool = True):
    """Build a tiny SD3-shaped diffusers pipeline (MMDiT, 16-channel VAE, 2 CLIP + T5) with random weights.

    With ``t5=False`` the pipeline has no third text encoder, as SD3 allows: it feeds zeros in place of
    the T5 states.
    """
    import tempfile

    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5TokenizerFast

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(tmp))
    vocab_size = len(tokenizer)
    transformer = SD3Transformer2DModel(**tiny_sd3_transformer_config(sample_size=resolution // 2))
    vae = _build_tiny_sd3_vae(resolution)
    text_encoders = [
        CLIPTextModelWithProjection(_text_config(vocab_size, projection_dim=TEXT_HIDDEN)) for _ in range(2)
    ]
    for encoder in text_encoders:
        _separate_word_embeddings(encoder)
    text_encoder_3 = tokenizer_3 = None
    if t5:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer_3 = T5TokenizerFast.from_pretrained(write_tiny_t5_tokenizer(tmp))
        text_encoder_3 = _tiny_t5_encoder(tokenizer_3)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=text_encoders[0],
        tokenizer=tokenizer,
        text_encoder_2=text_encoders[1],
        tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
