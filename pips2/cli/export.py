"""Export PointOdyssey into fixed-size augmented mp4 clips, in parallel and safely (docs/FORMATS.md).

The defaults (S=36, N=128, 256x384) are the clips stage-1 training reads with its defaults
(datasets.clips.STAGE_CLIPS); add --S=64 --crop_size=512,896 for stage 2.

    python export_mp4_dataset.py --dataset_location=/data/pointodyssey --dset=train --workers=4
    # many machines on one shared folder:
    python export_mp4_dataset.py ... --shard=0 --num_shards=3   # and 1, 2 elsewhere
"""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from pips2.datasets import pointodyssey as pod
from pips2.datasets.clipmaker import enumerate_candidates, scene_fingerprints, scene_frames
from pips2.datasets.clips import STAGE_CLIPS, ClipSettings, check_manifest, clip_dir, is_clip_dir, list_clips
from pips2.datasets.export import (
    NO_SPACE,
    NOT_WRITABLE,
    ClaimsInTheWay,
    ForeignTempFolder,
    check_claims_dir,
    check_source,
    claim_abandoned,
    claim_unjudged,
    claims_dir,
    clean_stale_claims,
    clean_stale_temps,
    export_one,
    private_tmp,
    source_of,
    worker_init,
)
from pips2.utils.cli import aliased, die, parse_hw, run_fire
from pips2.utils.paths import check_writable, output_folder_problem, printable
from pips2.utils.procs import (
    NotARegularFile,
    WorkerPool,
    caught_stop_signals,
    describe_exit,
    exit_code,
    raise_stop,
    usable_cpus,
)


class Terminated(BaseException):
    """SIGTERM (a scheduler, kill) or SIGHUP (a closed terminal) to the exporter: stop as Ctrl-C does, with the
    summary."""

    def __init__(self, signame: str = "SIGTERM"):
        super().__init__(signame)
        self.signame = signame


class _Signals:
    """SIGINT and SIGTERM stop the export at once (KeyboardInterrupt, Terminated), and are remembered: an
    exception raised while Python runs a finalizer (__del__) is printed and dropped, so the loop also asks
    after every clip (`check`). A signal ignored by whoever started the export stays ignored."""

    def __init__(self):
        self.got = 0
        self.noting = False  # the clips are done: a stop is noted for the exit code, the summary still printed
        self.old = {sig: signal.getsignal(sig) for sig in caught_stop_signals()}
        for sig in self.old:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.got:  # already stopping: a second signal must not cut the clean-up short
            return
        self.got = signum
        if not self.noting:
            raise_stop(signum, self._stop())

    def note_only(self) -> None:
        """From now on (the workers reaped, the summary printed after the last clip) a stop signal is noted, not
        raised: it broke the summary with a traceback and exit 1."""
        self.noting = True

    def _stop(self) -> BaseException:
        return KeyboardInterrupt() if self.got == signal.SIGINT else Terminated(signal.Signals(self.got).name)

    def check(self) -> None:
        """Raise the stop of a signal received (if any)."""
        if self.got:
            raise self._stop()

    def ignore(self) -> None:
        """From now on (the clean-up after a stop) no signal interrupts."""
        for sig in self.old:
            signal.signal(sig, signal.SIG_IGN)

    def restore(self) -> None:
        """The handlers from before."""
        for sig, old in self.old.items():
            signal.signal(sig, old)


def _in_process(jobs: deque) -> Iterator[tuple]:
    """export_one over the queue in this process (--workers=1), as WorkerPool.run reports it."""
    while jobs:
        job = jobs.popleft()
        yield job, export_one(job), None


# The largest --crop_size side, the largest input the trackers take (tracking.MAX_IMAGE_SIDE). A clip is built
# whole at the crop size in each worker: S=36 frames of 4096x4096 are 1.8 GB, and 100000x100000 failed every
# clip with a MemoryError ("rerun to retry them", which never helps). The authors' largest is 512x896.
MAX_CROP_SIDE = 4096


