"""The one limit tests put on waiting: a guard against a hang, never a timing."""

# seconds a subprocess, a wait for a file or a page element may take before the test calls it hung;
# generous for a slow machine (a test is never failed for being slow: CI has its own limit)
HANG_GUARD = 1800
