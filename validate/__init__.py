"""Validation: real runs of a scenario's small points on a GPU, compared with the simulator."""
