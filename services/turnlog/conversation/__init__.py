"""The conversation service: the `turnlog serve` process."""
