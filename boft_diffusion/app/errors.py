"""The app's one error type."""


class StudioError(ValueError):
    """A problem to show in the page; the app keeps running."""
