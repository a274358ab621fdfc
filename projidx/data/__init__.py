"""Data: every dataset as an :class:`~projidx.data.datasets.ImageSet` (built-in sets, image folders, Hugging Face
datasets, arrays), with a fingerprint that stores record.

- :mod:`projidx.data.datasets`: loading, subsetting and fingerprinting images (and labels).
"""
