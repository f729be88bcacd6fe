"""Backends: one module (or package) per place a model runs.

A backend never imports another backend. The heavy ones load lazily so that
``import inferd`` stays fast and works without the compiled llama.cpp core.
"""