def _parse_hw(crop_size) -> tuple[int, int]:
    h, w = parse_hw(crop_size, "crop_size")
    if h < 128 or w < 128 or h % 2 or w % 2:
        raise ValueError(f"--crop_size must be even and at least 128x128, got {h}x{w}")
    if max(h, w) > MAX_CROP_SIDE:
        raise ValueError(f"--crop_size must be at most {MAX_CROP_SIDE} per side, got {h}x{w}")
    return h, w


X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow",
                "placebo")
# the smallest value of each numeric flag: below it every clip would fail or be rejected for a reason that is
# the flag's, not the data's (--S=1 or --N=0 raise inside the clip code)
# (--max_clips=0 wrote nothing and exited 0, leaving an empty version folder)
MINIMUM = {"S": 2, "N": 1, "max_clips": 1, "workers": 1, "num_shards": 1, "seed": 0}


def _check_flags(**flags) -> None:
    """ValueError naming the first flag out of its range (MINIMUM, --preset)."""
    for name, low in MINIMUM.items():
        if flags.get(name) is not None and flags[name] < low:
            raise ValueError(f"--{name} must be at least {low}, got {flags[name]}")
    most = 4 * usable_cpus()  # each worker is a process (~60 MB idle) with its own ffmpeg
    if flags.get("workers") is not None and flags["workers"] > most:
        raise ValueError(f"--workers must be at most {most} (4 per CPU core this process may use), got "
                         f"{flags['workers']}")
    dset = flags.get("dset")
    if dset is not None and (not re.fullmatch(r"[A-Za-z0-9_.-]+", dset) or dset in (".", "..")):
        # a path component: --dset=../test wrote its version folder outside --out_dir
        raise ValueError(f"--dset must be a split's plain name (train, val, test, ...), got {dset!r}")
    if flags["preset"] not in X264_PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(X264_PRESETS)}, got {flags['preset']!r}")


def _no_clips_reason(dataset_location: str, st: ClipSettings) -> str:
    split_dir = Path(dataset_location) / st.split
    scenes = pod.list_scenes(dataset_location, st.split)
    if not scenes:
        return f"{split_dir}: no scene folders in this split"
    return (f"{split_dir}: 0 candidate clips: none of its {len(scenes)} scene(s) has the {st.S} frames "
            f"(rgbs/rgb_*.jpg) a clip needs")


# rejections that --N decides: a clip keeps N tracks, and is rejected when fewer than N//2 pass the filters
TRACK_REJECTIONS = ("too few tracks", "too few tracks after crop", "fewer than half of the entries valid")


def _all_rejected(n: int, reasons: Counter, st: ClipSettings) -> str:
    """The error line of a run whose every clip was rejected: the flag or data most likely behind it."""
    top = reasons.most_common(1)[0][0]
    if all(r in TRACK_REJECTIONS for r in reasons):
        hint = (f"--N={st.N} asks for more tracks than these clips hold ({top}: {reasons[top]}); give a lower --N"
                + (" or a larger --crop_size" if "too few tracks after crop" in reasons else ""))
    else:
        hint = f"the data is the likely cause ({top}: {reasons[top]}; see the summary)"
    return f"all {n} clips were rejected, none written: {hint}"


