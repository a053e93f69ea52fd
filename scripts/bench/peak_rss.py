"""Run a command and print its peak resident memory in MB (the largest process of its tree) as
the last line. Usage: peak_rss.py CMD ..."""

import resource
import subprocess
import sys

res = subprocess.run(sys.argv[1:], capture_output=True, text=True)
if res.returncode != 0:
    sys.stderr.write(res.stderr[-3000:])
    sys.exit(res.returncode)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
