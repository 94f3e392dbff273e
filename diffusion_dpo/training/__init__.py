"""The trainer (``train_sd.py``): the config (:mod:`.config`, YAML mirrored by a dataclass), model set-up
(:mod:`.models`), the optimizer (:mod:`.optim`), the rows of a process (:mod:`.data_setup`), the loss of
one micro-batch (:mod:`.step`), the loop (:mod:`.loop`) and what processes exchange
(:mod:`.collectives`), the guards of a long run (:mod:`.guards`), checkpoints (:mod:`.checkpoint`),
held-out accuracy (:mod:`.validation`), outputs (:mod:`.saving`), FSDP/DeepSpeed specifics
(:mod:`.distributed`), ``metrics.jsonl`` (:mod:`.metrics_file`) and the run's closing lines
(:mod:`.summary`).

May import: ``losses``, ``diffusion``, ``models``, ``data``, and :mod:`diffusion_dpo.curation.audit`
(the start-up shortcut check). Above it: ``evaluation`` (loads outputs through :mod:`.saving`),
``bench``, the synthetic base model (:mod:`diffusion_dpo.synthetic.base`) and the scripts.
"""
