"""scpert-dist: pretrain on bulk LINCS L1000, finetune on single-cell drug perturbations (sci-Plex3),
predict single-cell responses to drugs the finetuning never saw.

`from scpert_dist import ScPert` is the notebook API (see scpert_dist/api.py); it is imported on first use so
that `import scpert_dist` (and the CLI) stays light."""

__version__ = "0.1.0"
__all__ = ["ScPert"]


def __getattr__(name: str):
    if name == "ScPert":
        from .api import ScPert

        return ScPert
    raise AttributeError(f"module 'scpert_dist' has no attribute {name!r}")
