"""What the simulator, calibrate/ and validate/ share (no torch at import time)."""
