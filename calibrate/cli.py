"""`djinnsim calibrate` (placeholder until the calibration issue lands)."""


def calibrate() -> None:
    """Measure a GPU and write a calibration profile."""
    from djinnsim.errors import DjinnsimError

    raise DjinnsimError("calibrate is not implemented yet")
