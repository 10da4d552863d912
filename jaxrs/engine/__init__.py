"""The serving engine: sequences, block manager, scheduler loop, jitted runner, sampling."""
