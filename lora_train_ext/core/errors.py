"""Errors a user can fix. They name the field and what would be valid."""

from __future__ import annotations


class UserError(ValueError):
    """A bad input. `field` is the setting's name as the user sees it (CLI flag or config key)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def to_json(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


class UserErrors(UserError):
    """Several bad inputs found at once (a check that looks at everything before it stops).
    `field` / `message` are the first problem's, so code that handles one UserError still works;
    `problems` holds them all; `str()` lists them all, one per line."""

    def __init__(self, problems: list[UserError]):
        flat: list[UserError] = []
        for p in problems:
            flat.extend(p.problems if isinstance(p, UserErrors) else [p])
        if not flat:
            raise ValueError("UserErrors needs at least one problem")
        super().__init__(flat[0].field, flat[0].message)
        self.problems = flat
        self.args = ("\n".join(str(p) for p in flat),)

    def __str__(self) -> str:
        return self.args[0]


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, base weights changed, ...)."""
