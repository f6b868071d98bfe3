#!/usr/bin/env python3
"""Builds the paired data set that `prism train shared-space` learns from: the same ten digits seen
three ways.

  * images: scikit-learn's 8x8 handwritten digits (they ship inside the scikit-learn wheel), as the
    32x32 RGB PNGs the vit-digits node serves, with exactly the train/held-out split that
    scripts/make-vision-model.py fitted vit-digits on (its held-out 500 images stay held out here);
  * text: names of each digit in several phrasings; some phrasings are held out;
  * audio: each digit name spoken by espeak-ng (Debian) in several English accents and voice
    variants with seeded random speed and pitch, resampled to 16 kHz mono PCM16 (whisper's rate);
    two accents are held out, so held-out audio is an accent the heads never heard.

And a corrupted copy for `prism train fusion`, a task where one modality alone is not enough:
  * corrupted/images: every image with a random block of its 8x8 grid wiped out (a fifth to a
    quarter of it) plus pixel noise; two versions of each train image, one of each held-out image;
  * corrupted/audio: every clip cut to 40-60% of its voiced part ("thr", "fi", "se") and drowned
    in white noise at -10..-4 dB SNR (noise louder than the voice); one version of each clip
    (whisper costs ~2 s a clip on two cores); held-out clips keep their held-out accents.

Writes <out>/manifest.json plus images/*.png and audio/*.wav. Seeded: the same files every run.

Usage: make-digits-pairs.py <out-dir>
"""
import importlib.util
import json
import os
import subprocess
import sys
import wave

import numpy as np
from scipy.signal import resample_poly
from sklearn.datasets import load_digits

ROOT = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("make_vision_model", os.path.join(ROOT, "make-vision-model.py"))
mvm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mvm)

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# The last four phrasings are held out: the text head never sees them in training.
TEMPLATES_TRAIN = ["{w}", "{d}", "the digit {w}", "the number {w}", "a handwritten {w}", "number {d}",
                   "an image of the number {w}", "a scanned {w}"]
TEMPLATES_HELD_OUT = ["the numeral {d}", "{w} written by hand", "a photo of the digit {w}", "digit {d}"]
ACCENTS_TRAIN = ["en-gb", "en-us", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd"]
ACCENTS_HELD_OUT = ["en-029", "en-us-nyc"]
VARIANTS = ["m1", "f2", "m3"]
RATE = 16000


def speak(text, voice, speed, pitch):
    """espeak-ng -> mono PCM16 at 16 kHz (espeak-ng writes 22050 Hz)."""
    raw = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
                         check=True, capture_output=True).stdout
    tmp = wave.open(__import__("io").BytesIO(raw))
    sr, pcm = tmp.getframerate(), np.frombuffer(tmp.readframes(tmp.getnframes()), dtype="<i2")
    x = resample_poly(pcm.astype(np.float64), RATE, sr) if sr != RATE else pcm.astype(np.float64)
    return np.clip(np.round(x), -32768, 32767).astype("<i2")


def main():
    out = sys.argv[1]
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    os.makedirs(os.path.join(out, "audio"), exist_ok=True)
    d = load_digits()
    # Same permutation as make-vision-model.py: its first draw from the same seeded generator.
    perm = np.random.default_rng(20261125).permutation(len(d.target))
    held_out = set(int(i) for i in perm[:500])
    images = []
    for i in range(len(d.target)):
        name = f"images/{i:04d}.png"
        path = os.path.join(out, name)
        if not os.path.exists(path):
            open(path, "wb").write(mvm.png_bytes(mvm.to_rgb32(d.images[i])))
        images.append({"file": name, "label": int(d.target[i]), "split": "test" if i in held_out else "train"})

    texts = []
    for c, w in enumerate(NAMES):
        for split, templates in (("train", TEMPLATES_TRAIN), ("test", TEMPLATES_HELD_OUT)):
            texts += [{"text": t.format(w=w, d=c), "label": c, "split": split} for t in templates]

    rng = np.random.default_rng(20261201)
    audio = []
    for split, accents in (("train", ACCENTS_TRAIN), ("test", ACCENTS_HELD_OUT)):
        for accent in accents:
            for variant in VARIANTS:
                for c, w in enumerate(NAMES):
                    speed, pitch = int(rng.integers(130, 200)), int(rng.integers(25, 75))
                    name = f"audio/{accent}+{variant}-{c}.wav"
                    path = os.path.join(out, name)
                    if not os.path.exists(path):
                        pcm = speak(w, f"{accent}+{variant}", speed, pitch)
                        with wave.open(path, "wb") as f:
                            f.setnchannels(1)
                            f.setsampwidth(2)
                            f.setframerate(RATE)
                            f.writeframes(pcm.tobytes())
                    audio.append({"file": name, "label": c, "split": split, "voice": f"{accent}+{variant}",
                                  "speed": speed, "pitch": pitch})
    corrupted = corrupt(out, d, images, audio)
    manifest = {"labels": NAMES, "images": images, "texts": texts, "audio": audio, "corrupted": corrupted,
                "source": "scikit-learn digits (images), espeak-ng (speech), phrasings (text)"}
    json.dump(manifest, open(os.path.join(out, "manifest.json"), "w"), indent=1)
    count = lambda xs, s: sum(1 for x in xs if x["split"] == s)
    print(f"digits-pairs: images {count(images, 'train')}/{count(images, 'test')}, texts {count(texts, 'train')}/"
          f"{count(texts, 'test')}, audio {count(audio, 'train')}/{count(audio, 'test')}, corrupted images "
          f"{count(corrupted['images'], 'train')}/{count(corrupted['images'], 'test')}, noisy audio "
          f"{count(corrupted['audio'], 'train')}/{count(corrupted['audio'], 'test')} (train/held-out) -> {out}")


