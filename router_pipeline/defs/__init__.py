"""The Dagster side, one module per group (loaded by ``load_from_defs_folder``):
data.py, council.py, training.py, evaluation.py, pool.py (the N-model pool), experiments.py (the serving
group: the routing server's experiments), automation.py; resources.py owns
the settings several assets share; metadata.py turns results into UI metadata."""
