"""`python -m gpupack` and the `gpupack` console script."""

import sys

from . import signals


def entry() -> None:
    signals.catch_stop_signals()  # before the heavy imports: a USR1/TERM during start-up is not fatal
    from .cli import main

    sys.exit(main())


if __name__ == "__main__":
    entry()
