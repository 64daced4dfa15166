"""The paper's experiments around the ``ldro`` library, in three rooms.

* Entry points (thin absl ``main``s, ``python -m experiments.<name>``): ``train``
  (the runner), ``synthetic`` (Figure 2), ``sweep``, ``pareto``, ``monolingual``,
  ``lm_table``, ``faults``, ``train_vocab``, ``benchmark``.
* :mod:`experiments.families` -- experiment definitions, one module per family.
* :mod:`experiments.runner` -- the training loop and its infrastructure.
"""
