"""WebDataset tar shards of pairs: per sample two images and a JSON (or text files) with the caption and
the label, read by the ``datasets`` library's ``webdataset`` builder (local ``.tar`` files, a folder of
them, or a hub id such as ``sayakpaul/pickapic_v2_webdataset``; streamed like any other source).

Card read: ``sayakpaul/pickapic_v2_webdataset`` (Pick-a-Pic v2 in ~870 MB ``NNNNN.tar`` shards, used by
diffusers' ``diffusion_orpo`` WebDataset script). The builder names a field by what follows the sample
key: ``000001.jpg_0.jpg`` → ``jpg_0.jpg`` (an image), ``000001.json`` → ``json`` (a dict),
``000001.label_0.txt`` → ``label_0.txt``. So a sample here is recognised by ``__key__`` plus exactly two
image fields (image 0 is the first by name: ``0.jpg`` < ``1.jpg``, ``jpg_0.jpg`` < ``jpg_1.jpg``) plus
a caption, from ``json`` (``caption``, ``prompt`` or ``original_prompt``) or a text field of one of those
names. The label comes from the same place: ``label_0`` (P(image 0 preferred), vote shares allowed) or,
if neither holds one, the pair is winner first (the loader's seeded coin shuffles positions).
"""

from __future__ import annotations

from diffusion_dpo.data.formats.base import LabelError, PairFormat, probability

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("caption", "prompt", "original_prompt")


def _images(names) -> list[str]:
    return sorted(n for n in names if "." in n and n.rsplit(".", 1)[1].lower() in IMAGE_EXTENSIONS)


def _text_field(names, keys: tuple[str, ...]) -> str | None:
    for key in keys:
        for name in (f"{key}.txt", f"{key}.text", key):
            if name in names:
                return name
    return None


def _recognise(names: list[str]) -> bool:
    has_text = "json" in names or _text_field(names, CAPTION_KEYS) is not None
    return "__key__" in names and len(_images(names)) == 2 and has_text


def _columns_for(names: list[str]) -> list[str]:
    wanted = ["__key__", *_images(names)]
    wanted += [n for n in ("json", _text_field(names, CAPTION_KEYS), _text_field(names, ("label_0",))) if n]
    return list(dict.fromkeys(wanted))


def _meta(row: dict) -> dict:
    meta = row.get("json")
    return meta if isinstance(meta, dict) else {}


def _read(row: dict) -> tuple:
    image_0, image_1 = _images(row)
    meta = _meta(row)
    caption = next((meta[k] for k in CAPTION_KEYS if k in meta), None)
    if caption is None:
        field = _text_field(row, CAPTION_KEYS)
        caption = row[field] if field else None
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8")
    return (caption.strip() if isinstance(caption, str) else caption), row[image_0], row[image_1]


def _label(row: dict) -> float | None:
    meta = _meta(row)
    if "label_0" in meta:
        return probability(meta["label_0"], "label_0")
    field = _text_field(row, ("label_0",))
    if field is None:
        return None  # winner first
    value = row[field]
    try:
        value = float(value.decode() if isinstance(value, bytes) else value)
    except (TypeError, ValueError, UnicodeDecodeError):
        raise LabelError(f"{field} {value!r} is not a number in [0, 1]") from None
    return probability(value, field)


FORMAT = PairFormat(
    name="webdataset",
    summary="WebDataset shards: __key__, two image files, a json (caption/prompt, label_0) or text fields",
    columns=("__key__",),
    read=_read,
    label=_label,
    label_columns=("json", "label_0.txt", "label_0.text", "label_0"),  # those present are read
    recognise=_recognise,
    columns_for=_columns_for,
)
