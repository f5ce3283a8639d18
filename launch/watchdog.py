"""A hang watchdog on every rank: a hang named in minutes, not at the collective's timeout.

The train loop tells the watchdog each phase it enters (data, forward/backward, optimizer,
metrics, save); that costs an attribute write. A thread beats: every `beat_s` it writes the
rank's heartbeat (tessera.launch.faults) and checks two things:
- its own rank made no progress for `hang_timeout_s` (10x that in the first step, which may
  compile, and in the first save; a later save may take 3x the longest before it);
- another rank already declared a hang in this launch (a claim file).
Either way the rank writes the Python stacks of all its threads to
run.dir/hangs/<time>/rank-NNNNN.txt (and torch's Flight Recorder trace, NCCL's or gloo's, to
flight-recorder/ there) and exits with HANG_EXIT_CODE, which the restart loops relaunch. The rank
that declared the hang waits a beat for the others, reads every heartbeat and prints the one line
that names who stopped: a rank whose heartbeat went stale (stopped or frozen, e.g. SIGSTOP or a
stuck driver call holding the interpreter) or a rank behind the others (a live rank stuck in its
own phase, e.g. a data read), and the collective the declaring rank waits in. Its hosts get a
strike.
The thread needs nothing from the process group: a rank blocked in a collective releases the
interpreter, so its watchdog still runs.
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import os
import pickle
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from tessera.launch import faults
from tessera.launch.faults import FATAL, HANG, PEER_FAILED, Heartbeat

SLOW_PHASE_FACTOR = 10  # the first step and saves may take this many times hang_timeout_s
PHASES = ("start-up", "data", "forward/backward", "optimizer", "metrics", "save")
CLAIM_FILE = "hang"  # in the launch's heartbeat directory: names the hang's directory
FAILED_FILE = "failed"  # in the launch's heartbeat directory: the first rank that failed
# After a peer's failure, how long a rank waits for its own failure before it leaves: an error
# every rank meets at once (a non-finite loss, a data error) is then said by each, exit code 2,
# rather than cut short by the first one's file
OWN_FAILURE_GRACE_S = 2.0
# How long a rank's error waits for rank 0's: an error every rank meets is printed once, by rank 0
SAME_ERROR_WAIT_S = 1.0
FLIGHT_RECORDER_DIR = "flight-recorder"  # in a hang's directory: one trace per rank
FILE_OPS_PER_S = 2000  # on run.dir, by the watchdogs of all ranks together
_made = 0  # watchdogs made in this process (a test may train several times in one launch)


class Watchdog:
    def __init__(self, run_dir: str | Path, rank: int, world_size: int, timeout_s: float):
        global _made
        _made += 1
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.directory = faults.launch_dir(run_dir, faults.launch_id(), _made)
        self.beat_s, self.poll_s = watch_intervals(timeout_s, world_size)
        self.beat = Heartbeat.start(rank, 0)  # step 0: before the first step
        self._progressed = time.monotonic()
        self._allowance_s = timeout_s * SLOW_PHASE_FACTOR  # start-up and the first step
        self._step_slow = True  # the step held a start-up or a save: its time is no measure
        self._longest_save_s: float | None = None
        self._step_started = self._progressed
        self._warned = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tessera-watchdog", daemon=True)
        self._signals = SignalWatch.in_main_thread()

    def start(self) -> Watchdog:
        faults.write_heartbeat(self.directory, self.beat)
        self._thread.start()
        return self

    def phase(self, step: int, name: str) -> None:
        """The loop entered phase `name` of step `step` (the step being worked on)."""
        now = time.monotonic()
        if self.beat.phase == "save":  # a save ended
            self._longest_save_s = max(self._longest_save_s or 0.0, now - self._progressed)
        if name == "data" and step != self.beat.step:  # the previous step is done
            if not self._step_slow:
                self._check_timeout_fits(now - self._step_started)
            self._step_started = now
            self._step_slow = self.beat.phase == "start-up"  # the first step may compile
            self._allowance_s = self.timeout_s * (SLOW_PHASE_FACTOR if self._step_slow else 1)
        if name == "save":
            self._step_slow = True
            self._allowance_s = self._save_allowance_s()
        self.beat.step, self.beat.phase = step, name
        self.beat.progressed_at = time.time()
        self._progressed = now

    def _check_timeout_fits(self, step_s: float) -> None:
        """One warning, naming the key, when a plain step took half the timeout or more."""
        if self.timeout_s and step_s * 2 > self.timeout_s and not self._warned and self.rank == 0:
            self._warned = True
            print(f"tessera: warning: config key 'resilience.hang_timeout_s': a step took "
                  f"{step_s:.1f} s, more than half of {self.timeout_s:g} s; a slower step would "
                  f"be taken for a hang: raise it", file=sys.stderr, flush=True)

    def fail(self, error: BaseException, fatal: bool) -> bool:
        """This rank stops on `error`: its peers stop too, in seconds, rather than wait for it in
        a collective (or at start-up) until a timeout. `fatal`: a restart would fail alike.
        Returns whether rank 0 stopped on the same error, and so says it for the job: a data
        error met by 512 ranks is then one line on the console, not 512."""
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        self.beat.error = first_line
        with contextlib.suppress(OSError):
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.directory / FAILED_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            with os.fdopen(fd, "w") as f:
                f.write(f"rank {self.rank} on {self.beat.host}: {first_line}")
        self.close(FATAL if fatal else faults.ERROR)
        return self.rank != 0 and self._rank_0_error(SAME_ERROR_WAIT_S) == first_line

    def _rank_0_error(self, wait_s: float) -> str | None:
        """The error rank 0 stopped on, once its heartbeat says (None if not within wait_s)."""
        deadline = time.monotonic() + wait_s
        while True:
            beat = faults.read_heartbeat(faults.heartbeat_path(self.directory, 0))
            if beat is not None and beat.error is not None:
                return beat.error
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)

    def close(self, ended: str) -> None:
        """Stop the thread; the last heartbeat says how the rank ended."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._signals is not None:
            self._signals.close()
            self._signals = None
        self.beat.ended = ended
        with contextlib.suppress(OSError):
            faults.write_heartbeat(self.directory, self._stamped())

    # -----------------------------------------------------------------------------------------

    def _stamped(self) -> Heartbeat:
        self.beat.beat_at = time.time()
        return self.beat

    def _run(self) -> None:
        last_beat = time.monotonic()
        while not self._stop.wait(self.poll_s):
            if self._terminated_now():
                with contextlib.suppress(OSError):
                    faults.write_heartbeat(self.directory, self._stamped())
            if time.monotonic() - last_beat >= self.beat_s:
                last_beat = time.monotonic()
                with contextlib.suppress(OSError):
                    faults.write_heartbeat(self.directory, self._stamped())
            claim = self.directory / CLAIM_FILE
            failed = self.directory / FAILED_FILE
            if failed.exists() and not self._stop.wait(OWN_FAILURE_GRACE_S):
                self._leave_after_peer(failed.read_text().strip())
            elif claim.exists():  # another rank declared a hang
                self._leave(Path(claim.read_text().strip() or self._hang_dir_name()), False)
            elif self.timeout_s and self._stalled_s() > self._allowance_s:
                self._leave(*self._claim())

    def _terminated_now(self) -> bool:
        """Whether SIGTERM arrived since the last look (and was not seen before)."""
        if self._signals is None or self.beat.terminated:
            return False
        self.beat.terminated = signal.SIGTERM in self._signals.received()
        return self.beat.terminated

    def _leave_after_peer(self, failure: str) -> None:
        if self.rank == rank_to_say_peer_failure(failure):
            print(f"tessera: {failure}; stopping the other ranks", file=sys.stderr, flush=True)
        self.beat.ended = PEER_FAILED
        with contextlib.suppress(OSError):
            faults.write_heartbeat(self.directory, self._stamped())
        os._exit(1)

    def _stalled_s(self) -> float:
        return time.monotonic() - self._progressed

    def _save_allowance_s(self) -> float:
        """The first save may take SLOW_PHASE_FACTOR x the timeout; a later one 3x the longest
        before it (and at least the timeout)."""
        if self._longest_save_s is None:
            return self.timeout_s * SLOW_PHASE_FACTOR
        return max(self.timeout_s, 3 * self._longest_save_s)

    def _hang_dir_name(self) -> str:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        return str(self.run_dir / faults.HANGS_DIR / stamp)

    def _claim(self) -> tuple[Path, bool]:
        """(the hang's directory, whether this rank declared it first)."""
        claim = self.directory / CLAIM_FILE
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            time.sleep(0.1)  # the claimer is writing the name
            return Path(claim.read_text().strip() or self._hang_dir_name()), False
        hang_dir = self._hang_dir_name()
        with os.fdopen(fd, "w") as f:
            f.write(hang_dir)
        return Path(hang_dir), True

    def _leave(self, hang_dir: Path, declared: bool) -> None:
        """Write the stacks, name the culprits (the declaring rank), and exit the process."""
        with contextlib.suppress(OSError):
            trace = write_stacks(hang_dir, self.rank, self.beat)
            self.beat.ended = HANG
            faults.write_heartbeat(self.directory, self._stamped())
            if declared:
                time.sleep(2 * self.beat_s)  # the others write their stacks and last beats
                beats = faults.read_heartbeats(self.directory)
                waits = waiting_collective(trace) if trace else None
                line = name_the_hang(self.run_dir, beats, hang_dir, self.beat_s, self.world_size,
                                     f"rank {self.rank} waits in {waits}" if waits else None)
                kill_stopped_ranks_here(beats, self.beat_s)
                print(line, flush=True)
                print(line, file=sys.stderr, flush=True)
                (hang_dir / "summary.txt").write_text(line + "\n")
            else:
                time.sleep(self.beat_s)  # leave after the declaring rank read our heartbeat
        os._exit(faults.HANG_EXIT_CODE)


