"""`python -m cat_jax.salt.report`: an alias of `python -m cat_jax.salt_report`, kept for one release."""

import runpy

if __name__ == "__main__":
    runpy.run_module("cat_jax.salt_report", run_name="__main__", alter_sys=True)
