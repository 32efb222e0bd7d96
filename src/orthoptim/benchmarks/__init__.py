"""The benchmark suite: data, models, tasks, optimizers, runner and report.

Modules (import them directly; nothing heavy is imported here):

- :mod:`.data`, :mod:`.cifar`, :mod:`.corpora`: offline loaders (IDX gzip, MNIST-1D pickle,
  CIFAR-10 JPEG zip or torchvision pickles, plain text) with sha256 verification against a
  folder's ``SOURCES.md``, plus embedded data that needs no data directory (scikit-learn digits,
  text that ships with Python).
- :mod:`.models`, :mod:`.gpt`: MLP, small CNN, CIFAR ResNet (``build_model``) and a nanoGPT-style
  GPT.
- :mod:`.streams`, :mod:`.longtail`, :mod:`.train`, :mod:`.metrics`: continual streams,
  long-tailed sampling, the one training loop, and the metrics.
- :mod:`.tasks`: the benchmark tasks (one :class:`~.tasks.base.TaskSpec` each).
- :mod:`.registry`, :mod:`.hparams`, :mod:`.tuning`: optimizers by name, the versioned
  hyperparameter config, equal-budget lr tuning on a validation split.
- :mod:`.runner`, :mod:`.suites`, :mod:`.results`, :mod:`.report`: resumable runs, the ``quick``
  and ``paper`` suites, the JSONL store, the markdown/PNG report.
"""
