"""The experiment layer: one cell of a table as a plain function, cached stages, run records, W&B.

``cell.run_cell`` runs one (world, model, method, corpus) setting end to end
(``cell.compose_config`` builds its config without a Hydra app); ``run`` is
its Hydra entry point (``trackstar-run``); ``stages`` caches the world, the
model and the retrievals; ``record`` is the run record, the only thing the
tables read; ``tracking`` mirrors it to W&B; ``sweeps`` finds the sweep files.
Nothing is imported here, so that reading run records stays light.
"""
