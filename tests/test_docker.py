"""What can be checked of the image without a Docker engine: the user setup on a base image whose
uid 1000 is taken (Ubuntu 24.04's `ubuntu`), the CPU build's requirements (no CUDA wheel, torch
from the CPU index at the locked version), and, by reading the Dockerfile, the base image and
uv's download cache in a build mount."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()

# Stand-ins for the account tools: they keep /etc/passwd and /etc/group as two small files and
# log each change, so the script runs as on a base image without touching this machine.
SHIM = """#!/bin/sh
db="$STATE"
echo "$(basename "$0") $*" >> "$db/log"
case "$(basename "$0")" in
  getent) grep -E "^[^:]*:[^:]*:$2:|^$2:" "$db/$1" || exit 2 ;;
  userdel) name=$(eval echo \\${$#}); sed -i "/^$name:/d" "$db/passwd"
           sed -i "/^$name:/d" "$db/group" ;;
  groupdel) grep -q "^$1:" "$db/group" || exit 6; sed -i "/^$1:/d" "$db/group" ;;
  groupadd) grep -q ":$2:" "$db/group" && exit 4; echo "$3:x:$2:" >> "$db/group" ;;
  useradd) uid=$3; grep -q ":x:$uid:" "$db/passwd" && exit 4
           echo "$(eval echo \\${$#}):x:$uid:$5::/home/app:/bin/sh" >> "$db/passwd" ;;
esac
"""


@pytest.mark.parametrize("base_users", [
    "ubuntu:x:1000:1000:Ubuntu:/home/ubuntu:/bin/bash\n",  # ubuntu:24.04 (and its CUDA images)
    "",  # debian, python:3.11-slim, ubuntu:22.04: uid 1000 is free
])
def test_the_app_user_gets_uid_1000_on_any_base(tmp_path: Path, base_users: str) -> None:
    state, bin_dir = tmp_path / "state", tmp_path / "bin"
    state.mkdir()
    bin_dir.mkdir()
    (state / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n" + base_users)
    (state / "group").write_text("root:x:0:\n" + ("ubuntu:x:1000:\n" if base_users else ""))
    for tool in ("getent", "userdel", "groupdel", "groupadd", "useradd"):
        (bin_dir / tool).write_text(SHIM)
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "STATE": str(state)}
    done = subprocess.run(["sh", str(ROOT / "deploy" / "app-user.sh")], env=env,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr + (state / "log").read_text()
    users = dict(line.split(":", 3)[:3:2] for line in (state / "passwd").read_text().split())
    assert users == {"root": "0", "app": "1000"}
    assert "app:x:1000:" in (state / "group").read_text()


def test_the_dockerfile_creates_its_user_through_the_script() -> None:
    assert "useradd" not in DOCKERFILE and "deploy/app-user.sh" in DOCKERFILE


def test_the_base_image_adds_no_second_cuda() -> None:
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", DOCKERFILE, re.M)
    assert base and base[1] == "ubuntu:24.04"
    assert "nvidia/cuda" not in DOCKERFILE.split("ARG BASE_IMAGE")[1]


def test_uv_downloads_are_cached_in_a_build_mount() -> None:
    runs = re.findall(r"^RUN (.*?)(?<!\\)\n", DOCKERFILE, re.M | re.S)
    with_uv = [run for run in runs if re.search(r"\buv (sync|pip)", run)]
    assert len(with_uv) == 2
    for run in with_uv:
        assert "--mount=type=cache,target=/home/app/.cache/uv,uid=1000" in run
    assert "UV_CACHE_DIR=/home/app/.cache/uv" in DOCKERFILE and "UV_LINK_MODE=copy" in DOCKERFILE


def _uv() -> str:
    found = shutil.which("uv") or str(ROOT / ".cache" / "bootstrap" / "bin" / "uv")
    if not Path(found).is_file():
        pytest.skip("uv is not installed (make installs it)")
    return found


def test_the_cpu_build_installs_no_cuda_wheel_and_the_locked_torch() -> None:
    assert "ARG TORCH=cuda" in DOCKERFILE
    assert "ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu" in DOCKERFILE
    uv = _uv()
    env = {**os.environ, "PATH": f"{Path(uv).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["sh", "deploy/cpu-requirements.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True)
    names = {re.split(r"[=<>; ]", line)[0] for line in done.stdout.splitlines() if line}
    assert not {n for n in names if re.match(r"(torch|torchvision|triton|nvidia-)", n)}
    assert {"numpy", "mlflow", "dvc", "dvc-s3", "prefect", "onnxruntime"} <= names
    assert "pytest" not in names and "moto" not in names  # no dev or services group
    pyproject = (ROOT / "pyproject.toml").read_text()
    pins = dict(re.findall(r'"(torch|torchvision)==([^"]+)"', pyproject))
    assert done.stderr.split() == [f"torch=={pins['torch']}",
                                   f"torchvision=={pins['torchvision']}"]
    # the CPU build installs them as the +cpu builds of those versions
    assert "$(sed 's/$/+cpu/' /tmp/torch.txt)" in DOCKERFILE
