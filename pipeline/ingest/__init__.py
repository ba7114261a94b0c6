"""Ingest: a labelled image source to a store of WebDataset shards (``build.ingest``), with
seeded splits (``splits``), injected label noise (``noise``) or a label file (``label_file``)."""

from .build import ingest

__all__ = ["ingest"]
