"""Model families and loading.

- :mod:`.pretrained`: the floor: a pipeline's ``model_index.json``, the dtype keyword of
  ``from_pretrained``, quiet loads;
- :mod:`.families`: one small module per family (SD1.x/2.x, SDXL, SD3/3.5) that loads it, encodes
  prompts, noises, predicts and picks the target;
- :mod:`.loading`: a pipeline's components, through its family, and the VAE/text encodings;
- :mod:`.tiny`: tiny random pipelines of each family, built offline (tests, the embedded default,
  the benchmark).

May import: :mod:`diffusion_dpo.diffusion` (the forward processes), :mod:`diffusion_dpo.transfer`;
:mod:`.tiny` the synthetic world (it scales its VAE on the world's renders).
"""
