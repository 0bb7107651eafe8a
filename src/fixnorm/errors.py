class FixNormError(ValueError):
    """Every error fixnorm raises on bad input: says what was wrong and what to do."""
