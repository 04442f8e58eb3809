"""svdfuse's version, in a module of its own: what records it (the model card) need not import the package."""

__version__ = "0.1.0"
