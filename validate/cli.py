"""`djinnsim validate` (placeholder until the validation issue lands)."""


def validate() -> None:
    """Run a scenario's small points for real and compare them with the simulator."""
    from djinnsim.errors import DjinnsimError

    raise DjinnsimError("validate is not implemented yet")
