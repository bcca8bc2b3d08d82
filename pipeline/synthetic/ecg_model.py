"""Physiologic 12-lead generator: a 3-D cardiac dipole projected onto the 12 leads.

The heart vector (VCG, Frank axes: X left, Y foot, Z back) is a sum of Gaussian waves per
beat, in the spirit of McSharry et al. (2003), but each wave has a 3-D direction. The
Dower transform projects it onto I, II and V1..V6; III, aVR, aVL and aVF are then derived
from I and II, so Einthoven's (III = II - I) and Goldberger's relations hold exactly and
aVR comes out inverted, as on a real recording. Noise and baseline wander are added at
the electrode level (to I, II and the chest leads) for the same reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.leads import DEFAULT_FS, LEADS

# Dower (1980) transform: rows V1..V6, I, II; columns X, Y, Z of the Frank VCG.
DOWER = np.array(
    [
        [-0.515, 0.157, -0.917],  # V1
        [0.044, 0.164, -1.387],  # V2
        [0.882, 0.098, -1.277],  # V3
        [1.213, 0.127, -0.601],  # V4
        [1.125, 0.127, -0.086],  # V5
        [0.831, 0.076, 0.230],  # V6
        [0.632, -0.235, 0.059],  # I
        [0.235, 1.066, -0.132],  # II
    ]
)
RHYTHMS = ("sinus", "af", "pvc", "av1", "wenckebach", "mobitz2", "av3")


def limb_and_chest_to_12(i: np.ndarray, ii: np.ndarray, chest: np.ndarray) -> np.ndarray:
    """Stack I, II and V1..V6 (n,6) into the 12 leads, deriving the other four exactly."""
    out = np.empty((i.shape[0], 12))
    out[:, 0] = i
    out[:, 1] = ii
    out[:, 2] = ii - i
    out[:, 3] = -(i + ii) / 2
    out[:, 4] = i - ii / 2
    out[:, 5] = ii - i / 2
    out[:, 6:] = chest
    return out


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-9)


def _rot_z(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


@dataclass
class Wave:
    """One Gaussian lobe of the heart vector: centre time (s), width (s), 3-D amplitude (mV)."""

    t: float
    sigma: float
    vec: np.ndarray


@dataclass
class EcgParams:
    """What the generator chose; kept in the page metadata."""

    rhythm: str
    hr_bpm: float
    axis_deg: float
    qrs_width: float
    amplitude: float
    st_mv: float
    t_scale: float
    pr_s: float
    noise_mv: float
    wander_mv: float
    beats: int = 0
    extras: dict[str, float] = field(default_factory=dict)


def _beat_times(rng: np.random.Generator, p: EcgParams, span: float) -> tuple[
    list[float], list[tuple[float, str]]
]:
    """P-wave times and (QRS time, kind) pairs covering ``[-1, span + 1]`` s."""
    rr = 60.0 / p.hr_bpm
    start = -1.0 - rng.uniform(0, rr)
    p_times: list[float] = []
    qrs: list[tuple[float, str]] = []
    t = start
    if p.rhythm == "af":
        while t < span + 1.5:
            qrs.append((t, "normal"))
            t += rr * float(np.clip(rng.gamma(8.0, 1 / 8.0), 0.45, 1.8))
        return p_times, qrs
    if p.rhythm == "av3":
        atrial = 60.0 / rng.uniform(65, 100)
        ta = start
        while ta < span + 1.5:
            p_times.append(ta)
            ta += atrial * rng.normal(1.0, 0.02)
        kind = "escape" if rng.random() < 0.6 else "normal"
        while t < span + 1.5:
            qrs.append((t, kind))
            t += rr * rng.normal(1.0, 0.01)
        return p_times, qrs
    drop_every = int(rng.integers(3, 6))
    n = 0
    wenck = 0
    while t < span + 1.5:
        rr_k = rr * (1.0 + 0.04 * np.sin(2 * np.pi * t / 4.0) + rng.normal(0, 0.015))
        n += 1
        if p.rhythm == "pvc" and n > 1 and rng.random() < p.extras.get("pvc_rate", 0.15):
            qrs.append((t - 0.35 * rr_k, "pvc"))  # premature, then a compensatory pause
            t += rr_k
            continue
        pr = p.pr_s
        if p.rhythm == "wenckebach":
            pr = p.pr_s + 0.08 * wenck
            wenck += 1
        p_times.append(t - pr)
        dropped = (p.rhythm in ("wenckebach", "mobitz2")) and n % drop_every == 0
        if dropped:
            wenck = 0
        else:
            qrs.append((t, "normal"))
        t += rr_k
    return p_times, qrs


def _gauss_sum(t: np.ndarray, centres: np.ndarray, sigmas: np.ndarray, vecs: np.ndarray
               ) -> np.ndarray:
    """Sum of Gaussians: (n,) times, (m,) centres/sigmas, (m,3) vectors -> (n,3)."""
    out = np.zeros((t.shape[0], 3))
    for c, s, v in zip(centres, sigmas, vecs, strict=True):
        lo = np.searchsorted(t, c - 5 * s)
        hi = np.searchsorted(t, c + 5 * s)
        if hi > lo:
            g = np.exp(-0.5 * ((t[lo:hi] - c) / s) ** 2)
            out[lo:hi] += g[:, None] * v[None, :]
    return out


def random_params(rng: np.random.Generator) -> EcgParams:
    """Draw a plausible patient: mostly sinus, with the usual abnormalities now and then."""
    rhythm = str(rng.choice(RHYTHMS, p=[0.55, 0.14, 0.12, 0.07, 0.04, 0.03, 0.05]))
    hr = float(rng.uniform(48, 110) if rng.random() < 0.85 else rng.uniform(110, 150))
    if rhythm == "af":
        hr = float(rng.uniform(60, 140))
    if rhythm == "av3":
        hr = float(rng.uniform(32, 50))
    axis = float(np.clip(rng.normal(50, 30), -60, 130))
    wide = rng.random() < 0.15
    return EcgParams(
        rhythm=rhythm,
        hr_bpm=hr,
        axis_deg=axis,
        qrs_width=float(rng.uniform(1.6, 2.2) if wide else rng.uniform(0.8, 1.2)),
        amplitude=float(rng.lognormal(0.0, 0.3)),
        st_mv=float(rng.normal(0, 0.08) if rng.random() < 0.7 else rng.normal(0, 0.25)),
        t_scale=float(rng.uniform(-0.6, 1.4) if rng.random() < 0.15 else rng.uniform(0.7, 1.3)),
        pr_s=float(rng.uniform(0.24, 0.34) if rhythm == "av1" else rng.uniform(0.12, 0.2)),
        noise_mv=float(rng.uniform(0.0, 0.03)),
        wander_mv=float(rng.uniform(0.0, 0.25)),
        extras={"pvc_rate": float(rng.uniform(0.08, 0.3))},
    )


def generate_ecg(rng: np.random.Generator, seconds: float, fs: int = DEFAULT_FS,
                 params: EcgParams | None = None) -> tuple[np.ndarray, EcgParams]:
    """Return ``(signals (n,12) mV, params)`` over ``seconds`` at ``fs`` Hz."""
    p = params if params is not None else random_params(rng)
    n = round(seconds * fs)
    t = np.arange(n) / fs
    rr = 60.0 / p.hr_bpm
    qt_scale = float(np.sqrt(rr))  # Bazett-like: QT lengthens with RR
    rot = _rot_z(p.axis_deg - 50.0)
    amp = p.amplitude
    w = p.qrs_width
    # Normal beat: directions in the Frank frame, rotated in the frontal plane by the axis.
    r_dir = rot @ _unit(np.array([0.62, 0.74, 0.25 + rng.normal(0, 0.2)]))
    q_dir = rot @ _unit(np.array([-0.4, -0.2, -0.8]))
    s_dir = rot @ _unit(np.array([-0.35, -0.45, 0.8 + rng.normal(0, 0.2)]))
    p_dir = _unit(np.array([0.55, 0.8, 0.1]))
    t_dir = rot @ _unit(np.array([0.6, 0.6, -0.4 + rng.normal(0, 0.2)]))
    st_dir = _unit(rng.normal(0, 1, 3))
    normal = [
        Wave(-0.028 * w, 0.008 * w, q_dir * 0.12 * amp),
        Wave(0.0, 0.011 * w, r_dir * 1.25 * amp),
        Wave(0.030 * w, 0.012 * w, s_dir * 0.55 * amp),
        Wave(0.11 * w, 0.045, st_dir * p.st_mv),
        Wave(0.24 * qt_scale + 0.02 * w, 0.055 * qt_scale, t_dir * 0.32 * amp * p.t_scale),
        Wave(0.30 * qt_scale + 0.02 * w, 0.035 * qt_scale, t_dir * 0.12 * amp * p.t_scale),
    ]
    if w > 1.4:  # bundle-branch-like notch
        normal.append(Wave(0.045 * w, 0.01 * w, _unit(rng.normal(0, 1, 3)) * 0.5 * amp))
    pvc_dir = _unit(rng.normal(0, 1, 3))
    pvc = [
        Wave(0.0, 0.035, pvc_dir * 1.6 * amp),
        Wave(0.07, 0.03, _unit(rng.normal(0, 1, 3)) * 0.6 * amp),
        Wave(0.30, 0.07, -pvc_dir * 0.5 * amp),
    ]
    esc_dir = _unit(r_dir + 0.6 * _unit(rng.normal(0, 1, 3)))
    escape = [Wave(0.0, 0.025, esc_dir * 1.3 * amp), Wave(0.28, 0.07, -esc_dir * 0.35 * amp)]
    p_times, qrs = _beat_times(rng, p, seconds)
    p.beats = sum(1 for tq, _ in qrs if 0 <= tq < seconds)
    centres: list[float] = []
    sigmas: list[float] = []
    vecs: list[np.ndarray] = []
    for tp in p_times:
        centres.append(tp)
        sigmas.append(0.022)
        vecs.append(p_dir * 0.14 * amp * rng.normal(1.0, 0.03))
    morph = {"normal": normal, "pvc": pvc, "escape": escape}
    for tq, kind in qrs:
        jitter = rng.normal(1.0, 0.02)
        for wv in morph[kind]:
            centres.append(tq + wv.t)
            sigmas.append(wv.sigma)
            vecs.append(wv.vec * jitter)
    order = np.argsort(centres)
    vcg = _gauss_sum(t, np.asarray(centres)[order], np.asarray(sigmas)[order],
                     np.asarray(vecs)[order])
    if p.rhythm == "af":  # fibrillatory waves replace the P waves
        for _ in range(3):
            f = rng.uniform(4.0, 8.0)
            vcg += np.sin(2 * np.pi * f * t + rng.uniform(0, 6.3))[:, None] * (
                _unit(rng.normal(0, 1, 3)) * rng.uniform(0.01, 0.04))[None, :]
    eight = vcg @ DOWER.T  # (n,8): V1..V6, I, II
    eight += _electrode_noise(rng, t, p)
    return limb_and_chest_to_12(eight[:, 6], eight[:, 7], eight[:, :6]), p


def _electrode_noise(rng: np.random.Generator, t: np.ndarray, p: EcgParams) -> np.ndarray:
    """Independent noise and baseline wander on the 8 independent leads."""
    n = t.shape[0]
    out = rng.normal(0, 1, (n, 8)) * p.noise_mv
    f = rng.uniform(0.05, 0.5, (3, 8))
    ph = rng.uniform(0, 2 * np.pi, (3, 8))
    a = rng.uniform(0, 1, (3, 8)) * p.wander_mv / 2
    for k in range(3):
        out += a[k] * np.sin(2 * np.pi * f[k] * t[:, None] + ph[k])
    if rng.random() < 0.1:  # mains hum
        hz = 50.0 if rng.random() < 0.5 else 60.0
        out += 0.02 * rng.uniform(0.2, 1.0, 8) * np.sin(2 * np.pi * hz * t[:, None])
    return out


__all__ = ["DOWER", "LEADS", "RHYTHMS", "EcgParams", "generate_ecg", "limb_and_chest_to_12",
           "random_params"]
