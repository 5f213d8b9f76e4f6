"""Compiled kernels (shipped as ``tinymeta.kernels``): arrays in, arrays out.

This package never imports tinymeta. Each kernel has a vectorized NumPy
reference that stays the default path until a profile shows the kernel helps.
"""
