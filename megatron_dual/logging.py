"""Progress display, JSONL metrics (optionally mirrored to wandb / tensorboard) and loss-curve plots."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

from megatron_dual.config import ConfigError

__all__ = [
    "JSONLSink",
    "WandbSink",
    "TensorBoardSink",
    "Progress",
    "format_duration",
    "format_count",
    "read_metrics",
    "plot_metrics",
    "pyplot",
]


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def format_count(x: float) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.1f}{suffix}"
    return f"{x:.0f}"


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):  # tensors, numpy scalars
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the information as a string
    return v


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class JSONLSink:
    """One JSON object per step in ``path``.

    A fresh run (``resume_step == 0``) starts the file anew; a resumed run keeps the records up to ``resume_step``
    and drops later ones (they belong to the steps that are about to be redone), so the file always reads as one
    uninterrupted run. That rewrite is atomic (a temporary file, fsynced, renamed over the old one) and then
    appended to, so a kill at any point leaves either the old file or the new one. A failed write (a full disk)
    raises an OSError naming the file.
    """

    def __init__(self, path: str | Path, resume_step: int = 0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.path.parent.glob(f".{self.path.name}.tmp*"):  # left by a rewrite that was killed
            stale.unlink(missing_ok=True)
        mode = "w"
        if resume_step > 0 and self.path.is_file():
            self._rewrite(self._kept(resume_step))
            mode = "a"
        try:
            self._file: TextIO = open(self.path, mode)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.path)) from e

    def _kept(self, resume_step: int) -> list[str]:
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if isinstance(rec, dict) and int(rec.get("step", 0)) <= resume_step:
                kept.append(line)
        return kept

    def _rewrite(self, lines: list[str]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "w") as f:
                f.writelines(line + "\n" for line in lines)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OSError(e.errno, e.strerror, str(self.path)) from e

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        rec = {"step": int(step), "time": round(time.time(), 3)}
        rec.update({k: _jsonable(v) for k, v in metrics.items()})
        try:
            self._file.write(json.dumps(rec) + "\n")
            self._file.flush()
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.path)) from e

    def close(self) -> None:
        if not self._file.closed:
            try:
                self._file.close()
            except OSError:
                pass  # the write that failed was reported by log()


class WandbSink:
    """Numeric metrics to a wandb run (``mode`` offline by default; resumed runs continue the same run)."""

    def __init__(
        self,
        project: str,
        mode: str = "offline",
        directory: str | Path | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        try:
            import wandb
        except ImportError as e:
            raise ConfigError(
                "logging.wandb_project is set but wandb is not installed: pip install 'megatron-dual[wandb]'"
            ) from e
        self._run = wandb.init(
            project=project,
            mode=mode,
            dir=None if directory is None else str(directory),
            config=dict(config or {}),
            resume="allow",
        )

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._run.log(_numeric(metrics), step=step)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


class TensorBoardSink:
    """Numeric metrics as tensorboard scalars; a resumed run purges the events after ``resume_step``."""

    def __init__(self, directory: str | Path, resume_step: int = 0) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError(
                "logging.tensorboard is true but tensorboard is not installed: pip install 'megatron-dual[wandb]'"
            ) from e
        self._writer = SummaryWriter(str(directory), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        for k, v in _numeric(metrics).items():
            self._writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class Progress:
    """A tqdm bar on a terminal; plain lines every ``print_every`` steps otherwise (logs, CI, SLURM)."""

    ETA_WINDOW = 100  # steps the ETA's pace is measured over

    def __init__(
        self,
        total_steps: int,
        start_step: int = 0,
        print_every: int = 10,
        disable: bool = False,
        stream: TextIO | None = None,
    ) -> None:
        self.total = total_steps
        self.start_step = start_step
        self.print_every = max(1, print_every)
        self.disable = disable
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self._marks: deque[tuple[int, float]] = deque(maxlen=self.ETA_WINDOW + 1)  # (step, time) of recent updates
        self._bar = None
        if not disable and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, file=self.stream, unit="step", dynamic_ncols=True, smoothing=0.1
            )

    def eta(self, step: int) -> float:
        """Seconds to ``total`` at the pace of the last ``ETA_WINDOW`` steps. From the second update on, the time up
        to the first (start-up, the first step's compilation and warm-up) is left out, which would otherwise
        inflate the estimate for a long time."""
        if len(self._marks) >= 2 and self._marks[-1][0] > self._marks[0][0]:
            (s0, t0), (s1, t1) = self._marks[0], self._marks[-1]
            return (t1 - t0) / (s1 - s0) * (self.total - step)
        done = step - self.start_step
        if done <= 0:
            return float("nan")
        return (time.perf_counter() - self.t0) / done * (self.total - step)

    def describe(self, step: int, m: Mapping[str, Any]) -> str:
        parts = []
        for key, label in (("ar_loss", "ar"), ("md_loss", "md")):
            if key in m:
                parts.append(f"{label} {m[key]:.3f}")
        if "lr" in m:
            parts.append(f"lr {m['lr']:.2e}")
        if "tokens_per_s" in m:
            parts.append(f"{format_count(m['tokens_per_s'])} tok/s")
        if "mfu" in m:
            parts.append(f"mfu {100 * m['mfu']:.1f}%")
        return " | ".join(parts)

    def update(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self.disable:
            return
        self._marks.append((step, time.perf_counter()))
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix_str(self.describe(step, metrics), refresh=False)
            self._bar.refresh()
            return
        if step % self.print_every == 0 or step == self.total:
            pct = 100.0 * step / max(1, self.total)
            elapsed = time.perf_counter() - self.t0
            self.write(
                f"step {step}/{self.total} ({pct:.0f}%) | {self.describe(step, metrics)} | "
                f"elapsed {format_duration(elapsed)} | ETA {format_duration(self.eta(step))}"
            )

    def write(self, message: str) -> None:
        if self.disable:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics JSONL file; ValueError naming the file and line of a malformed one."""
    path = Path(path)
    out = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not a JSON object: {e.msg}") from e
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            out.append(rec)
    return out


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc, buf = [], 0.0, []
    for v in values:
        buf.append(v)
        acc += v
        if len(buf) > window:
            acc -= buf.pop(0)
        out.append(acc / len(buf))
    return out


def pyplot() -> Any:
    """matplotlib's ``pyplot`` drawing to files (the Agg backend, no screen needed). Where matplotlib is missing (a
    bare GPU image running the checkout from ``PYTHONPATH``), a ``ModuleNotFoundError`` that says so in one line."""
    try:
        import matplotlib
    except ImportError as e:
        raise ModuleNotFoundError("matplotlib is not installed (pip install matplotlib)", name="matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(
    jsonl: str | Path, png: str | Path, keys: Iterable[str] = ("ar_loss", "md_loss"), title: str = ""
) -> Path:
    """Training losses (raw and smoothed) against tokens seen, and validation losses of both objectives."""
    plt = pyplot()
    records = read_metrics(jsonl)
    if not records:
        raise ValueError(f"{jsonl} holds no metrics to plot")
    x_key = "tokens" if all("tokens" in r for r in records) else "step"
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    colours = {"ar": "tab:blue", "md": "tab:orange"}
    for key in keys:
        pts = [(r[x_key], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        colour = colours.get(key.split("_")[0])
        window = max(1, len(ys) // 20)
        ax_train.plot(xs, ys, alpha=0.25, color=colour)
        ax_train.plot(xs, _smooth(list(ys), window), color=colour, label=f"{key} (mean of {window})")
    ax_train.set_title("training loss")
    ax_val.set_title("validation loss")
    for obj in ("ar", "md"):
        pts = [(r[x_key], r[f"val_{obj}_loss"]) for r in records if isinstance(r.get(f"val_{obj}_loss"), (int, float))]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax_val.plot(xs, ys, marker="o", color=colours[obj], label=f"val {obj.upper()}")
    for ax in (ax_train, ax_val):
        ax.set_xlabel("tokens seen" if x_key == "tokens" else "step")
        ax.set_ylabel("loss (nats / token)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
