"""Training merged models: the frozen/trainable split, the data feed, feature storage,
loss inference, and :func:`fit_head` / :func:`fine_tune` (in :mod:`kmerge.training.fit`)."""
