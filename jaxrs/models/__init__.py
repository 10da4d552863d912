"""Model families: one file each, pure functions over a parameter pytree; `registry` maps names to them."""
