"""Compare cascade summaries across seeds:
`python -m cat_jax.cascade_compare runs/offline_cascade/seed*/cascade [--rule chow_average]`
(see `cat_jax.jobs.cascade_compare`).
"""

import sys

from cat_jax.jobs.cascade_compare import main

if __name__ == "__main__":
    sys.exit(main())