def main(dataset_location: str = "../datasets/pointodyssey", dset: str = "train", S: int = STAGE_CLIPS[1]["S"],
         N: int = STAGE_CLIPS[1]["N"], crop_size=STAGE_CLIPS[1]["crop_hw"], use_augs: bool = True,
         max_clips: int | None = None, max_iters: int | None = None, shuffle: bool = True,
         out_dir: str = "./pod_export", workers: int = 1, shard: int = 0, num_shards: int = 1, seed: int = 0,
         preset: str = "medium", verify: bool = False, quiet: bool = False) -> None:
    """Write clips <out_dir>/<version>/<k:06d>/{rgb.mp4,track.npz} for k < max_clips (all clips by default).

    --max_iters is the authors' name for --max_clips.

    --preset picks the x264 speed/size trade-off at CRF 20 (medium = the authors' output; veryfast encodes
    2.9x faster at about -1.3 dB PSNR, see docs/BENCHMARKS.md). --verify=True decodes every finished clip
    again and rewrites damaged ones. Exit codes: 0 done, 1 some clips failed, 2 bad flags or data (also when every
    clip is rejected), 130 Ctrl-C, 143 SIGTERM (both after the summary, with every finished clip kept).
    """
    try:
        st = ClipSettings(split=dset, S=S, N=N, crop_hw=_parse_hw(crop_size), use_augs=use_augs,
                          shuffle=shuffle, seed=seed, preset=preset)
    except ValueError as e:
        die(e)
    by_alias = max_clips is None and max_iters is not None  # the authors' name: errors say it
    try:
        max_clips = aliased("max_clips", max_clips, "max_iters", max_iters)
        _check_flags(S=S, N=N, max_clips=max_clips, workers=workers, num_shards=num_shards, seed=seed, preset=preset,
                     dset=dset)
    except ValueError as e:
        if by_alias:
            e = ValueError(str(e).replace("--max_clips", "--max_iters", 1))
        die(e)
    if not 0 <= shard < num_shards:
        die(f"--shard must be in [0, {num_shards}), got {shard}")
    try:  # before anything is created: a mistyped path must not leave an empty version folder behind
        frames = scene_frames(dataset_location, st.split)
        cands = enumerate_candidates(dataset_location, st, frames)
        if not cands:
            die(_no_clips_reason(dataset_location, st))
    except OSError as e:
        die(f"--dataset_location: {e}")
    version_dir = Path(out_dir) / st.version()
    if problem := output_folder_problem(version_dir, "--out_dir"):
        die(problem)
    try:
        version_dir.mkdir(parents=True, exist_ok=True)
        check_writable(version_dir)
        check_manifest(version_dir)
        private_tmp(version_dir)
        check_claims_dir(version_dir)
        note = check_source(version_dir, st, source_of(dataset_location, frames,
                                                        scene_fingerprints(dataset_location, st.split, frames)))
    except NotARegularFile as e:
        die(f"--out_dir: {e.filename} is {e.strerror}, where the export keeps its manifest of clips; remove it")
    except ClaimsInTheWay as e:
        what = "claims of clips" if Path(e.filename).name == ".claims" else "records of rejected clips"
        fix = "remove it" if e.errno == errno.ENOTDIR else \
            "ask its owner to let the group write to it, or give another --out_dir"
        die(f"--out_dir: {e.filename} is {e.strerror}; the export keeps its {what} there: {fix}")
    except ForeignTempFolder as e:
        die(f"--out_dir: {e.filename} is not a folder of this user's; the export writes its clips there first: "
            "remove it")
    except OSError as e:
        die(f"--out_dir: cannot write {version_dir} ({e.strerror or e})")
    except ValueError as e:
        die(e)
    if note:
        print(printable(f"note: {note}"), flush=True)
    cleaned = clean_stale_temps(version_dir)
    clean_stale_claims(version_dir)
    total = len(cands) if max_clips is None else min(max_clips, len(cands))
    todo = [k for k in range(total) if k % num_shards == shard]
    # clips of one scene together: each worker keeps the last scenes loaded
    todo.sort(key=lambda k: (cands[k].scene, k))
    print(f"export {st.version()}: {len(cands)} candidate clips, {len(todo)} for shard {shard}/{num_shards}, "
          f"{workers} worker(s) -> {version_dir}" + (f" (removed {cleaned} stale temp folders)" if cleaned else ""),
          flush=True)
    jobs = deque((str(dataset_location), str(version_dir), st.to_dict(), k, asdict(cands[k]), verify) for k in todo)
    signals = _Signals()
    try:
        _run(jobs, workers, version_dir, quiet, signals, st)
    finally:
        signals.restore()


