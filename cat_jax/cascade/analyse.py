"""`python -m cat_jax.cascade.analyse`: an alias of `python -m cat_jax.cascade_analyse`, kept for one release."""

import runpy

if __name__ == "__main__":
    runpy.run_module("cat_jax.cascade_analyse", run_name="__main__", alter_sys=True)
