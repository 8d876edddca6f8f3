"""Quality against steps of CE / SALT / SALT_DS runs:
`python -m cat_jax.salt_report --output_dir OUT ce=DIR1,DIR2 salt=DIR3,DIR4 [salt_ds=DIR5,DIR6]`
(see `cat_jax.jobs.salt_report`).
"""

import sys

from cat_jax.jobs.salt_report import main

if __name__ == "__main__":
    sys.exit(main())
