"""Experiment families: one module per family, each an :class:`~experiments.families.base.Experiment`.

``base`` (the contract the runner uses), ``synthetic`` (section 4), ``image``
(multitask CIFAR, section 5.1), ``lm`` (multilingual language modelling,
section 5.2), ``toy`` (a tiny MLP for runner and scale-out smoke tests).
"""
