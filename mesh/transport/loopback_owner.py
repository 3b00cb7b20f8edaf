"""Which process opened a loopback connection, as the kernel tells it (Linux).

Loopback is not a trust boundary: every local process, of every user, can connect to a port on
127.0.0.1. A tunnel listener must carry only the connections its engine opens, so on accepting
one it asks the kernel whose socket the far end is: the connection's row in /proc/net/tcp names
the socket's inode, and /proc/<pid>/fd of the allowed processes shows whether one of them holds
it. Where /proc is not there (other systems) every connection is accepted, and said once.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Collection
from pathlib import Path

_MAX_TABLE_BYTES = 64 * 1024 * 1024
_PROC = Path("/proc")


def kernel_can_tell() -> bool:
    return (_PROC / "net" / "tcp").exists()


def connection_inode(table: str, local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """The inode of the socket whose local end is `local` and far end `remote`, in the text of
    /proc/net/tcp or tcp6 (None if no row matches)."""
    wanted = (_hex_endpoint(*local), _hex_endpoint(*remote))
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        if (fields[1].upper(), fields[2].upper()) == wanted:
            try:
                return int(fields[9])
            except ValueError:
                return None
    return None


def _hex_endpoint(host: str, port: int) -> str:
    """An address as /proc/net/tcp writes it: the address's bytes in host order per 32-bit
    word, then the port, both in hex."""
    packed = ipaddress.ip_address(host).packed
    words = [packed[i : i + 4] for i in range(0, len(packed), 4)]
    text = "".join(f"{int.from_bytes(word, sys.byteorder):08X}" for word in words)
    return f"{text}:{port:04X}"


def opened_by(peer: tuple[str, int], listener: tuple[str, int], pids: Collection[int]) -> bool:
    """Whether the connection from `peer` to our `listener` was opened by one of `pids`."""
    family = "tcp6" if ":" in peer[0] else "tcp"
    try:
        with (_PROC / "net" / family).open() as file:
            table = file.read(_MAX_TABLE_BYTES)
    except OSError:
        return False
    inode = connection_inode(table, peer, listener)
    if inode is None:
        return False
    target = f"socket:[{inode}]"
    return any(_holds(pid, target) for pid in pids)


def _holds(pid: int, target: str) -> bool:
    fd_dir = _PROC / str(pid) / "fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return False
    for name in names:
        try:
            if os.readlink(fd_dir / name) == target:
                return True
        except OSError:
            continue
    return False
