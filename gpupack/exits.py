"""The exit codes of `gpupack run` and the other commands, one home for the engine, the commands
and the CLI (README "Commands": exit codes): 0 all succeeded, 1 some failed (or could not start),
2 bad input or the run directory in use, 3 stopped early (preempted, allocation ending, too
little time left)."""

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_STOPPED = 0, 1, 2, 3
