"""djinnsim: a discrete-event simulator of Djinn-style GPU disaggregation."""

__version__ = "0.1.0"
