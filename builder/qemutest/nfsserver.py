"""A throwaway NFS server (NFS-Ganesha, v3 and v4) that `qemu-test --target nfs` dumps into.

It runs in a network namespace of its own, where the only interface is loopback: its
rpcbind and ganesha listen on the standard ports there (so the guest mounts the way a real
client would, v3 through rpcbind and mountd) without touching the host's ports, and nothing
in it can reach any other address. QEMU joins that namespace, and its user-mode network shows
the namespace's 127.0.0.1 to the guest as 10.0.2.2. A private /run keeps rpcbind's socket
and lock file apart from the host's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.qemutest.sshd import stop_process

GANESHA = Path("/usr/bin/ganesha.nfsd")
RPCBIND = Path("/usr/sbin/rpcbind")
RPC_NFS, RPC_MOUNT = "100003", "100005"

# No Bind_addr: loopback is the namespace's only interface (and getaddrinfo's AI_ADDRCONFIG
# rejects 127.0.0.1 there). Pseudo = Path: the same server:/path mounts with v3 and v4.
# Graceless: a fresh server would otherwise refuse new files for its 90 s grace period.
GANESHA_CONF = """\
NFS_CORE_PARAM {{
  Protocols = {protocols};
  Enable_NLM = false;
  Enable_RQUOTA = false;
  Enable_UDP = false;
}}
NFS_KRB5 {{ Active_krb5 = false; }}
NFSV4 {{
  Graceless = true;
  RecoveryBackend = fs;
  RecoveryRoot = "{recovery}";
}}
EXPORT {{
  Export_Id = 1;
  Path = "{export}";
  Pseudo = "{export}";
  Access_Type = RW;
  Squash = No_Root_Squash;
  Protocols = {protocols};
  Transports = TCP;
  SecType = sys;
  FSAL {{ Name = VFS; }}
}}
LOG {{ Default_Log_Level = EVENT; }}
"""


@dataclass
class TestNfsServer:
    """NFS-Ganesha exporting `directory`/export read-write, root not squashed."""

    directory: Path
    protocols: str = "3, 4"  # NFS versions offered
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    __test__ = False  # not a pytest class

    @property
    def export(self) -> Path:
        return self.directory / "export"

    @property
    def log(self) -> Path:
        return self.directory / "ganesha.log"

    def netns(self) -> tuple[str, ...]:
        """The command prefix that runs a program in the server's network namespace."""
        if not self.processes:
            raise KdumpError("the test NFS server is not running")
        return ("nsenter", f"--net=/proc/{self.processes[0].pid}/ns/net", "--")

    def _inside(self, *command: str, log: Path | None = None) -> subprocess.Popen[bytes]:
        pid = self.processes[0].pid
        out = log.open("ab") if log else subprocess.DEVNULL
        proc = subprocess.Popen(
            ["nsenter", f"--net=/proc/{pid}/ns/net", f"--mount=/proc/{pid}/ns/mnt", "--",
             *command],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out,
        )  # fmt: skip
        self.processes.append(proc)
        return proc

    def start(self) -> TestNfsServer:
        for program, package in ((GANESHA, "nfs-ganesha nfs-ganesha-vfs"), (RPCBIND, "rpcbind")):
            if not program.is_file():
                raise KdumpError(f"{program} not found (Debian: apt-get install {package})")
        if os.geteuid() != 0 or shutil.which("unshare") is None:
            raise KdumpError(
                "the test NFS server runs in a network namespace of its own, which needs root"
            )
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.export.mkdir(exist_ok=True)
        (self.directory / "recovery").mkdir(exist_ok=True)
        conf = self.directory / "ganesha.conf"
        conf.write_text(
            GANESHA_CONF.format(
                export=self.export, recovery=self.directory / "recovery", protocols=self.protocols
            )
        )
        holder = subprocess.Popen(
            ["unshare", "--net", "--mount", "--propagation", "private", "--", "sh", "-c",
             "mount -t tmpfs -o mode=0755 tmpfs /run && ip link set lo up && echo ready"
             " && exec sleep infinity"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        self.processes.append(holder)
        assert holder.stdout is not None
        if holder.stdout.readline().strip() != b"ready":
            error = holder.stderr.read().decode(errors="replace") if holder.stderr else ""
            self.stop()
            raise KdumpError(f"cannot make a network namespace for the NFS server: {error}")
        self._inside(str(RPCBIND), "-f", log=self.directory / "rpcbind.log")
        if not self._wait_for_programs({"100000"}, 10):
            return self._failed("rpcbind")
        self._inside(str(GANESHA), "-F", "-f", str(conf), "-L", str(self.log),
                     "-p", "/run/ganesha.pid")  # fmt: skip
        if not self._wait_for_programs(
            {RPC_NFS} | ({RPC_MOUNT} if "3" in self.protocols else set()), 30
        ):
            return self._failed("ganesha")
        return self

    def _registered(self) -> set[str]:
        proc = subprocess.run([*self.netns(), "rpcinfo", "-p", "127.0.0.1"],
                              capture_output=True, text=True)  # fmt: skip
        return {line.split()[0] for line in proc.stdout.splitlines()[1:] if line.split()}

    def _wait_for_programs(self, programs: set[str], seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.processes):
                return False
            if programs <= self._registered():
                return True
            time.sleep(0.2)
        return False

    def _failed(self, what: str) -> TestNfsServer:
        self.stop()
        tail = self.log.read_text(errors="replace")[-800:] if self.log.exists() else ""
        raise KdumpError(f"the test NFS server ({what}) did not start; {self.log}:\n{tail}")

    def stop_serving(self) -> None:
        """Stop rpcbind and ganesha but keep the namespace: clients are then refused."""
        holder, *servers = self.processes
        for proc in reversed(servers):
            stop_process(proc)
        self.processes = [holder]

    def stop(self) -> None:
        # The servers first, the namespace holder last: the namespace dies with it.
        for proc in reversed(self.processes):
            stop_process(proc)
        self.processes = []

    def __enter__(self) -> TestNfsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
