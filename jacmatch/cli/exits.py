"""The command line's exit codes."""

EXIT_USAGE = 2
EXIT_IO = 1
EXIT_NONFINITE = 3
EXIT_INCOMPATIBLE = 1
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT after a checkpoint; --resume continues
EXIT_TERMINATED = 143  # 128 + SIGTERM, outside training: every file written so far is complete
