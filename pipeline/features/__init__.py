"""Features: K replayable crops of every training image (``crops``, ``crop_stream``) scored
by a frozen model (``scoring``: loss, renormed entropy, grad norm), written as Parquet parts
(``build.build_features``)."""

from .build import build_features

__all__ = ["build_features"]
