"""Calibration: microbenchmarks on a real GPU (or the CPU, for tiny models) written to a profile.

Imports torch; the simulator (djinnsim.sim) never imports this package.
"""
