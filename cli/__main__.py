"""``python -m cli``: the ``patchdb`` command, run from a checkout without the console script."""

from cli import run

run()
