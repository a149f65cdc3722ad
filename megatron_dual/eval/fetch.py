"""Install the BLiMP stand-in's data: BIG-bench's subject_verb_agreement JSON files, from the ``bigbench`` sdist.

``python -m megatron_dual.eval.fetch`` (run by ``make setup``) downloads ``bigbench==1.0.0`` from the package
registry with pip and extracts ``bigbench/benchmark_tasks/subject_verb_agreement/*.json`` (with the task's
``task.py``, whose header carries BIG-bench's Apache-2.0 licence, and the sdist's PKG-INFO) into
``<sys.prefix>/share/megatron_dual/bigbench/``, where :func:`megatron_dual.eval.tasks.bigbench_sva_root` finds
them. The package itself is never installed (it pins TensorFlow-era dependencies).

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
from pathlib import Path

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


def download_sdist(workdir: Path) -> Path:
    """``bigbench-1.0.0.tar.gz`` downloaded into ``workdir`` with pip (see the module docstring)."""
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "download", "-q", "--no-deps", OLD_PIP, "-d", str(workdir)], check=True)
    wheel = next(workdir.glob("pip-*.whl"))
    subprocess.run(
        [
            sys.executable,
            str(wheel / "pip"),
            "download",
            "-q",
            "--no-deps",
            "--no-binary",
            ":all:",
            BIGBENCH_SPEC,
            "-d",
            str(workdir),
        ],
        check=True,
    )
    return next(workdir.glob("bigbench-*.tar.gz"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", type=Path, default=default_dest())
    ap.add_argument("--tarball", type=Path, help="an already downloaded bigbench-1.0.0.tar.gz")
    ap.add_argument("--force", action="store_true", help="extract again even when the data is there")
    args = ap.parse_args(argv)
    if (args.dest / "subject_verb_agreement" / "simple_english.json").is_file() and not args.force:
        print(f"BIG-bench subject_verb_agreement data already in {args.dest}")
        return 0
    with tempfile.TemporaryDirectory(prefix="bigbench-dl-") as work:
        tarball = args.tarball or download_sdist(Path(work))
        n = extract_sva(tarball, args.dest)
    print(f"BIG-bench subject_verb_agreement: {n} JSON files in {args.dest / 'subject_verb_agreement'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
