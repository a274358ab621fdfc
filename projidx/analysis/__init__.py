"""Analysis: numbers only (no I/O, no orchestration).

- :mod:`projidx.analysis.bias`: timestep bias, generally influential samples, self-influence, fidelity;
- :mod:`projidx.analysis.memorization`: memorization ground truth on generated images;
- :mod:`projidx.analysis.lds`: the linear datamodeling score.
"""
