"""What every benchmark script here shares: where the repository is, QEMU's CPU model on this
project's nested KVM, and the release build of ferry and the test guest they run."""
import os, subprocess, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# QEMU's CPU model on this project's nested KVM (-cpu host fails there).
QEMU_CPU = "qemu64,-cx16,-xsave"
# A scratch path of its own, so that the release build neither waits for nor blocks debug builds.
SCRATCH = ["--scratch-path", os.path.join(ROOT, ".build-release")]


def build():
    """Builds ferry (release) and the test guest; returns both paths. Build output goes to stderr."""
    subprocess.run(["swift", "build", "-c", "release", "--product", "ferry"] + SCRATCH, cwd=ROOT, check=True,
                   stdout=sys.stderr)
    bin_path = subprocess.run(["swift", "build", "-c", "release", "--show-bin-path"] + SCRATCH, cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout.strip()
    guest = subprocess.run([os.path.join(ROOT, "scripts/build-test-guest")], check=True,
                           capture_output=True, text=True).stdout.strip()
    return os.path.join(bin_path, "ferry"), guest
