"""harness: an experiment-tracking research harness for image classification."""

__version__ = "0.1.0"
