"""The Ray actor that holds one role's process on its node: a generator, or
one learner node's ranks (torchrun). The role itself is the same
`python -m stream_rl ...` process a user starts by hand; the actor reserves
its resources (Ray sets CUDA_VISIBLE_DEVICES for it), tells the driver where
it runs, and reports how the process ended. If the actor dies, the process
gets SIGTERM (`roles.start_role`'s parent-death signal)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from stream_rl.roles import died, start_role, stop_role
from stream_rl.transport import free_ports


class RoleHost:
    def __init__(self, role: str):
        self.role = role
        self.proc: subprocess.Popen | None = None
        self._log = None

    def node(self) -> dict:
        """Where this actor (and so its role) runs."""
        import ray

        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(), "hostname": socket.gethostname(),
                "gpus": [str(g) for g in ray.get_gpu_ids()], "cuda_visible_devices":
                os.environ.get("CUDA_VISIBLE_DEVICES")}

    def free_ports(self, n: int) -> list[int]:
        """`n` ports free on this node now, on every interface, from the
        band the roles pick theirs from (below the ephemeral range)."""
        for _ in range(20):
            ports = free_ports(n)
            if not self.taken(ports):
                return ports
        raise RuntimeError(f"no {n} free ports found on {socket.gethostname()}")

    def taken(self, ports: list[int]) -> list[int]:
        """Those of `ports` something on this node listens on. A port whose
        last holder just died is free: its closed connections (TIME_WAIT)
        do not stop a listener that sets SO_REUSEADDR, as ZMQ's do."""
        out = []
        for p in ports:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("", p))
                except OSError:
                    out.append(p)
        return out

    def sees(self, path: str) -> bool:
        """Whether `path` (a file the driver wrote) is visible here: the run
        directory is on a filesystem this node shares."""
        return Path(path).is_file()

    def start(self, args: list[str], log_path: str, cwd: str | None, env: dict[str, str]) -> int:
        """Start the role's process (again, after a loss); its pid."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"{self.role} is already running (pid {self.proc.pid})")
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        cwd = cwd if cwd and Path(cwd).is_dir() else None
        self.proc, self._log = start_role(args, Path(log_path), cwd=cwd, env=env)
        return self.proc.pid

    def watch(self, pid: int) -> str:
        """Wait for process `pid` to end; why it ended, with this node's
        address (the driver holds this call open as its liveness check)."""
        proc = self.proc
        if proc is None or proc.pid != pid:
            return f"{self.role} (pid {pid}) is no longer this actor's process"
        proc.wait()
        where = self.node()
        return died(f"{self.role} on node {where['ip']} ({where['hostname']}, Ray node {where['node_id'][:12]})",
                    proc, Path(self._log.name))

    def stop(self, timeout_s: float) -> int | None:
        """Wait up to `timeout_s` for the process (it was told to exit over
        its socket), then kill whatever of its session is left; its exit code."""
        if self.proc is None:
            return None
        stop_role(self.proc, lambda: None, timeout_s)
        self._log.close()
        return self.proc.returncode
