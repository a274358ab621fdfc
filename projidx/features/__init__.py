"""Features: per-sample gradients, projected, for training rows (into a store) and queries (in memory).

- :mod:`projidx.features.grads`: per-sample gradients with ``torch.func``;
- :mod:`projidx.features.factorized`: per-layer factorized gradients from one batched pass;
- :mod:`projidx.features.projection`: Johnson-Lindenstrauss projectors;
- :mod:`projidx.features.featurization`: the training and query sides, resumable;
- :mod:`projidx.features.dist`: ranks of a distributed (``torchrun``) featurization;
- :mod:`projidx.features.query`: query features as plain data (what scoring and analysis receive).
"""