def rank_to_say_peer_failure(failure: str) -> int:
    """The one rank that prints the line of a peer's failure (FAILED_FILE's text): rank 0, or
    rank 1 where rank 0 is the one that failed. Not every rank: 511 lines of one error."""
    return 1 if failure.startswith("rank 0 ") else 0


def watch_intervals(timeout_s: float, world_size: int) -> tuple[float, float]:
    """(beat_s, poll_s): how often a rank writes its heartbeat, and how often it looks for a
    peer's failure or hang claim (a peer's failure is seen within poll_s, and left
    OWN_FAILURE_GRACE_S later). Quick enough to name a hang well within the timeout (heartbeats
    only, when it is off); slow enough that a large job's watchdogs stay within FILE_OPS_PER_S
    on the shared file system, where each beat is two operations (write, rename) and each look
    two (two files): from 500 ranks on, both intervals grow with the world size (16 s at 8192
    ranks)."""
    floor_s = 2 * 2 * world_size / FILE_OPS_PER_S  # half the budget each
    beat_s = min(max(timeout_s / 10, 0.5), 10.0) if timeout_s else 30.0
    return max(beat_s, floor_s), max(min(beat_s, 1.0), floor_s)


class SignalWatch:
    """The signals this process receives, seen by a thread. Python runs a signal's handler only
    when the main thread runs Python code, and a rank blocked in a collective does not; the
    interpreter writes each signal's number to its wakeup fd at once, from C, and this socket
    pair is that fd."""

    def __init__(self) -> None:
        self._receiver, self._sender = socket.socketpair()
        for end in (self._receiver, self._sender):
            end.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._sender.fileno(), warn_on_full_buffer=False)

    @staticmethod
    def in_main_thread() -> SignalWatch | None:
        """A watch, or None outside the main thread (only it may set the wakeup fd)."""
        return SignalWatch() if threading.current_thread() is threading.main_thread() else None

    def received(self) -> set[int]:
        """The numbers of the signals received since the last call."""
        with contextlib.suppress(BlockingIOError):
            return set(self._receiver.recv(256))
        return set()

    def close(self) -> None:
        with contextlib.suppress(ValueError):  # (closed from another thread)
            signal.set_wakeup_fd(self._previous_fd)
        self._receiver.close()
        self._sender.close()


