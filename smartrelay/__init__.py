"""SmartRelay: a transactional email relay on Twisted."""

__version__ = "0.1.0"
