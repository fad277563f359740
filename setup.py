"""Build of the one compiled module; everything else is in pyproject.toml.

``runtime.managed._kernels`` is the probe loop of the managed hash table. It is optional: where no C
compiler is at hand, the install still succeeds and the table uses its numpy version (slower).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("runtime.managed._kernels", ["runtime/managed/_kernels.c"],
                             extra_compile_args=["-O3"], optional=True)])