def write_stacks(hang_dir: Path, rank: int, beat: Heartbeat) -> bytes | None:
    """All threads' Python stacks of this process, and torch's Flight Recorder trace (returned)."""
    hang_dir.mkdir(parents=True, exist_ok=True)
    path = hang_dir / f"rank-{rank:05d}.txt"
    with open(path, "w") as f:
        f.write(f"rank {rank} on {beat.host} (pid {beat.pid}): step {beat.step}, phase "
                f"{beat.phase}, no progress for {time.time() - beat.progressed_at:.0f} s\n\n")
        f.flush()
        faulthandler.dump_traceback(f, all_threads=True)
    trace = flight_recorder_trace()
    if trace is not None:  # one folder for torch's analyzer: `python -m
        # torch.distributed.flight_recorder.fr_trace DIR --prefix rank-`
        (hang_dir / FLIGHT_RECORDER_DIR).mkdir(exist_ok=True)
        (hang_dir / FLIGHT_RECORDER_DIR / f"rank-{rank:05d}").write_bytes(trace)
    return trace


def flight_recorder_trace() -> bytes | None:
    """torch's Flight Recorder (TORCH_FR_BUFFER_SIZE > 0): this rank's last collectives, each
    with its process group, sequence number, sizes and state (a hung one is not completed).
    NCCL keeps its own record; gloo's is the generic one. None before torch.distributed."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    dumps = ("_dump_nccl_trace", "_dump_fr_trace") if torch.cuda.is_available() else (
        "_dump_fr_trace",)
    for name in dumps:
        dump = getattr(torch._C._distributed_c10d, name, None)
        try:
            trace = dump() if dump is not None else None
        except Exception:  # noqa: BLE001 - no group of that kind, or a torch without it
            trace = None
        if trace:
            return trace
    return None


def waiting_collective(trace: bytes) -> str | None:
    """Where a rank waits, from its Flight Recorder trace: the oldest collective it entered that
    has not completed, e.g. 'gloo:all_reduce #57 of group default_pg'. None when it waits in
    none (a data read, a file system). The bytes are torch's own dump of this process."""
    try:
        entries = pickle.loads(trace).get("entries", [])
    except Exception:  # noqa: BLE001 - a format this torch does not write; the file is kept
        return None
    waiting = [e for e in entries if not e.get("retired") and e.get("state") != "completed"]
    if not waiting:
        return None
    first = waiting[0]
    name, description = first.get("process_group") or ("?", "")
    return f"{first.get('profiling_name')} #{first.get('collective_seq_id')} of group " \
           f"{description or name}"


