"""NNI's ``remote`` training service over SSH, against a throwaway sshd on 127.0.0.1 (slow, minutes).

``search_spaces/remote_example.yml`` runs a tiny digits experiment (3 trials) with ``reuseMode`` true
and false on this machine as its own "remote" worker: an OpenSSH server (Debian's ``openssh-server``)
listening on 127.0.0.1 only, with a host key, a client key and its config in a temporary directory.
The server gives every session a temporary HOME (``SetEnv``), so the worker's ``~/nni-experiments``
stays out of the real home, and that HOME's ``~/.bashrc`` puts a bogus ``python`` first on PATH the
way ``pyenv init`` or ``conda activate`` do: the example must still run the interpreter it names.
Every trial must succeed with a final metric, import the uploaded ``nni_elastic`` (with its ``data``
subpackage) and the upload NNI packs must be under 2 MB without ``.git``, ``runs`` or ``tests``.
Teardown stops the experiment (``nnictl stop``), whatever still runs with the temporary HOME
(NNI's trial keeper or runner), the server, and removes NNI's per-experiment directory in /tmp.

Skipped when ``sshd``/``ssh-keygen`` are not installed (``.ci/run`` installs ``openssh-server``).
"""
from __future__ import annotations

import getpass
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml

pytest.importorskip("nni")

from test_nni_pipelines import (  # noqa: E402  (tests/ is on sys.path: conftest.py)
    ROOT,
    TINY_SET,
    TRIAL_KEYS,
    Experiment,
    _final,
    _free_port,
)

EXAMPLE = ROOT / "search_spaces" / "remote_example.yml"
EXAMPLE_PYTHON = "/opt/nni-elastic/venv/bin/python"  # the interpreter the shipped example names
MAX_UPLOAD = 2 * 1024 * 1024


