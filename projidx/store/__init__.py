"""Storage: the Zarr feature store and where it lives.

- :mod:`projidx.store.feature_store`: the store (layout, provenance checks, chunks, writer lock);
- :mod:`projidx.store.locations`: local paths or fsspec URLs.
"""
