"""Kernels for jaxrs: each Pallas kernel sits beside the plain-XLA reference it is tested against.

No engine knowledge lives here: functions take arrays and return arrays.
"""
