"""End to end: build docker/Dockerfile with podman on a local CPU base, run the lab in the image.

No registry is reachable on CI, so the base is made here (scripts/container_base.sh: debootstrap
bookworm + python3 + a wheelhouse with the pinned CPU torch wheel) and passed as BASE_IMAGE and
RUNTIME_IMAGE to the SAME Dockerfile the GPU image is built from, with TORCH_VARIANT=cpu.
The image is then run as its non-root user with a bind-mounted results directory; its lab losses
must be bit-identical to the venv's (same torch wheel, same CPU, same seeds) and every strategy
must match the single-device reference.

The podman settings are those that work on a VM like CI's (no user namespaces for nested builds):
`--isolation chroot` for RUN steps, runc with ulimits from a CONTAINERS_CONF file, overlay storage
with --root/--runroot of our own. Storage and the base are cached under PARTLAB_CACHE (default
/var/cache/partlab as root, else ~/.cache/partlab), keyed by the base recipe, so a second run
reuses the layers. Anything missing FAILS the test with the reason; nothing is skipped.
"""
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import partlab

pytestmark = pytest.mark.container

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "localhost/partlab:container-test"
# The fused op: the one part built in the image rather than taken from the torch wheel that the
# image and the venv share. tests/test_cli.py runs every strategy.
LAB_ONLY = ["--only", "tp-manual"]
STEPS = "3"
APT_PACKAGES = ["podman", "runc", "debootstrap", "fuse-overlayfs", "uidmap"]
TIMINGS = {}


def cache_dir():
    default = "/var/cache/partlab" if os.geteuid() == 0 else "~/.cache/partlab"
    path = Path(os.path.expanduser(os.environ.get("PARTLAB_CACHE", default)))
    path.mkdir(parents=True, exist_ok=True)
    return path


def run(cmd, timeout, what, **kw):
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""
        pytest.fail(f"{what}: timed out after {timeout} s; output tail:\n{out[-4000:]}")
    TIMINGS[what] = round(time.monotonic() - start, 1)
    if proc.returncode:
        pytest.fail(f"{what} failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n"
                    f"--- stdout tail ---\n{proc.stdout[-6000:]}\n"
                    f"--- stderr tail ---\n{proc.stderr[-6000:]}")
    return proc


def source_hash():
    """What the image is built from (partlab/, csrc/, setup.py): detects edits made while the
    test runs (a shared working tree), which would make image and venv differ legitimately."""
    h = hashlib.sha256()
    for path in sorted([*ROOT.glob("partlab/**/*.py"), *ROOT.glob("csrc/*"), ROOT / "setup.py"]):
        if path.is_file():
            h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def ensure_tools():
    missing = [t for t in ("podman", "runc", "debootstrap") if not shutil.which(t)]
    if not missing:
        return
    if os.geteuid() != 0:
        pytest.fail(f"{', '.join(missing)} not installed and not root to apt-get install them "
                    f"(apt-get install -y {' '.join(APT_PACKAGES)})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-qq"], 600, "apt-get update", env=env)
    run(["apt-get", "install", "-y", "-qq", *APT_PACKAGES], 900, "apt-get install podman",
        env=env)


@pytest.fixture(scope="module", autouse=True)
def record_timings():
    """Durations (and the image size) of every step, kept next to the cache even on failure."""
    start = time.monotonic()
    yield
    TIMINGS["total"] = round(time.monotonic() - start, 1)
    (cache_dir() / "last-container-test.json").write_text(json.dumps(TIMINGS, indent=1))
    print("container test timings (s):", json.dumps(TIMINGS))


@pytest.fixture(scope="module")
def podman():
    """The podman command line (global flags included) and the environment it needs."""
    if sys.platform != "linux":
        pytest.fail("the container test needs Linux (podman, debootstrap)")
    ensure_tools()
    cache = cache_dir()
    conf = cache / "containers.conf"
    # crun fails here ("cgroups in hybrid mode not supported"); runc works with these ulimits.
    conf.write_text('[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]\n'
                    '[engine]\nruntime = "runc"\n')
    # podman records the runroot in its database: one runroot per storage root, kept stable.
    key = hashlib.sha256(str(cache).encode()).hexdigest()[:12]
    runroot = Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp") / f"partlab-podman-{key}"
    cmd = ["podman", "--root", str(cache / "storage"), "--runroot", str(runroot),
           "--storage-driver", "overlay"]
    env = dict(os.environ, CONTAINERS_CONF=str(conf), PARTLAB_CACHE=str(cache),
               PODMAN=" ".join(cmd), PYTHON=sys.executable)
    return cmd, env


@pytest.fixture(scope="module")
def image(podman):
    cmd, env = podman
    base = run(["bash", "scripts/container_base.sh"], 900, "local base image", cwd=ROOT,
               env=env).stdout.strip().splitlines()[-1]
    sources = source_hash()
    revision = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT).stdout.strip() or "unknown"
    run([*cmd, "build", "--format", "docker", "--isolation", "chroot", "--layers", "--pull=never",
         "-f", "docker/Dockerfile", "-t", IMAGE,
         "--build-arg", f"BASE_IMAGE={base}", "--build-arg", f"RUNTIME_IMAGE={base}",
         "--build-arg", "TORCH_VARIANT=cpu",
         "--build-arg", f"VERSION={partlab.__version__}", "--build-arg", f"REVISION={revision}",
         "--build-arg", f"CREATED={time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}",
         "."], 1500, "podman build (includes the in-image self-test)", cwd=ROOT, env=env)
    # Earlier builds of the image (untagged now) pile up in the cache; drop those not used for
    # three days (still-valid layers that go with them are rebuilt when next needed).
    subprocess.run([*cmd, "image", "prune", "-f", "--filter", "until=72h"], capture_output=True,
                   env=env, timeout=300)
    return {"ref": IMAGE, "revision": revision, "base": base, "sources": sources}


