"""What the SVD methods share (TSV-M, TSV-C: tsv.py; Iso-C, Iso-CTS: iso.py): which tensors get the
SVD treatment, the float64 linear algebra, and the tensor kernel that routes every tensor.

Which tensors: a float tensor is merged by its method's SVD formula iff it is 2-D, non-empty, and its
name does not match the method's `svd_exclude` regular expression (`re.search`); every other float
tensor is merged as the mean of the task vectors, `(sum_t tau_t) / T` (sum in task order, float32),
chunk by chunk (memory O(T x chunk)). An SVD tensor is read whole (`access.whole()`: base and the T
task vectors in float32, memory T x the tensor) and decomposed in float64.

Numerics (docs/methods.md, "SVD methods"): every SVD is torch.linalg.svd(full_matrices=False) of a
float64 matrix (LAPACK gesdd on the CPU, cuSOLVER on CUDA); there is no truncated or randomised SVD
anywhere: a top-k is the first k triplets of the full thin SVD. The products written are the ones
that do not depend on the SVD's sign and order freedom:
- U_k diag(s_k) V_k^T is unique when s_k > s_{k+1} (ties inside the top k do not matter; a tie at the
  cut-off leaves the top-k subspace itself ambiguous, and LAPACK's order decides);
- a polar factor (the orthogonalisation of TSV-M and Iso-CTS) is computed as the canonical partial
  isometry U_+ V_+^T over the singular values above `cutoff` (numpy's matrix_rank tolerance,
  max(m, n) * eps64 * s_max): for a full-rank matrix this is the orthogonal polar factor P Q^T of the
  official code; for a rank-deficient one (zero columns, repeated directions) it is the unique choice,
  where P Q^T would depend on whatever basis the SVD picked for the null space;
- triplets whose singular value is at or below the cut-off (of the largest singular value met in the
  tensor) are left out before any orthogonalisation: their vectors are arbitrary, their weight zero.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator

import torch

from mergeflow.errors import CheckpointError
from mergeflow.workers.methods.base import Method, MethodOutput, running_sum
from mergeflow.workers.reading import chunk_ranges

EPS64 = torch.finfo(torch.float64).eps

# The official TSV / Iso rule: 2-D tensors except CLIP's text_projection.
OFFICIAL_EXCLUDE = "text_projection"
# Vocabulary-sized 2-D tensors of language models: input embeddings and output heads (Llama/Qwen/Mistral
# embed_tokens + lm_head, GPT-2 wte, BERT word_embeddings, GPT-NeoX embed_in/embed_out, T5 shared,
# open_clip's text token_embedding, original Llama tok_embeddings/output). Measured on 2 CPU cores,
# 8 tasks, Qwen2.5-0.5B shapes (docs/methods.md, "SVD methods"): TSV-M of the 151936 x 896 embedding
# takes 191 s and peaks at 8.3 GiB (4.1 GiB of float32 task vectors, 4.3 GiB of float64 work), Iso-C
# 33 s / 7.3 GiB, against ~27 s and 0.35 GiB for a whole decoder layer (q, k, v, o, gate, up, down):
# the embedding alone adds ~30% to the time of the 24 layers and 25x to a worker's peak memory.
# Excluded, they are merged chunk by chunk as the mean, in O(T x chunk) memory.
LM_VOCAB = (
    r"(^|\.)(embed_tokens|word_embeddings|wte|tok_embeddings|token_embedding|embed_in|embed_out|lm_head|shared)"
    r"\.weight$|^output\.weight$"
)
DEFAULT_EXCLUDE = f"{OFFICIAL_EXCLUDE}|{LM_VOCAB}"

EXCLUDE_DOC = (
    "regular expression (re.search on the tensor name) of 2-D tensors merged as the mean instead of by SVD; "
    "'' excludes none. Default: CLIP's text_projection (the official rule) and LLM vocabulary embeddings / "
    "lm_head (huge 2-D tensors: whole-tensor SVDs of them cost minutes and T x their size in memory)"
)


def check_pattern(key: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{key}: not a valid regular expression ({e})") from None


def takes_svd(name: str, shape: tuple[int, ...], pattern: str) -> bool:
    """The SVD rule: 2-D, non-empty, and not matched by the svd_exclude pattern."""
    return len(shape) == 2 and math.prod(shape) > 0 and not (pattern and re.search(pattern, name))


# ------------------------------------------------------------------------------- float64 algebra


def cutoff(m: int, n: int, smax: float | torch.Tensor) -> float:
    """Singular values at or below this are numerically zero (numpy.linalg.matrix_rank's tolerance)."""
    return max(m, n) * EPS64 * float(smax)


def thin_svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (m x r), s (r, descending), Vh (r x n) of a float64 matrix, r = min(m, n). A wide matrix is
    decomposed as its transpose (a^T = U' s V'^T, so a = V' s U'^T): LAPACK's gesdd takes 2.7x longer
    on a 896 x 4864 matrix than on its 4864 x 896 transpose (measured, 2 CPU cores)."""
    if a.shape[0] < a.shape[1]:
        u, s, vh = torch.linalg.svd(a.T, full_matrices=False)
        return vh.T, s, u.T
    return torch.linalg.svd(a, full_matrices=False)


def polar(a: torch.Tensor) -> torch.Tensor:
    """The canonical polar factor of `a` (m x p, either orientation): U_+ Vh_+ over the singular values
    above the cut-off. Equal to P Q^T of the SVD a = P diag(sigma) Q^T when a has full rank."""
    if a.numel() == 0:
        return torch.zeros_like(a)
    u, s, vh = thin_svd(a)
    q = int((s > cutoff(*a.shape, s[0])).sum())
    return u[:, :q] @ vh[:q]


def kept(s: torch.Tensor, thr: float) -> int:
    """How many leading singular values of a descending `s` are above `thr`."""
    return int((s > thr).sum())


def task_sum64(taus: torch.Tensor) -> torch.Tensor:
    """sum_t tau_t in float64, added in task order."""
    acc = taus[0].to(torch.float64, copy=True)  # never an alias of the input (kernels do not modify taus)
    for t in range(1, taus.shape[0]):
        acc += taus[t]
    return acc


def mean_delta(taus: torch.Tensor) -> torch.Tensor:
    """The non-SVD tensors' merge: (sum_t tau_t) / T in float32, summed in task order."""
    return running_sum(taus).div_(taus.shape[0])


# ------------------------------------------------------------------------------- the method base


class SvdMethod(Method):
    """A whole-tensor method: `svd_delta` for the SVD tensors, the mean for the others."""

    whole_tensors = True

    def svd_delta(self, taus: torch.Tensor, params, ctx) -> tuple[torch.Tensor, dict]:
        """(delta (m, n) float32, bundle files {key: tensor}) of one SVD tensor; taus (T, m, n) float32."""
        raise NotImplementedError

    def mean_files(self, taus: torch.Tensor, params, ctx) -> dict:
        """Bundle files of a chunk of a tensor merged as the mean (a bundle stores it dense)."""
        return {}

    def tensor_kernel(self, access, params, ctx) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor, MethodOutput]]:
        job = access.job
        if not takes_svd(job.name, job.shape, params.svd_exclude):
            for lo, hi, base, taus in access.chunks():
                yield lo, hi, base, taus, MethodOutput(delta=mean_delta(taus), files=self.mean_files(taus, params, ctx))
            return
        t0 = time.perf_counter()
        base, taus = access.whole()
        if not bool(torch.isfinite(taus).all()):
            access.check_finite()  # the one-line error naming the checkpoint (an SVD would only say "non-finite")
            raise CheckpointError(f"tensor {job.name!r}: a task vector overflows float32 (theta_t - theta_0)")
        delta, files = self.svd_delta(taus, params, ctx)
        sums = {"svd_tensors": 1, "svd_weights": job.numel, "svd_seconds": time.perf_counter() - t0}
        flat_base, flat_taus, flat_delta = base.reshape(-1), taus.reshape(taus.shape[0], -1), delta.reshape(-1)
        for i, (lo, hi) in enumerate(chunk_ranges(job.numel, access.spec.chunk_elems)):
            first = i == 0  # the bundle's factors go out whole with the first chunk (the writer only appends)
            out = MethodOutput(delta=flat_delta[lo:hi], files=files if first else {}, sums=sums if first else {})
            yield lo, hi, flat_base[lo:hi], flat_taus[:, lo:hi], out

    def memory(self, run) -> int | None:
        """Bytes a shard worker needs: the engine's chunk estimate, or for the largest SVD tensor its
        whole base and task vectors (float32, 4 (T + 1) bytes a weight, plus the float32 delta) and
        the float64 SVD work: 25-47 bytes a weight measured (one SVD in flight with LAPACK's
        workspace, the stacked factors and their polar SVD), counted as 48."""
        from mergeflow.workflows.run import memory_per_task

        t = len(run.task_names)
        largest = max(
            (j.numel for s in run.plan.shards for j in s.tensors if takes_svd(j.name, j.shape, run.params.svd_exclude)),
            default=0,
        )
        return max(memory_per_task(run.plan, run.chunk), largest * (4 * (t + 2) + 48) + 256 * 2**20)

    # ------------------------------------------------------------------ driver side

    def manifest(self, run, results) -> dict:
        pattern = run.params.svd_exclude
        two_d = [j for s in run.plan.shards for j in s.tensors if j.is_float and len(j.shape) == 2]
        excluded = sorted(j.name for j in two_d if j.numel and not takes_svd(j.name, j.shape, pattern))
        total = {k: sum(r.sums.get(k, 0) for r in results) for k in ("svd_tensors", "svd_weights", "svd_seconds")}
        return {
            "svd": {
                "rule": "2-D float tensors not matched by svd_exclude; the others: mean of the task vectors",
                "svd_exclude": pattern,
                "tensors": int(total["svd_tensors"]),
                "weights": int(total["svd_weights"]),
                "seconds": round(float(total["svd_seconds"]), 3),
                "excluded_2d": excluded,
            }
        }

    def describe_params(self, method: dict) -> str:
        """The method line; a default svd_exclude pattern (a long regular expression) as "default"."""
        default = self.Params().svd_exclude
        shown = {k: ("default" if k == "svd_exclude" and v == default else v) for k, v in method.items()}
        return super().describe_params(shown)

    def describe(self, manifest: dict) -> list[str]:
        svd = manifest.get("svd")
        if not svd:
            return []
        lines = [
            f"SVD         {svd['tensors']} 2-D tensor(s), {svd['weights']:,} weights, float64, "
            f"{svd['seconds']:.1f} s; every other float tensor: mean of the task vectors"
        ]
        if svd["excluded_2d"]:
            shown = ", ".join(svd["excluded_2d"][:4]) + (" ..." if len(svd["excluded_2d"]) > 4 else "")
            lines.append(f"  2-D but excluded by svd_exclude ({len(svd['excluded_2d'])}): {shown}")
        return lines
