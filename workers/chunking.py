"""How many elements per task one compute step takes: the one place for chunk-size defaults.

On a CPU the T task rows of a chunk (T x chunk float32, ~8 MiB here) stay in the last-level cache
between the dozen element-wise passes a method makes over them: measured 1.5-2x faster than
4M-element chunks. A GPU wants large chunks to amortise kernel launches and transfers.
Chunks are multiples of 8: masks are packed 8 to a byte, and a chunk must not split a byte.
"""

CPU_CHUNK_FLOATS = 1 << 21  # floats of all T task rows of one CPU chunk
CPU_MIN_CHUNK = 1 << 16
GPU_CHUNK = 1 << 22
DEFAULT_CHUNK = 1 << 18  # what a config that names no device-specific size starts from


def chunk_for(device: str, tasks: int) -> int:
    """Elements per task per chunk for a device and a number of tasks, when the config does not say."""
    if device.startswith("cuda"):
        return GPU_CHUNK
    chunk = max(CPU_MIN_CHUNK, CPU_CHUNK_FLOATS // max(tasks, 1))
    return chunk - chunk % 8
