"""Benchmark of the trainer's Diffusion-DPO step: ``python -m diffusion_dpo.bench --help``.

:mod:`.cli` chooses the configurations and prints the table, :mod:`.measure` times one configuration
in its own process and counts FLOPs, :mod:`.archs` builds the SD1.5/SDXL-shaped models with random
weights, :mod:`.hardware` holds the GPUs' peak throughput for MFU.
"""
