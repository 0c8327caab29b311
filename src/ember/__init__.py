"""ember: open text-to-image, frugal, honest and licensed."""

__version__ = "0.1.0"