def name_the_hang(run_dir: Path, beats: list[Heartbeat], hang_dir: Path, beat_s: float,
                  world_size: int, where_waiting: str | None = None) -> str:
    """The one line naming who stopped (and `where_waiting`: the collective the declaring rank
    waits in); strikes their hosts and records the event."""
    now = time.time()
    waits = f"; {where_waiting}" if where_waiting else ""
    started = {b.rank for b in beats}
    missing = [r for r in range(world_size) if r not in started]
    if missing:  # (no heartbeat, so no host: nothing to strike)
        line = (f"tessera: hang at start-up: rank {', '.join(map(str, missing[:8]))} never "
                f"started (its log says why); stacks in {hang_dir}")
        faults.record_event(run_dir, "hang", step=0, ranks=missing, hosts=[],
                            directory=str(hang_dir), line=line)
        return line
    stale = [b for b in beats if _stopped(b, now, beat_s)]
    live = [b for b in beats if b not in stale]
    ahead = max((_progress(b) for b in live), default=None)
    behind = [b for b in live if ahead and _progress(b) < ahead]
    culprits = stale or behind
    if culprits:
        first = culprits[0]
        # where the others wait (a stopped rank's last heartbeat may be older than its step)
        where = max(live, key=_progress) if stale and live else first
        named = ", ".join(f"rank {b.rank} on {b.host}" for b in culprits[:4])
        more = f" and {len(culprits) - 4} more" if len(culprits) > 4 else ""
        if stale:
            what = f"stopped (no heartbeat for {now - first.beat_at:.0f} s)"
        else:
            what = f"is stuck in {first.phase} for {now - first.progressed_at:.0f} s"
        line = (f"tessera: hang at step {where.step} ({where.phase}): {named}{more} {what}"
                f"{waits}; stacks in {hang_dir}")
    else:
        phase = beats[0].phase if beats else "?"
        step = beats[0].step if beats else "?"
        line = (f"tessera: hang at step {step} ({phase}): every rank is waiting (a collective or "
                f"a file system that stopped answering){waits}; stacks in {hang_dir}")
    for beat in culprits:
        faults.add_strike(run_dir, beat.host, f"rank {beat.rank} hung at step {beat.step}")
    faults.record_event(run_dir, "hang", step=culprits[0].step if culprits else None,
                        ranks=[b.rank for b in culprits], hosts=sorted({b.host for b in culprits}),
                        directory=str(hang_dir), line=line)
    return line


def kill_stopped_ranks_here(beats: list[Heartbeat], beat_s: float) -> None:
    """A stopped rank on this host is killed: a launcher would otherwise wait (torch's agent 30
    s) for it to answer SIGTERM before the restart. Its peers on other hosts go when their
    launcher ends the step."""
    host, now = faults.host_name(), time.time()
    for beat in beats:
        if beat.host == host and _stopped(beat, now, beat_s):
            with contextlib.suppress(OSError):
                os.kill(beat.pid, signal.SIGKILL)


def _stopped(beat: Heartbeat, now: float, beat_s: float) -> bool:
    """No ending and no heartbeat for 3 beats: stopped or frozen."""
    return beat.ended is None and now - beat.beat_at > 3 * beat_s


def _progress(beat: Heartbeat) -> tuple[int, int]:
    """How far a rank got: its step, then its phase within the step."""
    return beat.step, PHASES.index(beat.phase) if beat.phase in PHASES else len(PHASES)
