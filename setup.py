"""Build of the compiled modules; everything else is in pyproject.toml.

``runtime.managed._kernels`` is the probe loop of the managed hash table. It is optional: where no C
compiler is at hand, the install still succeeds and the table uses its numpy version (slower).
``runtime.network._ring`` is the descriptor ring of local channels (atomics and fences Python cannot
express). Also optional: without it, local channels send their bytes over ZeroMQ instead.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("runtime.managed._kernels", ["runtime/managed/_kernels.c"],
                             extra_compile_args=["-O3"], optional=True),
                   Extension("runtime.network._ring", ["runtime/network/_ring.c"],
                             extra_compile_args=["-O2", "-Wall"], optional=True)])
