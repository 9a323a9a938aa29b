"""Evaluate a PIPs++ checkpoint on CroHD head tracking (HT21 / HT21Labels layout), 1000-frame clips.

    python test_on_cro.py --dataset_location=/data/crohd --init_dir=./reference_model

--init_dir is a checkpoint file or folder, or the hub name pips2 (the authors' model, fetched once into a
cache); the rules are pips2.hub's (docs/MODELS.md).

A sequence that cannot be read (no frames, no or a malformed gt.txt) or a clip with an unreadable, truncated
or odd-sized frame is skipped with its reason and counted in the summary. --out_json is written (temp file,
then rename) at the end and also on Ctrl-C (exit 130), SIGTERM (exit 143) or an unexpected error (exit 1), with
the clips scored so far, and <name>_curves.png beside it. The JSON layout is docs/EVALUATION.md's.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from pips2 import evaluation
from pips2.datasets import crohd
from pips2.hub import load_model
from pips2.tracking import FileFrames
from pips2.utils.checkpoint import CheckpointError, resolve_device
from pips2.utils.cli import aliased, die, run_fire


def score_clip(model, clip: crohd.CroClip, S: int, N: int, iters: int, model_hw: tuple[int, int],
               point_batch: int, amp: str | None) -> evaluation.Scored:
    """One clip for the evaluation frame: its frames checked, its heads chosen and scored."""
    evaluation.check_frames(clip.frame_paths)
    frames = FileFrames(clip.frame_paths, model_hw)
    # heads leave the view (NaN positions there), so the motion rule is left out
    tr, _, val = evaluation.select_points(clip.trajs, clip.visibs, clip.valids, frames.src_hw, N, max_motion=None)
    if tr.shape[1] == 0:
        raise evaluation.Skip("no usable head")
    curves: dict = {}
    res = evaluation.evaluate_points(model, frames, tr, val, S, iters, point_batch, amp, curves)
    return evaluation.Scored(res, evaluation.format_row(clip.name, res), int(res["frames"]), curves)


def main(dataset_location: str = "../datasets/crohd", dset: str = "train", clip_len: int = 1000, S: int = 128,
         N: int = 256, iters: int = 16, image_size=(512, 896), init_dir: str = "./reference_model",
         max_clips: int | None = None, device: str = "auto", amp: str = "none", point_batch: int = 256,
         out_json: str | None = None, max_iters: int | None = None) -> None:
    """Score each clip with the authors' protocol; one line per clip and a final table.

    --max_clips scores only the first clips; --max_iters is the authors' name for it."""
    try:
        model_hw = evaluation.check_image_size(image_size)
        evaluation.check_counts(S=S, N=N, iters=iters, point_batch=point_batch, clip_len=clip_len,
                                max_clips=max_clips, max_iters=max_iters)
        max_clips = aliased("max_clips", max_clips, "max_iters", max_iters)
        dev = resolve_device(device)
        autocast = evaluation.check_amp(amp)
        evaluation.check_out_json(out_json, dataset_location=dataset_location, init_dir=init_dir)
        seqs = crohd.list_sequences(dataset_location, dset)
    except (ValueError, OSError) as e:
        die(e)
    split = Path(dataset_location) / "HT21" / dset
    if not seqs:
        die(f"{split}: no sequence folders (expected <root>/HT21/<split>/<seq>/img1)")
    settings = dict(dataset_location=str(dataset_location), dset=dset, clip_len=clip_len, S=S, N=N, iters=iters,
                    image_size=list(model_hw), init_dir=str(init_dir), max_clips=max_clips, amp=amp,
                    point_batch=point_batch, device=str(dev), checkpoint=evaluation.checkpoint_of(init_dir))
    run = evaluation.Evaluation(f"CroHD {dset}", "clips", Path(str(init_dir)).name or str(init_dir), settings,
                                out_json)
    clips = []
    for seq in seqs:  # the annotations are read first: a bad sequence is said before the model loads
        try:
            clips += crohd.sequence_clips(dataset_location, dset, seq, clip_len)
        except crohd.CroHDError as e:
            run.skip(seq, str(e))
    if not clips:
        die(f"{split}: no clip to score ({len(run.skipped)} of {len(seqs)} sequences skipped)")
    clips = clips[:max_clips]
    try:
        model = load_model(init_dir, dev, kind="pips2", amp=amp)
    except (ValueError, CheckpointError) as e:
        die(e)
    items = [(c.name, partial(score_clip, model, c, S, N, iters, model_hw, point_batch, autocast)) for c in clips]
    run.run(items, len(items), desc="crohd", unit="clip")


def cli() -> None:
    """The `pips2-eval-cro` command (and `python test_on_cro.py`): fire flags of main."""
    run_fire(main)


if __name__ == "__main__":
    cli()
