import os
import sys

from sftlib.cli import main

code = main()
if code == 0 and int(os.environ.get("RANK", "0")) != 0:
    # A rank other than 0 of a multi-process launch, its work done (rank 0 evaluates and saves): leave
    # without the interpreter's teardown. Seen on the CPU (gloo) about once in four runs under load,
    # after the rank had left the process group: the teardown aborted ("terminate called without an
    # active exception") and the launcher then stopped rank 0 in the middle of its export.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
sys.exit(code)
