"""Builds the Cython extensions in src/; package metadata lives in pyproject.toml."""
import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join("src")


def extension(name, source, uses_numpy=True):
    """One compiled module of the package from src/SOURCE (C11, -O3)."""
    return Extension(
        name,
        sources=[os.path.join(SRC, source)],
        include_dirs=[SRC, numpy.get_include()] if uses_numpy else [SRC],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")] if uses_numpy else [],
        # -fno-math-errno: sqrt never sets errno, so that loops of roots become SIMD
        extra_compile_args=["-O3", "-std=gnu11", "-fno-math-errno"],
    )


extensions = [
    extension("adapm.table._table", "_table.pyx"),
    # Sets of keys (adapm.table.keyset's KeySet is the reference).
    extension("adapm.table._keyset", "_keyset.pyx"),
    # The arena's slot allocator (adapm.table.shared_table's SlotAllocator is the reference).
    extension("adapm.table._slots", "_slots.pyx"),
    # The node's intent store (adapm.policy.intents' IntentStore is its reference).
    extension("adapm.policy._intents", "_intents.pyx"),
    # The node server's compiled data plane: the table's kernels (cimported from src/)
    # and libzmq reached by address, so no header of any library is needed.
    extension("adapm.node.data._plane", "_plane.pyx", uses_numpy=False),
    # The worker's compiled miss path (adapm.client.miss_path), libzmq reached the same way.
    extension("adapm.client._miss_path", "_miss_path.pyx", uses_numpy=False),
    # The word2vec app's training step (adapm.apps.word2vec_model), as gensim's
    # word2vec_inner: it knows nothing of the table.
    extension("adapm.apps._word2vec", "_word2vec.pyx"),
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=[SRC],
        compiler_directives={"language_level": "3"},
    ),
)
