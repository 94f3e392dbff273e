"""Library code of the synthetic preference-alignment experiment (``data/synthetic_experiment.py``):
fitting the tiny VAE, collecting the results table, and the figures."""
