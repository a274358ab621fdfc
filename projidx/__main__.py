"""``python -m projidx`` and the ``projidx`` console script: the CLI, with Ctrl-C during start-up (imports
included) reported as one line instead of a traceback."""

from __future__ import annotations

import sys


def run() -> None:
    try:
        from projidx.cli.main import main
    except KeyboardInterrupt:
        sys.stderr.write("Error: interrupted\n")
        sys.exit(130)
    main()


if __name__ == "__main__":
    run()