def _run(jobs: deque, workers: int, version_dir: Path, quiet: bool, signals: _Signals, st: ClipSettings) -> None:
    """Export the queued clips with the progress bar, then the summary and the exit code."""
    n_jobs = len(jobs)
    counts, reasons, deaths = Counter(), Counter(), Counter()
    held: list[int] = []  # clips another exporter held when this one came to them
    finished: list[int] = []  # clips this run wrote (or rewrote)
    stop = None  # why the export stopped early, if it did
    t0 = time.time()
    bar, pool = None, None
    ident = _ident(version_dir)
    try:
        # inside: its first write can meet a reader gone (`2>&1 | head -1`), a stop like any other
        bar = tqdm(total=n_jobs, desc="export", unit="clip", disable=quiet)
        if workers <= 1:
            results = _in_process(jobs)
        else:
            # a worker that dies (killed, out of memory) is reported with its clip instead of hanging the run;
            # its workers ignore Ctrl-C, which reaches the whole process group: the parent stops them all
            pool = WorkerPool(export_one, workers, initializer=worker_init)
            results = pool.run(jobs)
        for job, result, code in results:
            k = job[3]
            if result is None:  # its worker died mid-clip: the clip once more, in a new worker
                deaths[k] += 1
                if deaths[k] == 1:
                    tqdm.write(f"clip {k:06d}: its worker died ({describe_exit(code)}); trying it once more",
                               file=sys.stderr)
                    jobs.append(job)
                    signals.check()
                    continue
                result = (k, "failed", f"its worker died twice ({describe_exit(code)})")
            k, status, detail = result
            counts[status] += 1
            if status == "busy":
                held.append(k)
            if status in ("written", "rewritten"):
                finished.append(k)
            if status == "rejected":
                reasons[detail] += 1
            elif status == "failed":
                tqdm.write(printable(f"clip {k:06d} failed: {detail}"), file=sys.stderr)
                if detail.startswith((NO_SPACE, NOT_WRITABLE)):  # every further clip would fail the same way
                    stop = detail
                    break
                if _ident(version_dir) != ident:  # moved or removed: every further clip fails, each in a line
                    stop = f"{MOVED}: {version_dir}"
                    break
            bar.update()
            bar.set_postfix(written=counts["written"], rejected=counts["rejected"], failed=counts["failed"])
            signals.check()
    except KeyboardInterrupt:
        stop = "interrupted"
    except Terminated as e:
        stop = f"terminated by {e.signame}"
    except OSError as e:  # the workers' pipes and files need descriptors: this process's limit, not the data
        if e.errno not in (errno.EMFILE, errno.ENFILE):
            raise
        stop = f"{TOO_MANY_FILES}: this process may open {descriptor_limit()} (raise `ulimit -n`)"
    finally:
        if stop is not None:  # a second signal must not break the clean-up
            signals.ignore()
        else:
            signals.note_only()
        if bar is not None:
            bar.close()
        if pool is not None:
            if stop is None and not pool.busy:
                pool.close()
            else:
                pool.terminate()  # workers kill their encoders; only verified, renamed clips remain
    if stop is not None or deaths:  # temp folders and claims of the workers stopped or dead
        clean_stale_temps(version_dir)
        clean_stale_claims(version_dir)
    dt = time.time() - t0
    done = sum(counts.values())
    head = "summary" if stop is None else f"stopped ({stop}) after {done} of {n_jobs} clips; summary"
    retried = f"; {len(deaths)} clip(s) tried again after their worker died" if deaths else ""
    print(printable(f"{head}: written {counts['written']}, rewritten {counts['rewritten']}, already there "
          f"{counts['exists']}, rejected {counts['rejected']} "
          f"({', '.join(f'{r}: {n}' for r, n in reasons.most_common()) or 'none'}), "
          f"failed {counts['failed']}, held by other exporters {counts['busy']}{retried}; "
          f"{len(list_clips(version_dir))} clips in {version_dir}; "
          f"{dt:.1f} s ({(counts['written'] + counts['rewritten']) / max(dt, 1e-9):.2f} clips/s)"), flush=True)
    if stop is not None and stop.startswith(MOVED):
        print(printable(f"error: {version_dir} was moved or removed during the export; the clips written before are "
                        f"where it went, and the same command writes the others"), file=sys.stderr)
        sys.exit(1)
    if stop is not None and stop.startswith(TOO_MANY_FILES):
        print(f"error: {stop}; the same command goes on from there", file=sys.stderr)
        sys.exit(1)
    if stop == "interrupted":
        sys.exit(exit_code("SIGINT"))
    if stop is not None and stop.startswith("terminated by "):
        sys.exit(exit_code(stop.removeprefix("terminated by ")))
    if signals.got:  # after the last clip: every clip is done, and the summary says so; the exit code says who
        name = signal.Signals(signals.got).name
        print(f"stopped by {name} after the last clip: nothing was left to export", file=sys.stderr, flush=True)
        sys.exit(exit_code(name))
    if counts["failed"]:
        print(f"error: {counts['failed']} clip(s) failed (see above); rerun to retry them", file=sys.stderr)
        sys.exit(1)
    # a holder that died since (killed with its workers) left its clips unwritten: not a success
    orphans = [k for k in held if claim_abandoned(version_dir, k)]
    if orphans:
        print(f"error: {len(orphans)} clip(s) held by another exporter are not written and no process holds them "
              f"now (its exporter stopped); rerun to export them", file=sys.stderr)
        sys.exit(1)
    # without file locks a claim names a pid, which says nothing of a process of another PID namespace (a restarted
    # container's dead exporter): such clips may never be written, and exit 0 would hide them
    unjudged = Counter(r for r in (claim_unjudged(version_dir, k) for k in held) if r)
    if unjudged:
        why = "; ".join(f"{n} under {r}" for r, n in unjudged.most_common())
        print(printable(f"error: {sum(unjudged.values())} clip(s) are not written and nothing here can tell whether "
                        f"their exporter still runs ({why}); if none does, remove {claims_dir(version_dir)} and "
                        f"rerun"), file=sys.stderr)
        sys.exit(1)
    # in a folder others may write to, a finished clip can be moved away or replaced by a link after its rename:
    # exit 0 would say the export is complete
    gone = sorted(k for k in finished if not is_clip_dir(clip_dir(version_dir, k), links=False))
    if gone:
        first = clip_dir(version_dir, gone[0])
        now = "a link" if first.is_symlink() else "gone" if not os.path.lexists(first) else "no clip"
        print(printable(f"error: {len(gone)} clip(s) this run wrote are no longer clips ({first} is {now} "
                        f"now): something else changed {version_dir} meanwhile; rerun to write them"),
              file=sys.stderr)
        sys.exit(1)
    if n_jobs and counts["rejected"] == n_jobs:  # nothing written is no success
        print(printable(f"error: {_all_rejected(n_jobs, reasons, st)}"), file=sys.stderr)
        sys.exit(2)


TOO_MANY_FILES = "too many open files"
MOVED = "the version folder was moved or removed"


def _ident(folder: Path) -> tuple[int, int] | None:
    """(device, inode) of the folder at this name now, None if there is none."""
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def descriptor_limit() -> str:
    """This process's soft limit on open files, as a line names it."""
    try:
        import resource
    except ImportError:
        return "an unknown number"
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return "any number" if soft == resource.RLIM_INFINITY else str(soft)


def cli() -> None:
    """The `pips2-export` command (and `python export_mp4_dataset.py`): fire flags of main."""
    run_fire(main)


if __name__ == "__main__":
    cli()
