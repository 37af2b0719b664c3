"""python tests/patient_launcher.py ARGS...: `accelerate launch ARGS...` that, after passing a SIGTERM on to the
trainer, waits for it to exit instead of SIGKILLing it 5 seconds later (accelerate 1.16's launcher does). What the
trainer does on that SIGTERM (finish the step, checkpoint, exit) is the same on every machine; how long it takes
is not, and a loaded 2-core machine needs more than 5 s for the step and the checkpoint."""
import sys

import psutil
from accelerate.commands import launch

real_wait_procs = psutil.wait_procs


def wait_for_exit(procs, timeout=None, callback=None):
    return real_wait_procs(procs, timeout=None, callback=callback)


psutil.wait_procs = wait_for_exit  # launch.py calls it as psutil.wait_procs
sys.argv[0] = "accelerate launch"
launch.main()
