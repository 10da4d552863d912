"""Model families as `flax.nnx` modules: the shared decoder (`decoder.py`) built from a family's `SPEC`
(one file each); `registry` maps architecture names to them."""
