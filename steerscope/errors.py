"""Error types. Every error steerscope raises on bad input is a `SteerscopeError` whose message
names the problem and the fix, so the CLI can print it as one line."""


class SteerscopeError(ValueError):
    """Bad input or state that the user can fix; the message says how."""


class UnknownArchitectureError(SteerscopeError):
    """The model's `config.model_type` has no entry in the architecture registry."""


class LayerError(SteerscopeError, IndexError):
    """A layer index outside the model's range."""


class ModelMismatchError(SteerscopeError):
    """A vector artifact was made for another model (d_model, fingerprint or layer count differ)."""


class ModelLoadError(SteerscopeError):
    """A model could not be loaded (missing path, offline hub id, broken checkpoint)."""
