"""The bad-input corpus: every way a run record can be broken, and what must happen."""
