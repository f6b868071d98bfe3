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
    manifest = {"labels": NAMES, "images": images, "texts": texts, "audio": audio,
                "source": "scikit-learn digits (images), espeak-ng (speech), phrasings (text)"}
    json.dump(manifest, open(os.path.join(out, "manifest.json"), "w"), indent=1)
    count = lambda xs, s: sum(1 for x in xs if x["split"] == s)
    print(f"digits-pairs: images {count(images, 'train')}/{count(images, 'test')}, texts {count(texts, 'train')}/"
          f"{count(texts, 'test')}, audio {count(audio, 'train')}/{count(audio, 'test')} (train/held-out) -> {out}")


if __name__ == "__main__":
    main()
