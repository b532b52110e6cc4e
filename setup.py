"""Builds the C extensions: ``supervisor._spawn`` (vfork-style spawning) and ``supervisor._relay`` (the proxy's
splice data path).

Everything else is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "supervisor._spawn",
            sources=["supervisor/_spawn.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        ),
        Extension(
            "supervisor._relay",
            sources=["supervisor/_relay.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        ),
    ]
)
