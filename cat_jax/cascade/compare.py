"""`python -m cat_jax.cascade.compare`: an alias of `python -m cat_jax.cascade_compare`, kept for one release."""

import runpy

if __name__ == "__main__":
    runpy.run_module("cat_jax.cascade_compare", run_name="__main__", alter_sys=True)