def occlude(img8, rng):
    """A random block of a fifth to a quarter of the 8x8 grid set to background, then noise."""
    x = img8.astype(np.float64).copy()
    h, w = [(3, 4), (4, 3), (4, 4), (3, 5), (5, 3)][int(rng.integers(5))]
    y0, x0 = int(rng.integers(0, 9 - h)), int(rng.integers(0, 9 - w))
    x[y0:y0 + h, x0:x0 + w] = 0.0
    return np.clip(x + rng.normal(0.0, 2.0, x.shape), 0.0, 16.0)


def drown(pcm, rng):
    """The first 40-60% of the voiced part, in white noise at -10..-4 dB SNR against it."""
    x = pcm.astype(np.float64)
    loud = np.flatnonzero(np.abs(x) > 0.05 * np.abs(x).max()) if np.abs(x).max() > 0 else np.arange(len(x))
    start, end = (int(loud[0]), int(loud[-1]) + 1) if len(loud) else (0, len(x))
    x = x[:start + int((end - start) * rng.uniform(0.4, 0.6))]
    voiced = x[start:]
    rms = np.sqrt(np.mean(voiced ** 2)) if len(voiced) else 1.0
    snr_db = rng.uniform(-10.0, -4.0)
    noise = rng.normal(0.0, rms / 10 ** (snr_db / 20), x.shape)
    return np.clip(np.round(x + noise), -32768, 32767).astype("<i2")


def corrupt(out, d, images, audio):
    """The corrupted copies `prism train fusion` learns from (see the module docstring)."""
    os.makedirs(os.path.join(out, "corrupted", "images"), exist_ok=True)
    os.makedirs(os.path.join(out, "corrupted", "audio"), exist_ok=True)
    rng = np.random.default_rng(20261207)
    cimages = []
    for i, item in enumerate(images):
        for k in range(2 if item["split"] == "train" else 1):
            img = occlude(d.images[i], rng)
            name = f"corrupted/images/{i:04d}-{k}.png"
            path = os.path.join(out, name)
            if not os.path.exists(path):
                open(path, "wb").write(mvm.png_bytes(mvm.to_rgb32(img)))
            cimages.append({"file": name, "label": item["label"], "split": item["split"]})
    caudio = []
    for item in audio:
        with wave.open(os.path.join(out, item["file"])) as f:
            pcm = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
        for k in range(1):
            noisy = drown(pcm, rng)
            name = "corrupted/" + item["file"].replace(".wav", f"-{k}.wav")
            path = os.path.join(out, name)
            if not os.path.exists(path):
                with wave.open(path, "wb") as f:
                    f.setnchannels(1)
                    f.setsampwidth(2)
                    f.setframerate(RATE)
                    f.writeframes(noisy.tobytes())
            caudio.append({"file": name, "label": item["label"], "split": item["split"]})
    return {"images": cimages, "audio": caudio,
            "recipe": "images: a 3x4/4x3/4x4/3x5/5x3 block of the 8x8 grid wiped, noise sigma 2 (of 16); "
                      "audio: the first 40-60% of the voiced part, white noise at -10..-4 dB SNR; seed 20261207"}


if __name__ == "__main__":
    main()
