"""Reports: the orchestration over analysis, written as JSON + PNG.

- :mod:`projidx.reports.analyze`: ``projidx analyze``;
- :mod:`projidx.reports.viz`: pictures;
- :mod:`projidx.reports.validate`: ``projidx validate``;
- :mod:`projidx.reports.evaluation`: ``projidx evaluate`` (memorization, LDS).
"""
