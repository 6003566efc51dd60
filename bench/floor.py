"""The floor: a plain Task Arithmetic loop that reads every input byte once and writes the
output once, one process, no framework. What any merge tool has to pay at least.

Per tensor, in bounded chunks: read the base and each task with pread into reused buffers,
accumulate tau_t in float32, write base + alpha * sum to the output file (same layout as
the base). Torch uses its default threads (all cores) for the arithmetic.

    .venv/bin/python bench/floor.py BASE_DIR OUT_DIR TASK_DIR... [--alpha 0.3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mergeflow.workers.dtypes import TORCH_DTYPES, itemsize  # noqa: E402
from mergeflow.workers.safetensors_io import layout_header, read_header  # noqa: E402

CHUNK = 1 << 22  # elements per step


def _read(fd: int, buf: bytearray, start: int, nbytes: int) -> memoryview:
    view = memoryview(buf)[:nbytes]
    got = 0
    while got < nbytes:
        n = os.preadv(fd, [view[got:]], start + got)
        if n == 0:
            raise EOFError(f"short read at {start + got}")
        got += n
    return view


def merge_file(base: Path, tasks: list[Path], out: Path, alpha: float) -> int:
    """Returns the bytes read."""
    header = read_header(str(base))
    infos = sorted(header.tensors.values(), key=lambda i: i.start)
    task_headers = [read_header(str(t)) for t in tasks]
    fds = [os.open(base, os.O_RDONLY)] + [os.open(t, os.O_RDONLY) for t in tasks]
    bufs = [bytearray(CHUNK * 8) for _ in fds]
    acc = torch.empty(CHUNK, dtype=torch.float32)
    row = torch.empty(CHUNK, dtype=torch.float32)
    read = 0
    blob, _ = layout_header([(i.name, i.dtype, i.shape) for i in infos], header.metadata)
    with open(out, "wb") as f:
        f.write(blob)
        for info in infos:
            dtype, size = TORCH_DTYPES[info.dtype], itemsize(info.dtype)
            floating = dtype.is_floating_point
            for lo in range(0, info.numel, CHUNK):
                n = min(CHUNK, info.numel - lo)
                nbytes = n * size
                b = torch.frombuffer(_read(fds[0], bufs[0], info.start + lo * size, nbytes), dtype=dtype)
                read += nbytes
                if not floating:
                    f.write(b.numpy().tobytes())
                    continue
                a, r = acc[:n], row[:n]
                a.zero_()
                for k, th in enumerate(task_headers):
                    ti = th.tensors[info.name]
                    r.copy_(torch.frombuffer(_read(fds[k + 1], bufs[k + 1], ti.start + lo * size, nbytes), dtype=dtype))
                    read += nbytes
                    a.add_(r)
                # sum_t (x_t - b) = sum_t x_t - T b, then base + alpha * that
                r.copy_(b)
                a.sub_(r, alpha=len(tasks))
                merged = r.add_(a, alpha=alpha).to(dtype)
                raw = merged.view(torch.int16) if dtype == torch.bfloat16 else merged
                f.write(raw.numpy().tobytes())
    for fd in fds:
        os.close(fd)
    return read


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base")
    ap.add_argument("out")
    ap.add_argument("tasks", nargs="+")
    ap.add_argument("--alpha", type=float, default=0.3)
    args = ap.parse_args()
    base, out, tasks = Path(args.base), Path(args.out), [Path(t) for t in args.tasks]
    out.mkdir(parents=True, exist_ok=True)
    read = 0
    for f in sorted(base.glob("*.safetensors")):
        read += merge_file(f, [t / f.name for t in tasks], out / f.name, args.alpha)
    index = base / "model.safetensors.index.json"
    if index.exists():
        (out / index.name).write_bytes(index.read_bytes())
    print(json.dumps({"bytes_read": read}))


if __name__ == "__main__":
    main()
