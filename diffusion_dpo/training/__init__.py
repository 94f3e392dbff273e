"""The trainer (``train_sd.py``): the config (:mod:`.config`, YAML mirrored by a dataclass), model set-up
(:mod:`.models`), the optimizer (:mod:`.optim`), the rows of a process (:mod:`.data_setup`), the loss of
one micro-batch (:mod:`.step`), the loop (:mod:`.loop`) and what processes exchange
(:mod:`.collectives`), the guards of a long run (:mod:`.guards`), the monitors of a run going wrong
(:mod:`.monitors`, :mod:`.auto_beta`; docs/monitors.md), checkpoints (:mod:`.checkpoint`),
held-out accuracy (:mod:`.validation`), the win rate of samples vs the reference (:mod:`.win_rate`), outputs (:mod:`.saving`), FSDP/DeepSpeed specifics
(:mod:`.distributed`), ``metrics.jsonl`` (:mod:`.metrics_file`) and the run's closing lines
(:mod:`.summary`). Around the run: the checks before anything loads (:mod:`.preflight`), an output
folder's earlier run (:mod:`.previous_run`), ``--help`` (:mod:`.cli_help`), log set-up and the progress
bar's fields (:mod:`.console`), the model card (:mod:`.model_card`) and ``--push_to_hub`` (:mod:`.hub`).

May import: ``losses``, ``diffusion``, ``models``, ``data``, :mod:`diffusion_dpo.curation.audit`
(the start-up shortcut check) and :mod:`diffusion_dpo.curation.label_quality` (the start-up label check
with ``--audit_scorers``); ``scorers`` and :mod:`diffusion_dpo.evaluation.stats` (``--validation_scorer``,
:mod:`.win_rate`). Above it: ``evaluation`` (loads outputs through :mod:`.saving`),
``bench``, the synthetic base model (:mod:`diffusion_dpo.synthetic.base`) and the scripts.
"""
