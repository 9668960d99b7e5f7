"""The extent store's public API; the implementation lives in `lunastor.chunk.store`."""

from lunastor.chunk.store import *  # noqa: F403
from lunastor.chunk.store import __all__  # noqa: F401
