"""Builds the one C extension, ``supervisor._spawn`` (vfork-style spawning).

Everything else is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "supervisor._spawn",
            sources=["supervisor/_spawn.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ]
)
