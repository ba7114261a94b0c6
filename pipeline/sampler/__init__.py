"""The sampler: ``function.Sampler`` (10 parameters -> tau of a crop), the transforms it reads
(``transform``; built by ``table_build``, stored by ``table_store``, from ``quantiles``), its
portable file (``file``), the draw-twice-keep-half filter (``filter``) and per-image weights and
a WebDataset stage for a user's own loader (``image_weights``)."""

from .file import load_sampler, save_sampler
from .function import Sampler, uniform_sampler
from .table_store import build_store_tables, load_tables

__all__ = ["Sampler", "build_store_tables", "load_sampler", "load_tables", "save_sampler",
           "uniform_sampler"]
