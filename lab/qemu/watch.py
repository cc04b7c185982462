#!/usr/bin/env python3
"""Runs the lab QEMU and watches that its guest stays alive.

Usage: watch.py LOG SILENCE_S -- QEMU-COMMAND...

Copies the serial console to LOG (CR stripped) and its `TERN-LAB ` lines to stderr. The guest's
/init prints a `TERN-LAB-HEARTBEAT` line every few seconds from a user-space loop; the in-guest
scenario timeouts cover a hung scenario, but not a guest whose kernel stops scheduling (seen once
in CI: QEMU TCG, a one-CPU L1 guest running nested KVM, silent for 1100 s). When no line at all
arrives for SILENCE_S seconds the guest counts as frozen: before QEMU is killed, the watchdog asks
the guest kernel for stacks (a serial break + SysRq l/w, which work if the kernel still takes
interrupts) and QEMU's monitor for the vCPU's registers and the code at its PC (which work even
when it does not), all into LOG. Exit status: QEMU's own, or 125 for a frozen guest.

Before that, at a third of SILENCE_S, the watchdog records the vCPU's state and sends one byte to
the guest's serial port. The hang seen in the lab (1 in ~11 boots of a Linux L2 guest under tern,
QEMU 7.2 TCG with nested SVM) is an L1 vCPU halted with interrupts on whose timer interrupt never
comes: QEMU idle, `HLT=1`. The serial interrupt wakes it and the guest goes on; that is reported
(`TERN-LAB-WATCHDOG woke`) so that it cannot hide, and scripts/lab prints it as a warning.
"""

import os
import re
import select
import socket
import subprocess
import sys
import tempfile
import time

FROZEN = 125


def monitor_query(path, commands):
    """Runs HMP commands on QEMU's monitor socket; returns their output (best effort)."""
    out = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(3)
            s.connect(path)
            for cmd in commands:
                s.sendall(cmd.encode() + b"\n")
                time.sleep(0.5)
                while True:
                    try:
                        chunk = s.recv(65536)
                    except socket.timeout:
                        break
                    if not chunk:
                        break
                    out.append(chunk.decode(errors="replace"))
                    if len(chunk) < 65536:
                        break
    except OSError as e:
        out.append(f"(monitor unavailable: {e})\n")
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", "".join(out).replace("\r", ""))
    # The monitor echoes each command a keystroke at a time; keep only what it answered.
    return "\n".join(l for l in text.splitlines() if not l.startswith("(qemu)"))


def main():
    if len(sys.argv) < 5 or sys.argv[3] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    log_path, silence_s, qemu = sys.argv[1], float(sys.argv[2]), sys.argv[4:]
    monitor_dir = tempfile.mkdtemp(prefix="tern-lab-mon-")
    monitor = os.path.join(monitor_dir, "monitor.sock")
    env = dict(os.environ, TERN_LAB_MONITOR=monitor)
    proc = subprocess.Popen(qemu, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    fd = proc.stdout.fileno()
    partial = b""
    last_line = time.monotonic()
    nudged = False
    with open(log_path, "w", encoding="utf-8", errors="replace") as log:

        def emit(raw):
            line = raw.decode(errors="replace").rstrip("\r")
            log.write(line + "\n")
            log.flush()
            if line.startswith("TERN-LAB "):
                print(line, file=sys.stderr, flush=True)

        def read_lines(timeout):
            """Emits the console lines that arrive within `timeout` s; None at QEMU's EOF."""
            nonlocal partial
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                return []
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            partial += chunk
            *lines, partial = partial.split(b"\n")
            for raw in lines:
                emit(raw)
            return lines

        while True:
            lines = read_lines(1.0)
            if lines is None:
                break
            if lines:
                # The nudge's own echo is an empty line, not a sign of life.
                if any(raw.strip() for raw in lines):
                    if nudged:
                        nudged = False
                        note = (
                            f"TERN-LAB-WATCHDOG woke: the guest went on after the nudge "
                            f"({time.monotonic() - last_line:.0f} s of silence)"
                        )
                        emit(note.encode())
                        print(f"lab: {note}", file=sys.stderr, flush=True)
                    last_line = time.monotonic()
                continue
            silent = time.monotonic() - last_line
            if silent >= silence_s / 3 and not nudged:
                nudged = True
                regs = monitor_query(monitor, ["info registers"])
                # The line "RIP=... RFL=... CPL=... HLT=0|1" says where it is and whether it halted.
                rip = [l.strip() for l in regs.splitlines() if l.startswith("RIP=")][:1]
                emit(
                    (
                        f"TERN-LAB-WATCHDOG no console line for {silent:.0f} s; vCPU "
                        f"{' '.join(rip) or '(state unknown)'}; sending the serial "
                        "port one byte to wake a vCPU that waits for a lost interrupt"
                    ).encode()
                )
                try:
                    proc.stdin.write(b"\n")
                    proc.stdin.flush()
                except OSError:
                    pass
                continue
            if silent < silence_s:
                continue
            note = (
                f"TERN-LAB-WATCHDOG guest frozen: no console line for {silent:.0f} s "
                "(not even the heartbeat); collecting diagnostics"
            )
            emit(note.encode())
            print(f"lab: {note}", file=sys.stderr, flush=True)
            # SysRq over the serial line: Ctrl-A b is QEMU's mux escape for a break.
            for key in (b"l", b"w"):
                try:
                    proc.stdin.write(b"\x01b" + key)
                    proc.stdin.flush()
                except OSError:
                    pass
                time.sleep(3)
            end = time.monotonic() + 2
            while time.monotonic() < end and read_lines(0.2) is not None:
                pass
            # Three register dumps a second apart tell a spinning vCPU from a halted one.
            regs = monitor_query(
                monitor,
                ["info cpus", "info registers", "x/12i $pc", "info registers", "info registers"],
            )
            for line in regs.splitlines():
                emit(f"TERN-LAB-WATCHDOG monitor: {line}".encode())
            proc.kill()
            proc.wait()
            return FROZEN
        if partial:
            emit(partial)
    return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
