"""Finetuning: condition encoders + pretrained gene-token encoder + decoder; per-cell prediction.

Modules: config.py (FinetuneConfig: data / model / objective / optim / tracking sections), data.py (AnnData -> arrays,
the ControlPool every prediction draws from), drugrep.py (drug features), decoders.py (the decoder classes,
registered in registry.DECODERS), model.py (FinetuneModel), build.py (the model from a config or a saved folder),
step.py, validate.py, predict.py (the one prediction path), train.py (Finetuner, run_finetune).

Model (model.py): a CONTROL cell of the same line -> GeneTokenEncoder -> per-gene states [B, G, d] + condition
embedding (drug + cell line + dose, broadcast over genes) -> decoder -> shift added to the control cell, plus a
low-rank shift head (ShiftHead: Hill-gated drug vector . per-gene factors initialised from the gene embeddings, and a
dose-gated per-line shared response). Speed: with model.freeze_encoder (default) the encoder is frozen and its token
states are cached once for a pool of `model.control_pool` control cells per line (ControlPool), so a step runs only the
condition encoders, decoder and shift head; freeze_encoder=false trains the whole model (the encoder runs every step).
Training starts with a full-batch warm start of the drug encoder + shift head on the training condition means
(`optim.cond_steps`, best state by validation-drug logFC Pearson), then per-cell steps with a per-cell MSE plus a
condition-mean logFC loss (`objective.cond_weight`), genes standardised by the control sd.
Decoders: factor (the default; see decoders.py), lstm (the paper), gru, transformer run over G/gene_block gene
blocks (978 genes / 16 = 62 steps); mlp is
per gene. Dose: MLP of log10(dose_um + 1e-3) times a learned Hill-like gate; vehicle rows get a learned control
vector (the paper code multiplied by log(dose/maxdose), which erases the top dose).

Drug representations (drugrep.py):
  learned      a lookup table (the paper's choice). It CANNOT represent a drug absent from training: such a drug
               gets an untrained vector. Training warns when the data holds drugs outside training; `predict`
               refuses an unseen drug with a SmilesError pointing to drug_rep=morgan + --smiles.
  morgan       RDKit Morgan fingerprint (r=2, 1024 bits) -> MLP; any valid SMILES.
  descriptors  RDKit descriptors (signed log1p) -> MLP; any valid SMILES.
  lincs        the drug's mean LINCS signature encoded by the pretrained encoder ([CLS] || mean token state).

Training (train.py): `run_finetune(cfg) -> FinetuneResult`; random (control, perturbed) pairs each step; MSE
(+ optional energy distance, `objective.mmd_weight`; measured on the test fixture over 2 seeds it did not help: held-out
logFC r 0.163 without vs 0.149 with weight 0.1, dis 0.554 vs 0.552); validation = logFC Pearson on 'valid' drugs only;
best epoch kept; MLflow logs params, per-epoch loss/val/epoch_s, model/ (safetensors + json) and a plot.
"""
