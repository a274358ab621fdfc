"""Search: the methods as inner products, and the indices that answer them.

- :mod:`projidx.search.scoring`: TracIn, ReTrac, cosine, matched and kernel methods as vectors (math);
- :mod:`projidx.search.kernels`: store-wide kernels of the TRAK family (D-TRAK);
- :mod:`projidx.search.index`: FAISS indices over a store;
- :mod:`projidx.search.attribution`: queries end to end (featurize, then top-k).
"""
