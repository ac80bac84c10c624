"""One module per CLI command, on top of planner.api: each parses its flags into the library's
models, calls the library, and prints (text or JSON). planner/cli.py only dispatches."""
