#!/usr/bin/env python
"""Audit a preference-pair dataset for shortcuts: what, besides content, tells the chosen image apart.

    python data/audit_pairs.py --dataset outputs/tiny/pairs_train.parquet [--split train]
        [--max_pairs 2000] [--threshold 0.6] [--output outputs/audit] [--streaming]

For each trait (image size and aspect ratio, file format, estimated JPEG quality, encoded bytes per
pixel, brightness, saturation, sharpness; the winning position; caption length) it prints how well the
trait ALONE predicts the winner, with a 95% interval, and flags the traits whose interval's lower end
exceeds --threshold. It also counts ties, identical pairs, duplicate and near-duplicate images, bad
labels and unreadable images. Writes OUTPUT/audit.json (everything printed, and more) and
OUTPUT/audit.html (the table, and a few example pairs, chosen beside rejected, for each flagged trait).
See diffusion_dpo/curation/audit.py for the definitions.

--dataset takes what the trainer's --dataset_name takes: a parquet file or folder, a save_to_disk folder,
a JSONL/CSV of caption,image_w,image_l, or a hub id (use --streaming for a large one: the first
--max_pairs rows are read, nothing else is downloaded).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import logging
import sys
from pathlib import Path

from diffusion_dpo.curation import audit
from diffusion_dpo.curation.report import example_records, format_table
from diffusion_dpo.curation.traits import LOSSLESS_FORMATS
from diffusion_dpo.data.transforms import decode_image

#: Example pairs shown per flagged trait, and the thumbnails' longer side in pixels.
EXAMPLES_PER_TRAIT = 4
THUMBNAIL = 192


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dataset", required=True, help="pairs: a file, a folder or a hub id (as --dataset_name)"
    )
    parser.add_argument("--split", default="train", help="split of a folder or hub dataset")
    parser.add_argument(
        "--max_pairs", type=int, default=2000,
        help="audit this many pairs drawn at random with --seed (with --streaming: the first ones); 0: all",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the random subset")
    parser.add_argument(
        "--threshold", type=float, default=audit.DEFAULT_THRESHOLD,
        help="flag a trait when the lower end of its 95%% interval of accuracy exceeds this",
    )  # fmt: skip
    parser.add_argument("--output", default="outputs/audit", help="folder for audit.json and audit.html")
    parser.add_argument(
        "--streaming", action="store_true", help="stream the dataset (hub datasets too large for disk)"
    )
    parser.add_argument("--cache_dir", default=None, help="where `datasets` caches downloads")
    parser.add_argument(
        "--scorer", action="append", default=[],
        help="label quality: a scorer (as eval's --scorer, e.g. pickscore, hpsv2.1=/path) whose agreement with "
        "the labels is reported with intervals (repeat for several; they are also compared with each other)",
    )  # fmt: skip
    parser.add_argument("--scorer_device", default="cpu", help="where the scorers run (cpu, cuda)")
    parser.add_argument(
        "--dataset_format", default="auto", help="as the trainer's --dataset_format (docs/data.md)"
    )
    parser.add_argument(
        "--image_root", default=None, help="as the trainer's --image_root (HPDv3's image folder)"
    )
    parser.add_argument(
        "--near_tie",
        type=float,
        default=0.2,
        help="label quality: a vote margin |2·p0 − 1| below this is a near-tie",
    )
    args = parser.parse_args(argv)
    if args.max_pairs < 0:
        parser.error(f"--max_pairs must be >= 0, got {args.max_pairs}")
    if not 0.5 <= args.threshold < 1.0:
        parser.error(f"--threshold must be in [0.5, 1), got {args.threshold}")
    return args


def _thumbnail(value) -> str:
    """A PNG data URI of the image, at most THUMBNAIL pixels on its longer side; '' if unreadable."""
    try:
        image = decode_image(value)
    except Exception:
        return ""
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _shown(traits: dict, name: str) -> str:
    value = traits.get(name)
    if name == "jpeg_quality" and value is None:
        return "lossless" if traits.get("format") in LOSSLESS_FORMATS else "unknown"
    return f"{value:.4g}" if isinstance(value, float) else html.escape(str(value))


def _pair_figure(record: dict, pair: dict, trait: str) -> str:
    if record["label_0"] in (0.0, 1.0):
        winner = 0 if record["label_0"] == 1.0 else 1
        sides = (("chosen", winner), ("rejected", 1 - winner))
    else:  # a tie or a bad label: no winner to show
        sides = (("image 0", 0), ("image 1", 1))
    cells = []
    for label, side in sides:
        traits = record[f"image_{side}"]
        uri = _thumbnail(pair[f"image_{side}"])
        image = f'<img src="{uri}" alt="{label}">' if uri else "<em>unreadable</em>"
        value = f": {trait} = {_shown(traits, trait)}" if trait in traits else ""
        cells.append(
            f"<div class=img>{image}<br><b>{label}</b> (image {side}){value}"
            f"<br><small>{_shown(traits, 'size')} {_shown(traits, 'format')}</small></div>"
        )
    caption = html.escape(str(pair.get("caption")))
    return f'<figure><figcaption>row {record["row"]}: "{caption}"</figcaption>{"".join(cells)}</figure>'


def render_html(report: dict, examples: dict[str, list[tuple[dict, dict]]]) -> str:
    """The audit page: counts, the trait table, and for each flagged trait its example pairs
    (``examples[trait]``: (record, pair) tuples)."""
    rows = []
    for t in report["traits"]:
        acc = "-" if t["accuracy"] is None else f"{t['accuracy']:.3f}"
        ci = "-" if t["interval"] is None else f"[{t['interval'][0]:.3f}, {t['interval'][1]:.3f}]"
        flag = "<b>FLAG</b>" if t["flag"] else ""
        rows.append(
            f"<tr{' class=flag' if t['flag'] else ''}><td>{t['trait']}</td><td>{html.escape(t['rule'] or '-')}</td>"
            f"<td>{acc}</td><td>{ci}</td><td>{flag}</td><td>{html.escape(t['explanation'])}</td></tr>"
        )
    sections = []
    for name, shown in examples.items():
        figures = "".join(_pair_figure(record, pair, name) for record, pair in shown)
        sections.append(f"<h2>{html.escape(name)}</h2>{figures or '<p>no example found</p>'}")
    if not report["flagged"]:
        sections.insert(0, f"<p>Nothing flagged: no trait predicts the winner with a 95% lower bound above "
                           f"{report['threshold']}.</p>")  # fmt: skip
    header = html.escape(format_table(report).split("\n\n")[0])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Shortcut audit</title><style>
body {{ font-family: sans-serif; margin: 2em; }} table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 3px 6px; vertical-align: top; }} tr.flag {{ background: #fdd; }}
figure {{ display: inline-block; border: 1px solid #ddd; margin: 6px; padding: 6px; }}
div.img {{ display: inline-block; margin: 4px; text-align: center; font-size: small; }}
img {{ height: 128px; image-rendering: pixelated; }}
</style></head><body>
<h1>Shortcut audit</h1><pre>{header}</pre>
<p>Accuracy alone: how often the rule picks the chosen image over non-tied pairs (an undecided pair counts
0.5). A trait is flagged when the 95% interval's lower end exceeds {report["threshold"]}.</p>
<table><tr><th>trait</th><th>rule</th><th>accuracy alone</th><th>95% interval</th><th>flag</th><th>explanation</th></tr>
{"".join(rows)}</table>
{"".join(sections)}
</body></html>
"""


