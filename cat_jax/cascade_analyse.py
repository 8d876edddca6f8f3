"""Re-analyse a cascade_eval output directory from its records, without decoding:
`python -m cat_jax.cascade_analyse DIR [--output_dir OUT] [--target_deferral_rate 0.3] ...`
(see `cat_jax.jobs.cascade_analyse`).
"""

import sys

from cat_jax.jobs.cascade_analyse import main

if __name__ == "__main__":
    sys.exit(main())
