"""The simulator. Never imports torch: it sees GPU costs only through a CostModel."""
