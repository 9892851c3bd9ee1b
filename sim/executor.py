"""The server's GPU executor and its scheduling policies, re-exported from sim/engine/executors.py."""

from .engine.executors import (
    EXECUTORS,
    ContinuousBatching,
    Execution,
    FluidTimeSliced,
    GpuWork,
    PassTimer,
    SerialFCFS,
    TimeSliced,
    make_executor,
)

__all__ = ["EXECUTORS", "ContinuousBatching", "Execution", "FluidTimeSliced", "GpuWork", "PassTimer", "SerialFCFS", "TimeSliced",
           "make_executor"]