def test_image_metadata(podman, image):
    cmd, env = podman
    out = run([*cmd, "image", "inspect", image["ref"]], 60, "inspect", env=env).stdout
    info = json.loads(out)[0]
    config = info.get("Config") or {}
    assert config.get("User") == "1000:1000"
    labels = config.get("Labels") or info.get("Labels") or {}
    assert labels["org.opencontainers.image.version"] == partlab.__version__
    assert labels["org.opencontainers.image.revision"] == image["revision"]
    assert labels["org.opencontainers.image.base.name"] == image["base"]
    size_gib = info["Size"] / 2**30
    TIMINGS["image size GiB (CPU test image)"] = round(size_gib, 2)
    assert size_gib < 3, f"the CPU test image is {size_gib:.2f} GiB"


def test_lab_in_container_matches_venv(podman, image, tmp_path):
    cmd, env = podman
    results = tmp_path / "results"
    results.mkdir()
    if os.geteuid() == 0:
        os.chown(results, 1000, 1000)   # the image's user owns what it writes
    else:
        results.chmod(0o777)
    check = ("id -u; touch \"$TORCH_EXTENSIONS_DIR/w\" \"$TRITON_CACHE_DIR/w\" "
             "/workspace/results/.w && rm /workspace/results/.w && echo writable")
    run_flags = [*cmd, "run", "--rm", "--network", "none", "--shm-size", "1g",
                 "-v", f"{results}:/workspace/results"]
    out = run([*run_flags, image["ref"], "bash", "-c", check], 120, "podman run (user check)",
              env=env).stdout.split()
    assert out == ["1000", "writable"], out

    run([*run_flags, image["ref"], "partlab", "lab", "--out", "/workspace/results",
         "--steps", STEPS, *LAB_ONLY], 900, "partlab lab in the container", env=env)
    in_image = glob.glob(str(results / "lab-*.json"))
    assert len(in_image) == 1, f"expected one lab-*.json in the bind mount, got {in_image}"
    container = json.loads(Path(in_image[0]).read_text())

    venv_out = tmp_path / "venv"
    run([sys.executable, "-m", "partlab", "lab", "--out", str(venv_out), "--steps", STEPS,
         *LAB_ONLY], 900, "partlab lab in the venv", cwd=tmp_path)
    venv = json.loads(Path(glob.glob(str(venv_out / "lab-*.json"))[0]).read_text())

    assert container["failed"] == [] and venv["failed"] == []
    assert container["provenance"]["torch"] == venv["provenance"]["torch"]
    names = [r["name"] for r in container["runs"]]
    venv_runs = {r["name"]: r for r in venv["runs"]}
    if source_hash() == image["sources"]:
        assert names == list(venv_runs), "the image and the venv ran different strategies"
    else:   # someone edited partlab/ while the test ran: compare what both ran
        print("sources changed since the image was built: comparing the common strategies")
        names = [n for n in names if n in venv_runs]
        assert names, "no strategy in common between the image and the venv"
    for c, v in ((r, venv_runs[r["name"]]) for r in container["runs"] if r["name"] in names):
        assert c["ok"], f"{c['name']} in the container does not match the reference"
        # Same torch wheel, same CPU, same seeds, same process count: bit-identical.
        assert c["losses"] == v["losses"], (c["name"], c["losses"], v["losses"])
        assert c["reference_losses"] == v["reference_losses"], c["name"]
        assert c["max_abs_dparam"] == v["max_abs_dparam"], c["name"]


def _def_section(name):
    text = (ROOT / "docker" / "partlab.def").read_text()
    body, inside = [], False
    for line in text.splitlines():
        if line.startswith("%"):
            inside = line.split()[0] == f"%{name}"
            continue
        if inside:
            body.append(line)
    return "\n".join(body) + "\n"


def test_apptainer_sections_in_the_image(podman, image, tmp_path):
    """What Apptainer does with the image, without Apptainer (not packaged for Debian): an
    arbitrary uid, a read-only root, a HOME that is not /home/partlab, the .def's %environment
    sourced, then its %test body run by /bin/sh."""
    cmd, env = podman
    (tmp_path / "environment.sh").write_text(_def_section("environment"))
    (tmp_path / "test.sh").write_text(_def_section("test"))
    tmp_path.chmod(0o755)   # readable by the container's uid 4242
    out = run([*cmd, "run", "--rm", "--read-only", "--network", "none", "--user", "4242:4242",
               "--tmpfs", "/tmp/home", "-e", "HOME=/tmp/home",
               "-v", f"{tmp_path}:/def:ro", image["ref"], "/bin/sh", "-c",
               '. /def/environment.sh && echo "cache=$TORCH_EXTENSIONS_DIR" && sh /def/test.sh'],
              300, "apptainer-like %test", env=env).stdout
    assert "cache=/tmp/home/.cache/torch_extensions" in out, out
    assert "selftest: ok" in out and "GPU check: skipped" in out, out
