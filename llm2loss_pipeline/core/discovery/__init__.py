"""Failure discovery: candidate descriptions scored by the heads, verified on samples.

A regular package (not a namespace one), so that packaging and `lint-imports` both see it.
"""
