"""The healing loss alone: time and memory of forward + backward over [B, 512, V] logits, the fused
loss (mlaify/heal/distill.py) against the same loss written with plain autograd ops (what healing used
before), each in its own process so that peak memory is its own.

    python benchmarks/kd_loss.py            # about 3 minutes on 2 cores

Logits are bfloat16, as healing's autocast forward leaves them; the loss is kd+lm at temperature 1.
Vocabularies: SmolLM2's (49,152) and Gemma-3's (262,144). Writes `kd_loss.md` and `kd_loss.json`
into benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from heal import RESULTS

from mlaify.heal.distill import distillation_loss

SEQ = 512
CASES = ((49_152, 8), (262_144, 2), (262_144, 8))  # (vocabulary, windows): Gemma at 8 is healing's default


def plain_loss(student: torch.Tensor, teacher: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """kd+lm with autograd ops: one shared student log-softmax, KL, and NLL of the next tokens."""
    log_p = F.log_softmax(student.float(), dim=-1)
    log_t = F.log_softmax(teacher.float(), dim=-1)
    kd = F.kl_div(log_p.flatten(0, 1), log_t.flatten(0, 1), log_target=True, reduction="batchmean")
    targets = F.pad(ids[:, 1:], (0, 1), value=-100)
    lm = F.nll_loss(log_p.flatten(0, 1), targets.flatten(), ignore_index=-100)
    return (kd + lm) / 2


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(impl: str, vocab: int, batch: int, runs: int) -> dict:
    """One case in this process: seconds per forward + backward, and the peak memory above the inputs."""
    g = torch.Generator().manual_seed(0)
    student = torch.randn(batch, SEQ, vocab, generator=g, dtype=torch.bfloat16).requires_grad_()
    teacher = torch.randn(batch, SEQ, vocab, generator=g, dtype=torch.bfloat16)
    ids = torch.randint(0, vocab, (batch, SEQ), generator=g)
    base = peak_bytes()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        loss = (
            plain_loss(student, teacher, ids)
            if impl == "plain"
            else distillation_loss(student, teacher, ids, "kd+lm")
        )
        loss.backward()
        times.append(time.perf_counter() - start)
        student.grad = None
    return {"seconds": min(times), "peak_extra_bytes": peak_bytes() - base, "loss": float(loss.detach())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--case", nargs=3, help=argparse.SUPPRESS)  # impl vocab batch: one child process
    args = parser.parse_args()
    if args.case:
        impl, vocab, batch = args.case[0], int(args.case[1]), int(args.case[2])
        print(json.dumps(measure(impl, vocab, batch, args.runs)))
        return
    rows = []
    for vocab, batch in CASES:
        logits_bytes = batch * SEQ * vocab * 4
        row = {"vocab": vocab, "batch": batch, "float32_logits_bytes": logits_bytes}
        for impl in ("plain", "fused"):
            cmd = [sys.executable, __file__, "--runs", str(args.runs), "--case", impl, str(vocab), str(batch)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode == -signal.SIGKILL:  # the kernel's out-of-memory killer: a result too
                row[impl] = None
                continue
            done.check_returncode()
            row[impl] = json.loads(done.stdout.splitlines()[-1])
        rows.append(row)
        print(row, flush=True)
    (RESULTS / "kd_loss.md").write_text(render(rows, args.runs))
    (RESULTS / "kd_loss.json").write_text(
        json.dumps({"seq_len": SEQ, "runs": args.runs, "rows": rows}, indent=2) + "\n"
    )
    print(render(rows, args.runs))


def cells(m: dict | None, size: int) -> list[str]:
    """Seconds and peak memory (also per float32 logits) of one measurement; None: killed for memory."""
    if m is None:
        return ["killed: out of memory", "-"]
    peak = m["peak_extra_bytes"]
    return [f"{m['seconds']:.2f}", f"{peak / 1e9:.2f} GB ({peak / size:.1f}x)"]


def render(rows: list[dict], runs: int) -> str:
    lines = [
        f"# Healing loss (kd+lm): forward + backward over [B, {SEQ}, V] bfloat16 logits, fused vs plain",
        "",
        "Peak: memory above the two logits tensors, and as a multiple of the float32 logits [B, S, V] "
        f"(seconds: best of {runs} runs). Each case runs in its own process; one that the kernel kills "
        "for memory is recorded as such.",
        "",
        "| vocabulary | windows | float32 logits | plain s | plain peak | fused s | fused peak "
        "| fused / plain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        size = r["float32_logits_bytes"]
        plain, fused = r["plain"], r["fused"]
        ratio = "-"
        if plain and fused:
            t, m = fused["seconds"] / plain["seconds"], fused["peak_extra_bytes"] / plain["peak_extra_bytes"]
            ratio = f"time {t:.2f}x, peak {m:.2f}x"
        row = [
            f"{r['vocab']:,}",
            str(r["batch"]),
            f"{size / 1e9:.2f} GB",
            *cells(plain, size),
            *cells(fused, size),
            ratio,
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
