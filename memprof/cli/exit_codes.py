"""The exit codes a command returns besides 0, a comparison's 1 and a user error's 2 (``UserError.exit_code``)."""

# Exit codes (README "Exit codes"): a crashed or timed-out cell is the harness failing, not an answer the user asked
# for (``memprof.results.record.HARNESS_FAILURES``); an OOM, a divergence or an optimizer unavailable here are
# answers, and never change the code.
EXIT_CELLS_FAILED = 3
EXIT_INTERRUPTED = 130
