"""Benchmark foundations: dataset loaders, metrics, small models, task streams, training loop.

Modules (import them directly; nothing heavy is imported here):

- :mod:`orthoptim.benchmarks.data`: offline loaders (IDX gzip, MNIST-1D pickle, CIFAR-10 JPEG zip,
  plain text) with sha256 verification against a folder's ``SOURCES.md``, plus embedded fallbacks
  (scikit-learn digits, Python standard-library source text) that need no data directory.
- :mod:`orthoptim.benchmarks.metrics`: accuracy, balanced / per-class / group accuracy and the
  continual-learning metrics of an accuracy matrix ``R``.
- :mod:`orthoptim.benchmarks.models`: MLP and small CNN, each with a ``head`` output layer.
- :mod:`orthoptim.benchmarks.streams`: permuted, rotated and split continual-learning streams.
- :mod:`orthoptim.benchmarks.longtail`: exponential-profile long-tailed subsampling.
- :mod:`orthoptim.benchmarks.train`: the one training loop, ``evaluate``, ``run_continual`` and
  ``run_longtail``.
"""
