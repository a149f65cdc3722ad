"""Install the BLiMP stand-in's data: BIG-bench's subject_verb_agreement JSON files, from the ``bigbench`` sdist.

``python -m megatron_dual.eval.fetch`` downloads ``bigbench==1.0.0`` from the package registry with pip and
extracts ``bigbench/benchmark_tasks/subject_verb_agreement/*.json`` (with the task's
``task.py``, whose header carries BIG-bench's Apache-2.0 licence, and the sdist's PKG-INFO) into
``<sys.prefix>/share/megatron_dual/bigbench/``, where :func:`megatron_dual.eval.tasks.bigbench_sva_root` finds
them. The package itself is never installed (it pins TensorFlow-era dependencies).

bigbench 1.0.0's files have since been removed from PyPI (pip lists only 0.0.1), so the download fails on a fresh
machine. ``make setup`` runs this with ``--optional``: a release the registry does not have is one line and exit
0 (without ``--optional``: the same line, exit 2), and the ``blimp_sva`` task stays unavailable; the generated
``agreement`` task needs no download. With a copy of the sdist, ``--tarball bigbench-1.0.0.tar.gz`` installs the
data; or point ``MEGATRON_DUAL_BIGBENCH_DATA`` at a folder holding ``subject_verb_agreement/*.json``. Any other
failure (no space left, a corrupt tarball) is one ``error:`` line and exit 1.

Why a pinned older pip: the sdist declares a dependency on ``bleurt @ file://...`` (a zip inside the sdist), and
pip >= 26 refuses to prepare any PyPI distribution declaring a direct-URL dependency, even for
``pip download --no-deps``. pip 25.0.1 still downloads it; it is fetched as a wheel with the current pip and run
from that wheel (``python pip.whl/pip ...``), so nothing in the environment changes.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path

from megatron_dual.eval.tasks import BIGBENCH_GONE, BIGBENCH_HOW

__all__ = ["default_dest", "extract_sva", "download_sdist", "main"]

BIGBENCH_SPEC = "bigbench==1.0.0"
OLD_PIP = "pip==25.0.1"
_TASK_DIR = "bigbench/benchmark_tasks/subject_verb_agreement/"


def default_dest() -> Path:
    return Path(sys.prefix) / "share" / "megatron_dual" / "bigbench"


def extract_sva(tarball: Path, dest: Path) -> int:
    """Extract the subject_verb_agreement JSON files (with task.py and PKG-INFO) of a bigbench sdist into ``dest``;
    returns the number of JSON files. Written to a temporary folder first and moved into place, so a partial run
    leaves none."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bigbench-", dir=dest.parent))
    n = 0
    try:
        (tmp / "subject_verb_agreement").mkdir()
        with tarfile.open(tarball, "r|gz") as tar:  # one streaming pass over the 358 MB archive
            for member in tar:
                name = member.name.split("/", 1)[-1]  # drop "bigbench-1.0.0/"
                if not member.isfile():
                    continue
                in_task_dir = name.startswith(_TASK_DIR) and "/" not in name[len(_TASK_DIR) :]
                if in_task_dir and (name.endswith(".json") or name.endswith("/task.py")):
                    target = tmp / "subject_verb_agreement" / Path(name).name
                elif name == "PKG-INFO":  # the sdist's metadata (version)
                    target = tmp / "PKG-INFO"
                else:
                    continue
                src = tar.extractfile(member)
                if src is None:
                    continue
                target.write_bytes(src.read())
                n += target.suffix == ".json"
        if n == 0:
            raise ValueError(f"{tarball}: no {_TASK_DIR}*.json inside; is it the bigbench 1.0.0 sdist?")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return n


def _pip(cmd: list[str]) -> None:
    """Run a pip command; its messages are kept (``CalledProcessError.stderr``) for :func:`_download_failure`."""
    subprocess.run(cmd, check=True, stderr=subprocess.PIPE, text=True)


def download_sdist(workdir: Path) -> Path:
    """``bigbench-1.0.0.tar.gz`` downloaded into ``workdir`` with pip (see the module docstring); a failed pip
    raises :class:`subprocess.CalledProcessError` with pip's stderr."""
    _pip([sys.executable, "-m", "pip", "download", "-q", "--no-deps", OLD_PIP, "-d", str(workdir)])
    wheel = next(workdir.glob("pip-*.whl"))
    download = ["download", "-q", "--no-deps", "--no-binary", ":all:", BIGBENCH_SPEC, "-d", str(workdir)]
    _pip([sys.executable, str(wheel / "pip"), *download])
    return next(workdir.glob("bigbench-*.tar.gz"))


_NOT_ON_INDEX = ("No matching distribution found", "Could not find a version that satisfies")


def _download_failure(e: subprocess.CalledProcessError) -> tuple[str, bool]:
    """(one line saying what failed, whether it is the registry not having the release)."""
    lines = [ln.strip() for ln in (e.stderr or "").splitlines() if ln.strip()]
    cmd = " ".join(str(c) for c in e.cmd) if isinstance(e.cmd, list | tuple) else str(e.cmd)
    spec = BIGBENCH_SPEC if BIGBENCH_SPEC in cmd else OLD_PIP
    versions = next((ln[ln.find("(from versions") + 1 : ln.rfind(")")] for ln in lines if "(from versions" in ln), "")
    if any(k in ln for ln in lines for k in _NOT_ON_INDEX):
        why = f"pip finds no {spec} on the package index ({versions or 'no versions listed'})"
        why += f": {BIGBENCH_GONE}" if spec == BIGBENCH_SPEC else " (the pip that can still download bigbench's sdist)"
        return f"BLiMP* (blimp_sva) data not installed: {why}; to enable the task anyway: {BIGBENCH_HOW}", True
    last = lines[-1] if lines else f"exit status {e.returncode}"
    return f"error: downloading {spec} failed: {last}", False


def _fetch(tarball: Path | None, dest: Path) -> int:
    """Download (unless ``tarball``) and extract; the number of JSON files. Extraction failures are OSError or
    ValueError with one line."""
    with tempfile.TemporaryDirectory(prefix="bigbench-dl-") as work:
        tarball = tarball or download_sdist(Path(work))
        try:
            return extract_sva(tarball, dest)
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise ValueError(f"{tarball}: not a readable .tar.gz ({type(e).__name__}: {e})") from e


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", type=Path, default=default_dest())
    ap.add_argument("--tarball", type=Path, help="an already downloaded bigbench-1.0.0.tar.gz")
    ap.add_argument("--force", action="store_true", help="extract again even when the data is there")
    ap.add_argument(
        "--optional",
        action="store_true",
        help="a release the registry no longer has is a note and exit 0 (make setup), not exit 2",
    )
    args = ap.parse_args(argv)
    if (args.dest / "subject_verb_agreement" / "simple_english.json").is_file() and not args.force:
        print(f"BIG-bench subject_verb_agreement data already in {args.dest}")
        return 0
    try:
        n = _fetch(args.tarball, args.dest)
    except subprocess.CalledProcessError as e:
        line, unavailable = _download_failure(e)
        print(line, file=sys.stderr)
        return (0 if args.optional else 2) if unavailable else 1
    except (OSError, ValueError) as e:
        print(f"error: BIG-bench subject_verb_agreement data not installed: {e}", file=sys.stderr)
        return 1
    print(f"BIG-bench subject_verb_agreement: {n} JSON files in {args.dest / 'subject_verb_agreement'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
