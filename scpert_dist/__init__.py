"""scpert-dist: pretrain on bulk LINCS L1000, finetune on single-cell drug perturbations (sci-Plex3),
predict single-cell responses to drugs the finetuning never saw."""

__version__ = "0.1.0"
