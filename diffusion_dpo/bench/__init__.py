"""Benchmark of the trainer's Diffusion-DPO step: ``python -m diffusion_dpo.bench --help``.

:mod:`.cli` chooses the configurations and prints the table, :mod:`.measure` times one configuration
in its own process and counts FLOPs, :mod:`.archs` builds the SD1.5/SDXL-shaped models with random
weights, :mod:`.hardware` holds the GPUs' peak throughput for MFU.

:mod:`.loading` times the trainer's DataLoader (``--preset data``), :mod:`.rows` picks a preset's rows
(``--rows``), :mod:`.suite` runs every GPU row of the README in one command.

May import: :mod:`diffusion_dpo.training` (it times the trainer's own step and loader), ``models``,
``data``. Nothing in the package imports the benchmark.
"""
