"""The data stages, one subpackage each: ``ingest`` (a source to WebDataset shards, label
noise or a label file), ``features`` (crop scoring with ``w_share``: loss, E^r, grad norm, to
Parquet parts), ``sampler`` (the 10-parameter sampler: its transform tables, its file, the
draw-twice-keep-half filter and per-image weights for other loaders)."""
