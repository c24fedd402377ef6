"""Run the regsweep CLI in this process and report its peak RSS (KiB) on stderr."""

from __future__ import annotations

import resource
import sys

from regsweep.cli import main

if __name__ == "__main__":
    code = main(sys.argv[1:])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"maxrss_kib={peak}", file=sys.stderr)
    sys.exit(code)
