"""The linear-recurrence kernel vs its reference: the same as `longreach bench recurrence`.

    python benchmarks/recurrence.py --suite op,model --out runs/bench/recurrence.json
    python benchmarks/recurrence.py --quick --device cpu      # smoke test, tiny shapes

See `longreach.bench.recurrence` for the suites, the timing and the floors.
"""

import sys

from longreach.bench.recurrence import main

if __name__ == "__main__":
    sys.exit(main())
