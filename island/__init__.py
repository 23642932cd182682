"""island package."""
