"""The pure core: decisions and schemas, tested with plain values; no I/O."""
