"""Fixtures for hellbender's own tests and benchmarks: tiny offline models and measuring probes.

Shipped in the package so the benchmarks (``bench/``) and the tests share one definition, but
never imported by hellbender itself (a test of the import graph checks that): training code does
not depend on anything here.
"""
