"""Builds the Cython extensions in src/; package metadata lives in pyproject.toml."""
import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join("src")

extensions = [
    Extension(
        "adapm.table._table",
        sources=[os.path.join(SRC, "_table.pyx")],
        include_dirs=[SRC, numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3", "-std=gnu11"],
    ),
    # The node's intent store (adapm.policy.intents' IntentStore is its reference).
    Extension(
        "adapm.policy._intents",
        sources=[os.path.join(SRC, "_intents.pyx")],
        include_dirs=[SRC, numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3", "-std=gnu11"],
    ),
    # The node server's compiled data plane: the table's kernels (cimported from src/)
    # and libzmq reached by address, so no header of any library is needed.
    Extension(
        "adapm.node.data._plane",
        sources=[os.path.join(SRC, "_plane.pyx")],
        include_dirs=[SRC],
        extra_compile_args=["-O3", "-std=gnu11"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=[SRC],
        compiler_directives={"language_level": "3"},
    ),
)
