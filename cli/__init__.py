"""The patchdb command line: thin Click commands that parse arguments and call the library."""
