"""Training harness behind the ``train/`` scripts: :mod:`~ice_prune.training.engine` (the loop,
processes, checkpoints, logs), :mod:`~ice_prune.training.tasks` (what each script computes per batch)
and :mod:`~ice_prune.training.cli` (the scripts' shared arguments)."""
