"""Code shared by every service: errors, logging, settings, metrics."""
