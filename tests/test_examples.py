"""The launch scripts of examples/ (torchrun, sbatch, the deepspeed launcher): each parses (``bash -n``), runs under
``set -euo pipefail``, and its preset and ``--set`` overrides load with ``load_config`` at the world size the script
implies (TP dividing it, alpha realisable on its DP ranks x grad_accum slots, every file it names present). The
scripts are run from the repository root, as they say."""

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from megatron_dual.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(
    [ROOT / "examples" / "torchrun-1node.sh", ROOT / "examples" / "deepspeed" / "launch.sh"]
    + list((ROOT / "examples" / "slurm").glob("*.sbatch"))
)


def _launch(path: Path) -> list[str]:
    """The words of the script's (last) command that starts megatron_dual.train, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [ln for ln in text.splitlines() if "megatron_dual.train" in ln and not ln.lstrip().startswith("#")]
    assert lines, f"{path.name}: no megatron_dual.train command"
    return shlex.split(lines[-1])


def _sbatch(path: Path, option: str) -> str | None:
    m = re.search(rf"^#SBATCH --{option}=(\S+)", path.read_text(), re.M)
    return m.group(1) if m else None


def _world(path: Path, words: list[str]) -> int:
    """The number of ranks the script launches."""
    if path.suffix == ".sbatch":
        return int(_sbatch(path, "nodes")) * int(_sbatch(path, "ntasks-per-node"))
    if words[0] == "torchrun":
        nodes = words[words.index("--nnodes") + 1] if "--nnodes" in words else "1"
        return int(nodes) * int(words[words.index("--nproc-per-node") + 1])
    assert words[0] == "deepspeed"
    hostfile = re.search(r"HOSTFILE=\$\{HOSTFILE:-(\S+)\}", path.read_text()).group(1)
    slots = re.findall(r"^\S+\s+slots=(\d+)", (ROOT / hostfile).read_text(), re.M)
    return sum(int(s) for s in slots)


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_and_is_strict(path):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    out = subprocess.run([bash, "-n", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "set -euo pipefail" in path.read_text()


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_overrides_load_at_the_scripts_world_size(path, monkeypatch):
    words = _launch(path)
    preset = words[words.index("--preset") + 1] if "--preset" in words else None
    sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    world = _world(path, words)
    for name in ("SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.chdir(ROOT)  # engine.deepspeed_config and the like are relative to the repository root
    cfg = load_config(None, sets, preset=preset)
    assert world % cfg.parallel.tp == 0


@pytest.mark.parametrize("path", sorted((ROOT / "examples" / "slurm").glob("*.sbatch")), ids=lambda p: p.name)
def test_srun_is_given_cpus_per_task(path):
    """Since Slurm 22.05 srun does not inherit --cpus-per-task from sbatch: without it each task gets one core."""
    assert _sbatch(path, "cpus-per-task")
    words = _launch(path)
    assert words[0] == "srun"
    assert "--cpus-per-task=$SLURM_CPUS_PER_TASK" in words[: words.index("python")]


@pytest.mark.parametrize("path", sorted((ROOT / "examples" / "slurm").glob("*.sbatch")), ids=lambda p: p.name)
def test_sbatch_output_directory_exists_or_is_made_before_submitting(path):
    """Slurm does not create the directory of --output: the job fails at once, with no log, unless it exists."""
    out_dir = Path(_sbatch(path, "output")).parent
    if str(out_dir) == "." or (ROOT / out_dir).is_dir():
        return
    assert f"mkdir -p {out_dir} && sbatch examples/slurm/{path.name}" in path.read_text()
    readme = (ROOT / "README.md").read_text()
    for name in re.findall(r"^(?!mkdir).*\bsbatch (examples/slurm/\S+)", readme, re.M):
        pytest.fail(f"README submits {name} without creating {out_dir}/ first")


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_no_export_of_a_command_substitution(path):
    """``export X=$(cmd)`` returns export's status, so set -e does not stop on a failing cmd (shellcheck SC2155):
    e.g. MASTER_ADDR would be exported empty and every rank wait for a rendezvous that cannot happen."""
    for ln in path.read_text().splitlines():
        assert not re.match(r"\s*(export|local|readonly|declare)\s+\w+=\$\(", ln), f"{path.name}: {ln}"


@pytest.mark.parametrize("path", sorted((ROOT / "examples" / "slurm").glob("*.sbatch")), ids=lambda p: p.name)
def test_sbatch_header_states_the_layout_it_runs(path, monkeypatch):
    """The header's "over N ranks x M slots" / ": N DP ranks x M slots" / ": N x M" is the DP size and
    train.grad_accum the script runs."""
    words = _launch(path)
    sets = dict(w.split("=", 1) for i, w in enumerate(words) if i and words[i - 1] == "--set")
    tp = int(sets.get("parallel.tp", 1))
    header = path.read_text().split("#SBATCH", 1)[0]
    m = re.search(r"(?:over|:) (\d+)(?: DP)?(?: ranks)? x (\d+)\b", header)
    assert m, f"{path.name}: the header does not state DP ranks x slots"
    assert (int(m.group(1)), int(m.group(2))) == (_world(path, words) // tp, int(sets["train.grad_accum"]))


def test_deepspeed_launch_refuses_a_missing_hostfile(tmp_path):
    """The deepspeed launcher warns and runs on the local GPUs when its hostfile is missing (a different world size,
    so a different global batch); launch.sh stops before calling it."""
    fake = tmp_path / "deepspeed"
    fake.write_text(f'#!/bin/bash\necho "$@" > {tmp_path}/called\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "HOSTFILE": str(tmp_path / "no_such_hostfile")}
    script = ROOT / "examples" / "deepspeed" / "launch.sh"
    out = subprocess.run(["bash", str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "no_such_hostfile" in out.stderr
    assert not (tmp_path / "called").exists()
    del env["HOSTFILE"]  # the default, examples/deepspeed/hostfile, from the repository root
    out = subprocess.run(["bash", str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "called").read_text().startswith("--hostfile examples/deepspeed/hostfile ")


@pytest.mark.parametrize("path", sorted((ROOT / "examples" / "slurm").glob("*.sbatch")), ids=lambda p: p.name)
def test_sbatch_rendezvous_port_differs_per_job(path):
    """A fixed 29500 made two jobs that share a node meet on one port; the port is derived from the job id (an
    exported MASTER_PORT still wins)."""
    line = next(ln for ln in path.read_text().splitlines() if ln.startswith("export MASTER_PORT="))
    ports = []
    for job in ("1234", "1235"):
        env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": job}
        r = subprocess.run(["bash", "-c", f"set -euo pipefail; {line}; echo $MASTER_PORT"], env=env, text=True,
                           capture_output=True, check=True)  # fmt: skip
        ports.append(int(r.stdout))
    assert ports[0] != ports[1] and all(1024 < p < 65536 for p in ports)
    env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "1", "MASTER_PORT": "31000"}
    r = subprocess.run(["bash", "-c", f"{line}; echo $MASTER_PORT"], env=env, text=True, capture_output=True)
    assert r.stdout.strip() == "31000"
