"""The package version (one place: the root package, the manifests and the command line read it here)."""

__version__ = "0.1.0"
