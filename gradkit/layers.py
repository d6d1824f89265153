"""Pure init/apply layers (Dense, MLP) over plain pytrees, and weight initializers."""
