"""`python -m gpupack` and the `gpupack` console script."""

import sys

from . import early


def entry() -> None:
    early.catch_stop_signals()  # before the heavy imports: a USR1/TERM during start-up is not fatal
    from .cli import main

    sys.exit(main())


if __name__ == "__main__":
    entry()
