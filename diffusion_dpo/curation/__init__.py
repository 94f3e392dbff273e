"""Curation: making and checking preference pairs, beside evaluation and above its generation.

- :mod:`.mining`: on-policy pairs from a model's own samples (``data/mine_pairs.py``,
  ``data/correction_pairs.py``, ``data/iterative_dpo.py``): scorer weights, normalisation, pairing
  rules, the pair files and their manifest. It shares :mod:`diffusion_dpo.evaluation.generate`'s
  sampling settings. :mod:`.corrections`: a given image preferred over the model's sample of its
  caption (``data/correction_pairs.py``).
- the shortcut audit (``data/audit_pairs.py``, and the trainer's start-up check): :mod:`.traits` (what
  each image's header and pixels say), :mod:`.rules` (how well one trait alone predicts the winner,
  with its interval), :mod:`.report` (every rule over a dataset, duplicates, the table), :mod:`.audit`
  (reading a dataset's pairs; the entry points).
- label quality (``data/audit_pairs.py --scorer``, the trainer's ``--audit_scorers``): :mod:`.label_quality`
  (agreement of the labels with scorers and among them, near-ties, pairs every scorer calls the other way).

May import: ``data``, ``evaluation`` (generation, statistics), ``scorers``. The audit imports only
``data`` and :mod:`diffusion_dpo.evaluation.stats`, so the trainer (``training.data_setup``) can run it;
:mod:`.label_quality` too, plus ``scorers`` inside the function that loads them.
"""
