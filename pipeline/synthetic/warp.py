"""Geometric warps with exact, consistent point and pixel mappings.

Every elementary warp is written in closed form in the *inverse* direction (output pixel ->
source pixel), which is what ``cv2.remap`` needs. The forward direction for points (where
does a trace sample land in the output image?) is the numerical inverse of that same
function (Newton's method), so pixels and ground truth go through one mapping.
The dense remap maps are the closed form sampled every few pixels and interpolated by
``cv2.resize`` at exactly the sampled positions; the tests check both agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

MAP_STEP = 6  # px between exactly evaluated samples of the dense map
JACOBIAN_ITERATIONS = 1  # Newton steps with a fresh Jacobian before chord steps


@dataclass
class Homography:
    """Projective map; ``matrix`` takes source px to output px."""

    matrix: np.ndarray
    inverse_matrix: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.inverse_matrix = np.linalg.inv(self.matrix)

    def inverse(self, q: np.ndarray) -> np.ndarray:
        return _apply_h(self.inverse_matrix, q)

    def forward(self, p: np.ndarray) -> np.ndarray:
        return _apply_h(self.matrix, p)


@dataclass
class Lens:
    """Radial (barrel/pincushion) distortion about ``center`` with radius scale ``norm``."""

    center: tuple[float, float]
    norm: float
    k1: float
    k2: float = 0.0

    def inverse(self, q: np.ndarray) -> np.ndarray:
        c = np.asarray(self.center)
        d = (q - c) / self.norm
        r2 = (d * d).sum(axis=1, keepdims=True)
        return c + (q - c) * (1.0 + self.k1 * r2 + self.k2 * r2 * r2)


@dataclass
class PaperWarp:
    """Smooth displacement of the paper itself (curl, folds, wrinkles), in source px.

    ``inverse(u) = u + d(u)``: where the flattened point ``u`` finds its ink on the page.
    """

    size: tuple[float, float]  # source width, height px
    curl: tuple[float, float] = (0.0, 0.0)  # px of bow at the edges: rows, columns
    folds: list[tuple[float, float, float, float, float]] = field(default_factory=list)
    # each fold: normal angle (rad), offset px along the normal from the centre, strength
    # (fractional stretch beyond the fold), softness px, unused
    waves: list[tuple[float, float, float, float, float]] = field(default_factory=list)
    # each wave: kx, ky (rad/px), phase, amplitude x px, amplitude y px

    def inverse(self, u: np.ndarray) -> np.ndarray:
        w, h = self.size
        cx, cy = w / 2, h / 2
        x = u[:, 0] - cx
        y = u[:, 1] - cy
        dx = self.curl[1] * (y / cy) ** 2 * np.sign(x) * np.minimum(np.abs(x) / cx, 1.0)
        dy = self.curl[0] * (x / cx) ** 2
        for ang, off, strength, soft, _ in self.folds:
            nx, ny = np.cos(ang), np.sin(ang)
            s = x * nx + y * ny - off
            ramp = soft * np.logaddexp(0.0, s / soft)  # smooth max(s, 0)
            dx = dx + strength * ramp * nx
            dy = dy + strength * ramp * ny
        for kx, ky, ph, ax, ay in self.waves:
            sn = np.sin(kx * u[:, 0] + ky * u[:, 1] + ph)
            dx = dx + ax * sn
            dy = dy + ay * sn
        return u + np.stack([dx, dy], axis=1)


Component = Homography | Lens | PaperWarp


@dataclass
class Warp:
    """Output px -> source px as ``components`` applied in order (output side first)."""

    out_size: tuple[int, int]  # W, H of the output image
    components: list[Component]

    def inverse(self, q: np.ndarray) -> np.ndarray:
        p = np.asarray(q, dtype=np.float64).reshape(-1, 2)
        for c in self.components:
            p = c.inverse(p)
        return p

    def _guess(self, p: np.ndarray) -> np.ndarray:
        q = p
        for c in reversed(self.components):
            if isinstance(c, Homography):
                q = c.forward(q)
        return q

    def forward(self, p: np.ndarray, iterations: int = 12) -> np.ndarray:
        """Source px -> output px, by Newton's method on ``inverse``."""
        p = np.asarray(p, dtype=np.float64).reshape(-1, 2)
        if all(isinstance(c, Homography) for c in self.components):
            q = p
            for c in reversed(self.components):
                assert isinstance(c, Homography)
                q = c.forward(q)
            return q
        q = self._guess(p)
        eps = 0.25
        todo = np.arange(len(p))
        jac: np.ndarray | None = None  # (k, 4): jx, jy of the points in ``todo``
        for it in range(iterations):
            qa = q[todo]
            k = len(qa)
            if it < JACOBIAN_ITERATIONS or jac is None:
                dx, dy = np.array([eps, 0.0]), np.array([0.0, eps])
                g3 = self.inverse(np.concatenate([qa, qa + dx, qa + dy]))
                g = g3[:k]
                jac = np.concatenate([(g3[k:2 * k] - g) / eps, (g3[2 * k:] - g) / eps], axis=1)
            else:  # chord steps: the warp is smooth, the last Jacobian still holds
                g = self.inverse(qa)
            jx, jy = jac[:, :2], jac[:, 2:]
            r = g - p[todo]
            det = jx[:, 0] * jy[:, 1] - jy[:, 0] * jx[:, 1]
            det = np.where(np.abs(det) < 1e-9, 1e-9, det)
            q[todo, 0] -= (jy[:, 1] * r[:, 0] - jy[:, 0] * r[:, 1]) / det
            q[todo, 1] -= (-jx[:, 1] * r[:, 0] + jx[:, 0] * r[:, 1]) / det
            keep = np.abs(r).max(axis=1) > 1e-5
            todo, jac = todo[keep], jac[keep]
            if len(todo) == 0:
                break
        return q

    def maps(self) -> tuple[np.ndarray, np.ndarray]:
        """Dense ``cv2.remap`` maps (float32 H x W) for the output image."""
        w, h = self.out_size
        pad = 2 * MAP_STEP  # keeps cv2.resize's clamped border outside the image
        wb, hb = w + 2 * pad, h + 2 * pad
        wc, hc = -(-wb // MAP_STEP) + 1, -(-hb // MAP_STEP) + 1
        # Sample exactly where cv2.resize's INTER_LINEAR puts the coarse pixel centres.
        xs = (np.arange(wc) + 0.5) * wb / wc - 0.5 - pad
        ys = (np.arange(hc) + 0.5) * hb / hc - 0.5 - pad
        gx, gy = np.meshgrid(xs, ys)
        src = self.inverse(np.stack([gx.ravel(), gy.ravel()], axis=1))
        mx = src[:, 0].reshape(hc, wc).astype(np.float32)
        my = src[:, 1].reshape(hc, wc).astype(np.float32)
        crop = (slice(pad, pad + h), slice(pad, pad + w))
        return (cv2.resize(mx, (wb, hb), interpolation=cv2.INTER_LINEAR)[crop],
                cv2.resize(my, (wb, hb), interpolation=cv2.INTER_LINEAR)[crop])


def _apply_h(m: np.ndarray, p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64).reshape(-1, 2)
    x = m[0, 0] * p[:, 0] + m[0, 1] * p[:, 1] + m[0, 2]
    y = m[1, 0] * p[:, 0] + m[1, 1] * p[:, 1] + m[1, 2]
    z = m[2, 0] * p[:, 0] + m[2, 1] * p[:, 1] + m[2, 2]
    return np.stack([x / z, y / z], axis=1)
