"""Running one model over several devices: tensor parallelism over a `jax.sharding.Mesh` (`mesh`,
`shardings`, packed weights marked with their split: `split_tensor`), Pallas kernels per shard
(`sharded_kernels`), engine replicas behind one server (`data_parallel`), and one mesh across
processes (`multihost`)."""
