"""diffusion-dpo: preference alignment for diffusion and text models.

One folder per concern (docs/layout.md): the loss core (``losses``), the diffusion surrogate
(``diffusion``), model families (``models``), data (``data``), the trainer (``training``), scorers
and evaluation (``scorers``, ``evaluation``), curation (``curation``), the synthetic shapes world
(``synthetic``), the benchmark (``bench``) and the LM side (``lm``). Imports run one way, from the
entry points down to the loss core; tests/test_import_cycles.py fails on any cycle.
"""

__version__ = "0.1.0"
