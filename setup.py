"""Build script. Pure Python for now; the C++/CUDA extension (csrc/) is added here when it lands."""

from setuptools import setup

setup()
