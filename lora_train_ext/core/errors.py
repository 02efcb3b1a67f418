"""Errors a user can fix. They name the field and what would be valid."""


class UserError(ValueError):
    """A bad input. `field` is the setting's name as the user sees it (CLI flag or config key)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, base weights changed, ...)."""
