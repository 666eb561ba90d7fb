"""The reaper: stops a pool-started Ray when the process that started it dies without shutting it down.

Ray ties gcs_server and raylet to the driver's life, but its Python agents (ray::DashboardAgent,
ray::RuntimeEnvAgent) outlive a driver killed by SIGKILL (a kernel restart that had to force it, the OOM killer).
So when a pool starts Ray it also starts `python -m toolkit.pool.reaper <pid>`, in a session of its own: it notes
the driver's Ray processes every POLL_S, and once the driver is gone kills the ones it noted (same pid and start
time, so never a stranger that reused a pid). A clean shutdown terminates the reaper after ray.shutdown().
Imports only psutil.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import psutil

POLL_S = 0.5


def is_ray(proc: psutil.Process) -> bool:
    name, cmd = proc.name(), " ".join(proc.cmdline())
    return name in ("gcs_server", "raylet") or cmd.startswith("ray::") or f"{os.sep}ray{os.sep}" in cmd


def ray_descendants(driver: psutil.Process) -> dict[int, float]:
    """pid -> create_time of the driver's Ray processes, at any depth."""
    found = {}
    for proc in driver.children(recursive=True):
        try:
            if proc.pid != os.getpid() and is_ray(proc):
                found[proc.pid] = proc.create_time()
        except psutil.Error:
            continue
    return found


def kill(noted: dict[int, float]) -> None:
    victims = []
    for pid, created in noted.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == created:
                proc.kill()
                victims.append(proc)
        except psutil.Error:
            continue
    psutil.wait_procs(victims, timeout=5)


def watch(driver_pid: int) -> None:
    try:
        driver = psutil.Process(driver_pid)
    except psutil.Error:
        return
    noted: dict[int, float] = {}
    while True:
        try:
            if not driver.is_running() or driver.status() == psutil.STATUS_ZOMBIE:
                break
            noted = {pid: t for pid, t in noted.items() if psutil.pid_exists(pid)}
            noted.update(ray_descendants(driver))  # kept once seen: raylet's children lose their parent first
        except psutil.Error:
            break
        time.sleep(POLL_S)
    kill(noted)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C meant for the notebook or terminal is not for us
    watch(int(sys.argv[1]))


if __name__ == "__main__":
    main()
