"""Everything one shard needs, importable where only torch, numpy and safetensors are (no ray)."""
