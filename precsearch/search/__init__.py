"""Finding a plan: the layer graph, the search space, strategies, timing and the Optuna study.
Needs ``pip install 'precsearch[search]'`` (optuna, networkx, pandas, matplotlib)."""
