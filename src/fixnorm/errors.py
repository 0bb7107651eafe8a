class FixNormError(ValueError):
    """Every error fixnorm raises on bad input: says what was wrong and what to do."""


class NonFiniteError(FixNormError):
    """Training produced a non-finite gradient or norm (diverged): a result for a tuner, not a usage error."""
