"""Names shared by every stage: Parquet shard columns, manifest keys, AnnData .obs/.var columns.

Shards (written by `scpert data lincs`, read by Ray Data in pretraining)
-----------------------------------------------------------------------
One row per signature. Columns:
  sig_id (string), cell_id (string), pert_id (string), pert_iname (string), pert_type (string:
  'trt_cp' | 'ctl_vehicle'), dose_um (float32, NaN for vehicle), time_h (float32), smiles (string, nullable),
  cell_idx (int32, index into manifest['cells']), drug_idx (int32, index into manifest['drugs']; vehicle is a
  drug named 'DMSO' / its pert_id), expr (fixed_size_list<float32|float16>[n_genes], genes in manifest['genes'] order).

manifest.json (in the shard folder)
-----------------------------------
  schema_version, kind ('lincs'), created, genes (list of gene ids, Entrez, as strings, in expr column order),
  gene_symbols (same order), n_genes, cells (vocabulary, list of cell ids), drugs (vocabulary, list of pert_ids),
  drug_names (pert_iname per drug), shards (list of {file, rows, sha256, bytes}), n_rows, expr_dtype,
  sources (list of {name, sha256, bytes}), metadata (string: which metadata the data came from),
  semi_synthetic (bool), layout ('fixed_size_list'), row_group_rows (rows per Parquet row group of every shard,
  the last group of a shard shorter; absent in folders written before it: the stream then reads a shard as one unit).

AnnData (written by `scpert data sciplex` and by the simulator; read by finetuning and evaluation)
------------------------------------------------------------------------------------------------
  .X: log1p(library-size normalised) expression, float32; .layers['counts'] raw counts when known.
  .obs: drug (str; vehicle rows 'control'), smiles (str, '' for control), dose_um (float; 0 for control),
        cell_line (str), is_control (bool), plus split columns named 'split_<name>' with values
        'train' | 'valid' | 'test' (| 'ignore').
  .var: index = gene id used by the model (Entrez id string where mapped), gene_symbol, ensembl_id, is_landmark.
  .uns['scpert']: {'normalized': 'log1p_cp10k', 'semi_synthetic': bool, 'metadata': str, ...}
"""

from __future__ import annotations

SCHEMA_VERSION = 1

# shard columns
SIG_ID = "sig_id"
CELL_ID = "cell_id"
PERT_ID = "pert_id"
PERT_INAME = "pert_iname"
PERT_TYPE = "pert_type"
DOSE_UM = "dose_um"
TIME_H = "time_h"
SMILES = "smiles"
CELL_IDX = "cell_idx"
DRUG_IDX = "drug_idx"
EXPR = "expr"
META_COLUMNS = [SIG_ID, CELL_ID, PERT_ID, PERT_INAME, PERT_TYPE, DOSE_UM, TIME_H, SMILES, CELL_IDX, DRUG_IDX]
NUMERIC_COLUMNS = [DOSE_UM, TIME_H, CELL_IDX, DRUG_IDX, EXPR]

TRT_CP = "trt_cp"
CTL_VEHICLE = "ctl_vehicle"

MANIFEST = "manifest.json"

# AnnData
OBS_DRUG = "drug"
OBS_SMILES = "smiles"
OBS_DOSE = "dose_um"
OBS_CELL_LINE = "cell_line"
OBS_CONTROL = "is_control"
CONTROL_NAME = "control"
SPLIT_PREFIX = "split_"
VAR_SYMBOL = "gene_symbol"
VAR_ENSEMBL = "ensembl_id"
VAR_LANDMARK = "is_landmark"
UNS_KEY = "scpert"


def dense(x, dtype=None):
    """A dense numpy copy of an AnnData matrix (sparse or dense). dtype: float32 for models (default of the
    finetuning code), float64 for metrics; None keeps float64."""
    import numpy as np

    if hasattr(x, "toarray"):
        x = x.toarray()
    return np.asarray(x, dtype=np.float64 if dtype is None else dtype)
