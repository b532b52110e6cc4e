"""A service that leaves an orphan behind, as daemons that double-fork do.

    double_fork.py PIDFILE SECONDS

The main process forks a middle process, which forks a grandchild and exits at
once; the grandchild writes its pid to PIDFILE and lives SECONDS. The main
process then sleeps (it is the unit's service).
"""

import os
import sys
import time

pidfile, seconds = sys.argv[1], float(sys.argv[2])
middle = os.fork()
if middle == 0:
    if os.fork() == 0:
        os.setsid()
        with open(pidfile + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(pidfile + ".tmp", pidfile)
        time.sleep(seconds)  # wait-ok: the program's own life, not a synchronization
        os._exit(0)
    os._exit(0)
os.waitpid(middle, 0)
time.sleep(3600)  # wait-ok: the program's own life, not a synchronization
