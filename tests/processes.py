"""The processes a test's command left running, found by what their command lines name (a local
Ray's by its RAY_TMPDIR: its gcs_server, raylet and agents)."""

from __future__ import annotations

from pathlib import Path


def processes_naming(text: str) -> list[str]:
    """Running processes (not zombies: those have ended) whose command line holds ``text``, as
    'pid command'."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(f"{proc.name} {cmdline[:120]}")
    return found


def ray_logs_dir() -> Path:
    """The log folder of the Ray instance this process is connected to (its workers' output):
    Ray has no public call for it."""
    import ray

    return Path(ray._private.worker._global_node.get_logs_dir_path())
