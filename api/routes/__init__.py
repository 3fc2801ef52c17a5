"""One router per resource, mounted in ``api.app``."""