def _sshd() -> str | None:
    found = shutil.which("sshd") or "/usr/sbin/sshd"  # /usr/sbin is not on every user's PATH
    return found if os.access(found, os.X_OK) else None


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM if pytest dies before its teardown (killed, not interrupted)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Sshd:
    """An OpenSSH server on 127.0.0.1 for the current user, everything in one temporary directory."""

    def __init__(self, root: Path) -> None:
        self.root, self.user, self.port = root, getpass.getuser(), _free_port()
        self.home = root / "home"  # the worker's HOME: ~/.bashrc, ~/nni-experiments
        self.key = root / "client_key"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Sshd":
        self.home.mkdir(parents=True)
        for name in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "nni-elastic-test",
                            "-f", str(self.root / name)], check=True, capture_output=True)
        shutil.copy(self.root / "client_key.pub", self.root / "authorized_keys")
        # what pyenv/conda init lines do in a worker's ~/.bashrc: another python first on PATH
        bogus = self.home / "bogus-bin"
        bogus.mkdir()
        for name in ("python", "python3"):
            (bogus / name).write_text("#!/bin/sh\necho 'bogus python from ~/.bashrc' >&2\nexit 97\n")
            (bogus / name).chmod(0o755)
        (self.home / ".bashrc").write_text(f'export PATH="{bogus}:$PATH"\n')
        env = {"HOME": str(self.home),
               "OMP_NUM_THREADS": "1",  # trials share this machine's cores with the test
               "PIP_NO_INDEX": "1",  # NNI's non-reuse worker runs `pip install nni --upgrade`: no network, no change
               "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        (self.root / "sshd_config").write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.root / 'host_key'}",
            f"PidFile {self.root / 'sshd.pid'}", f"AuthorizedKeysFile {self.root / 'authorized_keys'}",
            "StrictModes no", "PubkeyAuthentication yes", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password", f"AllowUsers {self.user}",
            "UsePAM no", "X11Forwarding no", "Subsystem sftp internal-sftp",
            "SetEnv " + " ".join(f"{k}={v}" for k, v in env.items()), ""]))
        if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
            os.makedirs("/run/sshd", mode=0o755)  # sshd's privilege separation directory (systemd makes it)
        self.proc = subprocess.Popen([_sshd(), "-D", "-e", "-f", str(self.root / "sshd_config")],
                                     stdout=(self.root / "sshd.log").open("w"), stderr=subprocess.STDOUT,
                                     preexec_fn=_die_with_parent)
        end = time.monotonic() + 20
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {(self.root / 'sshd.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        probe = self.ssh('echo "$HOME"')
        assert probe.returncode == 0, probe.stderr + (self.root / "sshd.log").read_text()
        assert probe.stdout.strip() == str(self.home), probe.stdout
        # how NNI's non-reuse trial keeper starts a trial: /bin/bash -c, under an SSH session (SSH_CLIENT set,
        # SHLVL 0 after bash's exec of its last command). Debian/Ubuntu bash reads ~/.bashrc then.
        env = {**os.environ, "HOME": str(self.home), "SSH_CLIENT": "127.0.0.1 1 2", "SHLVL": "0",
               "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        shell = subprocess.run(["/bin/bash", "-c", "command -v python"], env=env, capture_output=True, text=True)
        self.trial_shell_reads_bashrc = shell.stdout.strip() == str(bogus / "python")
        return self

    def ssh(self, command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ssh", "-p", str(self.port), "-i", str(self.key), "-o", "BatchMode=yes",
                               "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                               "-o", "LogLevel=ERROR", f"{self.user}@127.0.0.1", command],
                              capture_output=True, text=True, timeout=60)

    def kill_sessions(self) -> list[int]:
        """End what still runs with the worker's HOME (only sshd sessions have it): trial keepers, runners, trials."""
        marker = f"HOME={self.home}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if marker in (entry / "environ").read_bytes().split(b"\0"):
                        found.append(int(entry.name))
                except OSError:
                    continue
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in found:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            if sig == signal.SIGTERM and found:
                time.sleep(2)
        return found

    def stop(self) -> None:
        self.kill_sessions()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    if _sshd() is None or not shutil.which("ssh-keygen") or not shutil.which("ssh"):
        pytest.skip("needs OpenSSH's sshd, ssh and ssh-keygen (Debian: apt-get install openssh-server)")
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    try:
        yield server.start()
    finally:
        server.stop()


def _remote_config(server: Sshd, tmp_path: Path, reuse: bool) -> dict:
    """The shipped example, pointed at the local sshd and made tiny: 3 trials, one at a time."""
    config = yaml.safe_load(EXAMPLE.read_text())
    command = config["trialCommand"]
    assert command.startswith(EXAMPLE_PYTHON + " -m "), command  # by absolute path, not `python`
    # what the trial's shell finds as `python` (the bogus one where ~/.bashrc was read) and where the
    # interpreter the example names imports nni_elastic from (the uploaded code directory)
    probe = (f"{shlex.quote(sys.executable)} -c 'import importlib.util as u; print(u.find_spec(\"nni_elastic\").origin)'"
             ' > "$NNI_OUTPUT_DIR/imported_from"; command -v python > "$NNI_OUTPUT_DIR/python_on_path"; ')
    config["trialCommand"] = (probe + command.replace(EXAMPLE_PYTHON, shlex.quote(sys.executable), 1)
                              + "".join(f" --set {item}" for item in TINY_SET))
    config["searchSpaceFile"] = str(ROOT / "search_spaces" / config["searchSpaceFile"])
    config["trialCodeDirectory"] = str(ROOT)
    config["tuner"]["codeDirectory"] = str(ROOT)
    config["tuner"]["classArgs"].update(storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="remote",
                                        sampler_kwargs={"n_startup_trials": 2})
    config.update(experimentName=f"remote_reuse_{str(reuse).lower()}", nniManagerIp="127.0.0.1",
                  experimentWorkingDirectory=str(tmp_path / "nni-experiments"), trialConcurrency=1,
                  maxTrialNumber=3, maxExperimentDuration="15m")
    config["trainingService"].update(reuseMode=reuse, machineList=[{
        "host": "127.0.0.1", "port": server.port, "user": server.user, "sshKeyFile": str(server.key),
        "pythonPath": str(Path(sys.executable).parent)}])
    return config


def _uploads(*roots: Path) -> list[Path]:
    """The code tarballs NNI packed and copied to the worker."""
    return sorted({p for root in roots if root.is_dir() for pattern in ("*.tgz", "*.tar.gz") for p in root.rglob(pattern)
                   if "nni_trial_tool" not in p.name})


def _trial_id(path: Path) -> str:
    """The trial of a file in a trial's output directory: .../trials/<id>/[nnioutput/]<file>."""
    return path.parts[len(path.parts) - 1 - path.parts[::-1].index("trials") + 1]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "no-reuse"])
def test_remote_example_runs_over_ssh(sshd: Sshd, tmp_path: Path, reuse: bool) -> None:
    config = _remote_config(sshd, tmp_path, reuse)
    exp = Experiment(config, tmp_path)
    remote_tmp, made_tmp_root = None, not Path("/tmp/nni-experiments").exists()
    try:
        with exp:
            remote_tmp = Path("/tmp/nni-experiments") / str(exp.id)  # reuse mode's worker directory
            trials = exp.wait(timeout=780)
        worker_roots = [sshd.home / "nni-experiments" / str(exp.id), remote_tmp]
        uploads = _uploads(*worker_roots)
        outputs = {_trial_id(p): p.parent for root in worker_roots if root.is_dir()
                   for p in root.rglob("python_on_path")}
        print(f"\nreuseMode={reuse}: " + ", ".join(f"{t['trialJobId']} {t['status']}" for t in trials)
              + " | uploads: " + ", ".join(f"{p.name} {p.stat().st_size} B" for p in uploads)
              + f" | `python` in the trial's shell (bashrc read: {sshd.trial_shell_reads_bashrc}): " + ", ".join(
                  sorted({(out / "python_on_path").read_text().strip() for out in outputs.values()})))
        assert len(trials) == 3 and {t["status"] for t in trials} == {"SUCCEEDED"}, (
            trials, {k: (v / "trial.stderr").read_text()[-2000:] for k, v in outputs.items()
                     if (v / "trial.stderr").is_file()})
        for t in trials:
            metric = _final(t)
            assert metric is not None and TRIAL_KEYS | {"parameter_id"} <= set(metric), metric
        assert sorted(outputs) == sorted(t["trialJobId"] for t in trials), outputs
        for out in outputs.values():
            origin = Path((out / "imported_from").read_text().strip())
            assert ROOT not in origin.parents, origin  # the uploaded copy, not the working tree
            assert (origin.parent / "data" / "__init__.py").is_file(), origin
            assert json.loads((out / "metrics.json").read_text())["metric"]["default"] > 0
        if not reuse and sshd.trial_shell_reads_bashrc:  # plain `python` would have been the bogus one
            assert {(out / "python_on_path").read_text().strip() for out in outputs.values()} == {
                str(sshd.home / "bogus-bin" / "python")}
        assert uploads, f"no code tarball under {worker_roots}"
        for upload in uploads:
            assert upload.stat().st_size < MAX_UPLOAD, f"{upload}: {upload.stat().st_size} bytes"
            with tarfile.open(upload) as tar:
                names = {n.lstrip("./") for n in tar.getnames()}
            assert "nni_elastic/data/__init__.py" in names and "strategies/prune_and_grow/digits.yaml" in names
            assert not {n.split("/")[0] for n in names} & {".git", "runs", "tests", "benchmarks", "nni_elastic.egg-info"}
    finally:
        sshd.kill_sessions()
        if remote_tmp is not None and remote_tmp.is_dir():
            shutil.rmtree(remote_tmp, ignore_errors=True)
        if made_tmp_root:
            try:
                Path("/tmp/nni-experiments").rmdir()  # only when this test made it and left it empty
            except OSError:
                pass
