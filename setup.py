"""The gateway's C extension; everything else about the package is in pyproject.toml."""
from setuptools import Extension, setup

# Pillow's bicubic resize, pixel for pixel, vectorised (services/gateway/tiling.py). Optional: where it cannot be
# built, the gateway resizes with Pillow itself (the same pixels, about 5x slower). -fno-wrapv undoes Python's
# -fwrapv, which makes gcc vectorise the horizontal pass ~1.35x slower; no sum there can overflow (as in Pillow).
setup(ext_modules=[Extension("services.gateway._resample", ["services/gateway/_resample.c"],
                             extra_compile_args=["-O3", "-fno-wrapv"], optional=True)])