def main(argv: list[str] | None = None) -> dict:
    """Run the audit; print the table, write audit.json and audit.html; return the report."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report, records, reader = audit.audit_dataset(
        args.dataset, args.split, max_pairs=args.max_pairs or None, seed=args.seed, threshold=args.threshold,
        streaming=args.streaming, cache_dir=args.cache_dir, dataset_format=args.dataset_format,
        image_root=args.image_root,
    )  # fmt: skip
    print(format_table(report))

    # Example pairs: each flagged image trait's rule at work, and identical pairs when there are some.
    chosen = {
        t["trait"]: example_records(records, t, EXAMPLES_PER_TRAIT)
        for t in report["traits"]
        if t["flag"] and t["kind"] in ("numeric", "categorical")
    }
    by_row = {r["row"]: r for r in records}
    identical = report["identical_pairs"]["rows"][:EXAMPLES_PER_TRAIT]
    if identical:
        chosen["identical_pairs"] = [by_row[row] for row in identical]
    pairs = reader.get({r["row"] for shown in chosen.values() for r in shown})
    examples = {
        name: [(r, pairs[r["row"]]) for r in shown if r["row"] in pairs] for name, shown in chosen.items()
    }
    quality_html = ""
    if args.scorer:  # label quality (diffusion_dpo/curation/label_quality.py)
        from diffusion_dpo.curation import label_quality
        from diffusion_dpo.scorers import load_scorer

        scorers = {spec: load_scorer(spec, device=args.scorer_device) for spec in args.scorer}
        all_pairs = list(reader)
        report["label_quality"] = label_quality.pairs_label_quality(
            all_pairs, scorers, near_tie=args.near_tie
        )
        print(
            "\nlabel quality:\n"
            + "\n".join(f"  {line}" for line in label_quality.headline(report["label_quality"]))
        )
        by_row = {p["row"]: p for p in all_pairs}
        quality_html = label_quality.render_html(report["label_quality"], by_row, _thumbnail)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "audit.json").write_text(json.dumps(report, indent=2) + "\n")
    (output / "audit.html").write_text(
        render_html(report, examples).replace("</body>", quality_html + "</body>")
    )
    print(f"\nwrote {output / 'audit.json'} and {output / 'audit.html'}")
    return report


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as err:  # bad input: say what is wrong, no stack trace
        sys.exit(f"error: {err}")
