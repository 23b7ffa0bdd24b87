"""Audio benchmark (issue 18): spoken-digit accuracy of generated clips, its ceilings, FD, speed.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/audio.py --run results/spoken_digits_main --out-dir OUT

Measures, for a run trained by ``ditkit train --recipe spoken_digits``:

* ceilings on real clips: pocketsphinx digit accuracy (``ditkit.eval.audio.DigitRecognizer``, ten-word
  grammar) on ``--num-samples`` training clips (a fixed subset, the same count per digit as the
  generated set) as they are and after the log-mel -> Griffin-Lim round trip (what the vocoder
  alone costs); the same on the ten human recordings of ``asterisk-core-sounds-en-wav`` (held out:
  real-voice transfer of the judges), and the log-mel classifier's accuracy on them;
* generated clips (labels cycling over the digits, sample i seeded i) at each ``--cfg-scales`` x
  ``--steps`` point: pocketsphinx accuracy, classifier accuracy, FD in the classifier's features
  with the real-vs-real floor (``ditkit.eval.audio.evaluate_audio``);
* real-time factor: seconds of 1 s audio per second of one core's CPU time (process time, stable on
  a shared machine) at 25 and 50 steps, network alone and with the Griffin-Lim vocoder, batch 10.

Writes ``OUT/audio.json`` and ``OUT/table.md``; ``--examples DIR`` also writes a few WAVs and a
spectrogram grid of the ten digits (docs/audio/).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: one core, comparable CPU seconds

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def ceilings(pipe: Any, num_samples: int, recogniser: Any, classifier: Any) -> dict[str, Any]:
    """Pocketsphinx on real training clips and their Griffin-Lim round trip; real human digits."""
    from ditkit.data.audio import load_real_digits, load_spoken_digits, logmel_to_waveform, waveform_to_logmel

    spec, d = pipe.spec, pipe.cfg.data
    clips = load_spoken_digits(spec.sample_rate, d.duration)
    g = torch.Generator().manual_seed(0)
    per = -(-num_samples // 10)
    idx = torch.cat([torch.nonzero(clips.labels == k).squeeze(1)[torch.randperm(int((clips.labels == k).sum()), generator=g)[:per]]
                     for k in range(10)])
    waves, labels = clips.waves[idx].numpy(), clips.labels[idx]
    logmels = waveform_to_logmel(waves, spec)
    round_trip = logmel_to_waveform(logmels, spec, n_iter=32)
    out: dict[str, Any] = {
        "tts_clips": len(idx),
        "pocketsphinx_tts": _accuracy(recogniser.recognise(waves, spec.sample_rate), labels),
        "pocketsphinx_tts_griffin_lim": _accuracy(recogniser.recognise(round_trip, spec.sample_rate), labels),
        "classifier_tts_griffin_lim": classifier.accuracy(waveform_to_logmel(round_trip, spec), labels),
    }
    try:
        real = load_real_digits(spec.sample_rate, d.duration)
    except Exception as err:  # not installed: say so in the results
        out["human_digits"] = f"not measured: {err}"
        return out
    real_waves = real.waves.numpy()
    real_mels = waveform_to_logmel(real_waves, spec)
    real_gl = logmel_to_waveform(real_mels, spec, n_iter=32)
    out.update({
        "pocketsphinx_human": _accuracy(recogniser.recognise(real_waves, spec.sample_rate), real.labels),
        "pocketsphinx_human_griffin_lim": _accuracy(recogniser.recognise(real_gl, spec.sample_rate), real.labels),
        "classifier_human": classifier.accuracy(real_mels, real.labels),
    })
    return out


def _accuracy(heard: list[int], labels: torch.Tensor) -> float:
    return float(np.mean([h == int(y) for h, y in zip(heard, labels.tolist())]))


def real_time_factor(pipe: Any, steps: int, cfg_scale: float, sampler: Any = None, n: int = 10) -> dict[str, float]:
    """Seconds of 1 s audio per CPU second: the network alone (``_draw``) and network + vocoder."""
    labels = [i % pipe.num_classes for i in range(n)]
    sampler, steps, scale, _ = pipe.check_options(sampler, steps, cfg_scale)
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    t0 = time.process_time()
    pipe._draw(labels, gens, n, pipe.num_frames(1.0), sampler=sampler, steps=steps, scale=scale, spacing=None,
               options={}, batch_size=n, progress=None)
    network = time.process_time() - t0
    t0, w0 = time.process_time(), time.perf_counter()
    pipe(class_labels=labels, duration=1.0, num_inference_steps=steps, guidance_scale=cfg_scale, sampler=sampler, batch_size=n)
    total, wall = time.process_time() - t0, time.perf_counter() - w0
    return {"sampler": sampler, "steps": steps, "rtf_network_cpu": n / network, "rtf_with_vocoder_cpu": n / total, "rtf_with_vocoder_wall": n / wall}


def write_examples(pipe: Any, folder: Path, cfg_scale: float, steps: int, wavs: tuple[int, ...] = (0, 3, 7)) -> list[Path]:
    """``digit_N.wav`` for a few digits and ``spectrograms.png`` of all ten (seed 0)."""
    from ditkit.data.audio import write_wav
    from ditkit.media import save_png
    from ditkit.pipelines.audio import spectrogram_strip

    folder.mkdir(parents=True, exist_ok=True)
    out = pipe(class_labels=list(range(min(10, pipe.num_classes))), duration=1.0, num_inference_steps=steps, guidance_scale=cfg_scale)
    written = [write_wav(folder / f"digit_{k}.wav", out.waveforms[k], out.sample_rate) for k in wavs if k < len(out.waveforms)]
    save_png(spectrogram_strip(out.logmels), folder / "spectrograms.png",
             {**out.metadata, "layout": "digits 0..9 left to right; low frequencies at the bottom"})
    return written + [folder / "spectrograms.png"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--out-dir", default="benchmarks/results/audio")
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--cfg-scales", default="1,2,3")
    parser.add_argument("--steps", default="25")
    parser.add_argument("--sampler", default=None, help="default: the checkpoint's")
    parser.add_argument("--cache-dir", default=None, help="mel classifier cache (default ~/.cache/ditkit/eval)")
    parser.add_argument("--examples", metavar="DIR", help="also write example WAVs and a spectrogram grid here")
    parser.add_argument("--skip-ceilings", action="store_true")
    args = parser.parse_args()

    import ditkit
    from ditkit.cache import cache_dir
    from ditkit.eval.audio import DigitRecognizer, evaluate_audio, get_mel_classifier
    from ditkit.data.audio import load_audio_dataset

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = args.cache_dir or cache_dir("eval")
    pipe = ditkit.load(args.run, device="cpu")
    recogniser = DigitRecognizer()
    pipe(class_labels=[0], num_inference_steps=2)  # warm-up: imports, librosa's compiled kernels
    results: dict[str, Any] = {"run": str(args.run), "step": pipe.step, "points": []}
    t0 = time.time()
    if not args.skip_ceilings:
        real = load_audio_dataset(pipe.cfg.data)
        classifier = get_mel_classifier(real.images.float() / 127.5 - 1, real.labels, cache, num_classes=10)
        results["ceilings"] = ceilings(pipe, args.num_samples, recogniser, classifier)
        print("ceilings", json.dumps(results["ceilings"]), flush=True)
    for steps in [int(s) for s in args.steps.split(",")]:
        for scale in [float(s) for s in args.cfg_scales.split(",")]:
            report = evaluate_audio(pipe, args.num_samples, sampler=args.sampler, num_sampling_steps=steps, cfg_scale=scale, seed=0,
                                    cache_dir=cache)
            results["points"].append(report)
            print(json.dumps({k: report.get(k) for k in ("pocketsphinx_accuracy", "classifier_accuracy", "fd_classifier",
                                                         "fd_real_floor", "real_time_factor")}), "steps", steps, "cfg", scale, flush=True)
    best = max(results["points"], key=lambda r: r.get("pocketsphinx_accuracy", r["classifier_accuracy"]))
    best_scale = float(best["sampling"]["cfg_scale"])
    results["real_time_factor"] = [real_time_factor(pipe, s, best_scale, args.sampler) for s in (25, 50)]
    if args.examples:
        results["examples"] = [str(p) for p in write_examples(pipe, Path(args.examples), best_scale, 25)]
    results["benchmark_seconds"] = time.time() - t0
    (out_dir / "audio.json").write_text(json.dumps(results, indent=2))
    lines = ["| sampler | steps | cfg | pocketsphinx acc. | classifier acc. | FD (floor) | RTF (wall) |", "|---|---|---|---|---|---|---|"]
    for r in results["points"]:
        s = r["sampling"]
        lines.append(f"| {s['sampler']} | {s['num_sampling_steps']} | {s['cfg_scale']} | {r.get('pocketsphinx_accuracy', float('nan')):.3f} | "
                     f"{r['classifier_accuracy']:.3f} | {r['fd_classifier']:.1f} ({r['fd_real_floor']:.1f}) | {r['real_time_factor']:.1f} |")
    (out_dir / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps(results.get("ceilings", {}), indent=1))
    print(json.dumps(results["real_time_factor"], indent=1))


if __name__ == "__main__":
    main()
