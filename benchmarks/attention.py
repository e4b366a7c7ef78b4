"""Attention kernels vs their baselines: the same as `longreach bench attention`.

    python benchmarks/attention.py --suite cca,decode,gca --out runs/bench/attention.json
    python benchmarks/attention.py --quick --device cpu      # smoke test, tiny shapes

See `longreach.bench.attention` for the suites, the timing and the floors.
"""

import sys

from longreach.bench.attention import main

if __name__ == "__main__":
    sys.exit(main())
