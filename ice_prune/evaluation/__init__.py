"""Evaluation harness: the published map protocols and top-1 / top-5 of a (pruned) model, what
``train/evaluate.py`` runs (:mod:`~ice_prune.evaluation.protocols`), their metrics
(:mod:`~ice_prune.evaluation.metrics`) and the ICE paper's published figures
(:mod:`~ice_prune.evaluation.paper`)."""
from ice_prune.evaluation.protocols import (DATASETS, ICE_TARGETS, JACCARD_TAUS, PROTOCOL_NAMES, DataKind,
                                            check_methods, collate, compute_maps, default_methods,
                                            evaluate_accuracy, evaluate_agreement, evaluate_maps,
                                            format_table, grid_row, grid_rows, jaccard_masks,
                                            open_dataset, parse_data_spec, patch_mask)

__all__ = ["DATASETS", "ICE_TARGETS", "JACCARD_TAUS", "PROTOCOL_NAMES", "DataKind", "check_methods", "collate",
           "compute_maps", "default_methods", "evaluate_accuracy", "evaluate_agreement", "evaluate_maps",
           "format_table", "grid_row", "grid_rows", "jaccard_masks", "open_dataset", "parse_data_spec",
           "patch_mask"]
