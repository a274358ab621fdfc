"""The edge: the command line, the HTTP service and the demo.

- :mod:`projidx.cli.main`: the click commands;
- :mod:`projidx.cli.service`: ``projidx serve``;
- :mod:`projidx.cli.demo`: ``projidx demo``.
"""
