"""The patchdb command line: thin Click commands that parse arguments and call the library."""

import sys


def run() -> None:
    """The ``patchdb`` console script. Loading torch takes seconds; Ctrl-C then ends as it does later (Click's
    "Aborted!"), not with a traceback from inside an import."""
    try:
        from cli.main import main
    except KeyboardInterrupt:
        print("\nAborted!", file=sys.stderr)
        raise SystemExit(130) from None
    main()
